//! A second machine, some milliseconds away, on this one: a network namespace joined to this
//! one by a point-to-point link whose every packet (TCP, UDP, anything IP) is delayed in user
//! space. Programs started in it ([`FarHost::command`]) have their own loopback and reach this
//! machine, and are reached from it, only over the link, at [`FarHost::near`] and
//! [`FarHost::far`]: the overlay, the lookup and the data plane all see a far machine.
//!
//! It needs root (a namespace, two TUN devices, `ip` from iproute2) and no kernel module:
//! `tc netem` would be the usual tool, but this machine's kernel has no `sch_netem`. Each end of
//! the link is a TUN device (one here, one moved into the namespace); threads read the IP
//! packets from one, hold each for the one-way delay and write it to the other, with the
//! [`crate::delay_relay`] delay lines.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::Path,
    process::Command as StdCommand,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::delay_relay::{DelayLine, Egress, POLL, Shape};

/// `TUNSETIFF` from linux/if_tun.h: attaches a `/dev/net/tun` descriptor to a device.
const TUNSETIFF: u64 = 0x4004_54ca;

/// `struct ifreq` as TUNSETIFF reads it: the device name and its flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

/// The far hosts of this process so far: each gets its own names and /30.
static STARTED: AtomicU32 = AtomicU32::new(0);

/// A network namespace behind a delayed link; removed, with its link, when dropped (programs
/// still running in it should be stopped first).
pub struct FarHost {
    /// This machine's end of the link: programs here that the far host must reach listen on it.
    pub near: Ipv4Addr,
    /// The far host's address.
    pub far: Ipv4Addr,
    /// The namespace's name, for `ip netns exec`.
    pub netns: String,
    shape: Arc<Shape>,
}

impl FarHost {
    /// Why a far host cannot be had here, if it cannot (not root, no TUN device, no `ip`).
    pub fn unavailable() -> Option<String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Some("a far host needs root (a network namespace and TUN devices)".into());
        }
        if !Path::new("/dev/net/tun").exists() {
            return Some("a far host needs /dev/net/tun".into());
        }
        match StdCommand::new("ip").arg("-V").output() {
            Ok(output) if output.status.success() => None,
            _ => Some("a far host needs `ip` (iproute2)".into()),
        }
    }

    /// A far host `one_way` away (a round trip takes twice that longer).
    pub fn start(one_way: Duration) -> io::Result<Self> {
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Distinct per process and per host within it, as far as 10.128/9 allows.
        let (second, third) = (128 + (pid % 120) as u8, (n % 64) as u8 * 4);
        let near = Ipv4Addr::new(10, second, third, 1);
        let far = Ipv4Addr::new(10, second, third, 2);
        let tag = format!("{}{n}", pid % 100_000);
        let (near_dev, far_dev, netns) = (
            format!("mtcn{tag}"),
            format!("mtcf{tag}"),
            format!("mtc-far-{tag}"),
        );
        ip(&["netns", "add", &netns])?;
        let host = Self {
            near,
            far,
            netns: netns.clone(),
            shape: Shape::new(one_way),
        };
        let near_tun = Arc::new(open_tun(&near_dev)?);
        let far_tun = Arc::new(open_tun(&far_dev)?);
        ip(&["link", "set", &far_dev, "netns", &netns])?;
        ip(&["addr", "add", &format!("{near}/30"), "dev", &near_dev])?;
        ip(&["link", "set", &near_dev, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{far}/30"),
            "dev",
            &far_dev,
        ])?;
        ip(&["-n", &netns, "link", "set", &far_dev, "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &near.to_string(),
        ])?;
        for (from, to, seed) in [
            (Arc::clone(&near_tun), Arc::clone(&far_tun), 0x9E37_79B9),
            (far_tun, near_tun, 0x2545_F491),
        ] {
            let shape = Arc::clone(&host.shape);
            thread::spawn(move || carry(&from, Tun(to), shape, seed));
        }
        Ok(host)
    }

    /// A command that runs `program` on the far host.
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command.args(["netns", "exec", &self.netns]).arg(program);
        command
    }
}

impl Drop for FarHost {
    fn drop(&mut self) {
        self.shape.stopped.store(true, Ordering::Relaxed);
        // The devices go when their threads close the last descriptors.
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// One end of the link, written to.
#[derive(Clone)]
struct Tun(Arc<File>);

impl Egress for Tun {
    fn send(&self, packet: &[u8]) {
        let _ = (&*self.0).write(packet);
    }
}

/// Reads packets from `from` and delivers each, delayed, to `to`, until the host is dropped.
fn carry(from: &File, to: Tun, shape: Arc<Shape>, seed: u64) {
    let mut line = DelayLine::start(Arc::clone(&shape), seed);
    let mut buffer = vec![0u8; 65536];
    let mut poll = libc::pollfd {
        fd: from.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !shape.stopped.load(Ordering::Relaxed) {
        // SAFETY: `poll` points at one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, POLL.as_millis() as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        match (&*from).read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => line.push(Instant::now(), buffer[..n].to_vec(), &to),
        }
    }
}

/// A TUN device named `name` (IP packets, no extra header), as long as the file is open.
fn open_tun(name: &str) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _rest: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::other(format!("device name {name} is too long")));
    }
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `request` is laid out as.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut request) } < 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(
            error.kind(),
            format!("cannot create TUN device {name}: {error}"),
        ));
    }
    Ok(file)
}

/// Runs `ip ARGS`; an error with its message if it fails.
fn ip(args: &[&str]) -> io::Result<()> {
    let output = StdCommand::new("ip").args(args).output()?;
    if output.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// Delays TCP both ways: a connection from the far host to this one takes at least one
    /// round trip of the link. Needs root; says so and passes where it cannot run.
    #[test]
    fn a_round_trip_over_the_link_takes_twice_the_delay() {
        if let Some(why) = FarHost::unavailable() {
            eprintln!("skipped: {why}");
            return;
        }
        let host = FarHost::start(Duration::from_millis(20)).expect("far host");
        let listener = TcpListener::bind((host.near, 0)).expect("listen");
        let addr = listener.local_addr().unwrap();
        let accept = thread::spawn(move || listener.accept().map(|_| ()));
        let begin = Instant::now();
        let status = StdCommand::new("ip")
            .args(["netns", "exec", &host.netns, "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()))
            .status()
            .expect("bash");
        let took = begin.elapsed();
        assert!(status.success(), "no connection from the far host");
        accept.join().unwrap().expect("accepted");
        assert!(took >= Duration::from_millis(40), "took {took:?}");
        // From here to there too: nothing listens there, so a refusal comes back, delayed.
        let begin = Instant::now();
        let refused = TcpStream::connect((host.far, 9));
        assert!(refused.is_err());
        assert!(begin.elapsed() >= Duration::from_millis(40));
    }
}
