//! Running the project's release binaries as separate processes and reading their footprint
//! from /proc.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use control::overlay::BootstrapAddr;
use testkit::FarHost;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

/// A binary built beside this benchmark (same profile).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release --workspace`",
            path.display()
        );
    }
    Ok(path)
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM).
pub fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// What /proc/PID/stat says: (state, parent PID); `None` if there is no such process.
pub fn stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(1)?.parse().ok()?,
    ))
}

/// Whether `pid` is a live process (not a zombie).
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// The live (not zombie) children of `pid`, from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| stat(child).is_some_and(|(state, parent)| parent == pid && state != 'Z'))
        .collect()
}

/// A size in kB (as /proc and rusage give it) in MiB.
pub fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// User plus system CPU time of a process, from /proc/PID/stat (clock ticks of 10 ms).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// Context switches (voluntary and not) of every thread of `pid` alive now: each is a sleep
/// and a wake-up, or a preemption.
pub fn context_switches(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue; // the thread exited meanwhile
        };
        total += status
            .lines()
            .filter_map(|l| {
                let value = l
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))?;
                value.trim().parse::<u64>().ok()
            })
            .sum::<u64>();
    }
    Ok(total)
}

/// Established TCP connections of process `pid`: its socket inodes (from `/proc/PID/fd`)
/// that `/proc/PID/net/tcp` and `tcp6` list in state ESTABLISHED.
pub fn established_tcp(pid: u32) -> anyhow::Result<usize> {
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue; // closed meanwhile
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut established = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if fields.get(3) == Some(&"01") && fields.get(9).is_some_and(|i| inodes.contains(*i)) {
                established += 1;
            }
        }
    }
    Ok(established)
}

/// A child process, killed when dropped; its standard output is drained in the background
/// once read, so it never blocks on a full pipe.
pub struct Process {
    /// Held so the process is killed when this is dropped.
    child: Child,
    pub pid: u32,
}

impl Process {
    /// Asks it to stop (SIGTERM) and waits up to `grace` for it to exit; killed if it has not.
    pub async fn terminate(mut self, grace: Duration) {
        // SAFETY: kill(2) has no memory-safety preconditions; the child is not yet reaped, so
        // the PID is still ours.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let _ = tokio::time::timeout(grace, self.child.wait()).await;
    }
}

/// A line a program wrote to its standard error, and when it was read.
pub type LogLine = (Instant, String);

/// More to a spawned program than its arguments.
#[derive(Default)]
pub struct Extra<'a> {
    /// Added to its environment (`RUST_LOG`, say).
    pub env: &'a [(&'a str, &'a str)],
    /// Where its standard error goes, line by line as read; discarded without.
    pub stderr: Option<mpsc::UnboundedSender<LogLine>>,
    /// The machine it runs on and the address it listens on there.
    pub host: Host<'a>,
}

/// Where a program runs: this machine, on loopback or on another of its addresses, or a
/// [`FarHost`] behind a delayed link.
#[derive(Clone, Copy, Default)]
pub enum Host<'a> {
    #[default]
    Loopback,
    Here(Ipv4Addr),
    Far(&'a FarHost),
}

impl Host<'_> {
    /// The address its daemons listen on.
    pub fn ip(self) -> IpAddr {
        match self {
            Self::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Self::Here(ip) => IpAddr::V4(ip),
            Self::Far(far) => IpAddr::V4(far.far),
        }
    }

    fn command(self, program: &Path) -> Command {
        match self {
            Self::Loopback | Self::Here(_) => Command::new(program),
            Self::Far(far) => far.command(program),
        }
    }
}

/// Where a program's standard error goes when nobody reads it: a file of its own under
/// `$MTC_BENCH_LOGS` if that is set (to see what went wrong in a run), else nowhere.
fn log_file(program: &Path) -> Stdio {
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let Some(dir) = std::env::var_os("MTC_BENCH_LOGS") else {
        return Stdio::null();
    };
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = program.file_name().unwrap_or_default().to_string_lossy();
    std::fs::File::create(Path::new(&dir).join(format!("{n:03}-{name}.log")))
        .map_or_else(|_| Stdio::null(), Stdio::from)
}

/// Starts `program` with `args` (no overlay settings inherited from the environment) and
/// reads its standard output line by line until `wanted` picks what the caller waits for
/// (an address it prints once it is ready).
pub async fn spawn_reading<T>(
    program: &Path,
    args: &[&str],
    wanted: impl FnMut(&str) -> Option<T>,
) -> anyhow::Result<(Process, T)> {
    spawn_reading_with(program, args, Extra::default(), wanted).await
}

/// [`spawn_reading`] with an environment added and standard error kept.
pub async fn spawn_reading_with<T>(
    program: &Path,
    args: &[&str],
    extra: Extra<'_>,
    mut wanted: impl FnMut(&str) -> Option<T>,
) -> anyhow::Result<(Process, T)> {
    let mut child = extra
        .host
        .command(program)
        .args(args)
        .env_remove("P2P_BOOTSTRAPS")
        .env_remove("P2P_PSK")
        .envs(extra.env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(if extra.stderr.is_some() {
            Stdio::piped()
        } else {
            log_file(program)
        })
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let pid = child.id().context("exited at once")?;
    if let (Some(to), Some(stderr)) = (extra.stderr, child.stderr.take()) {
        let mut lines = BufReader::new(stderr).lines();
        // Read to the end even once nobody listens, so it never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = to.send((Instant::now(), line));
            }
        });
    }
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let found = loop {
        let line = lines.next_line().await?.with_context(|| {
            format!(
                "{} exited before printing what was awaited",
                program.display()
            )
        })?;
        if let Some(found) = wanted(&line) {
            break found;
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Process { child, pid }, found))
}

/// A long-running overlay program of ours, killed when dropped.
pub struct Daemon {
    process: Process,
    pub pid: u32,
    pub bootstrap: BootstrapAddr,
    /// Its Prometheus endpoint (`http://ADDR/metrics`).
    pub metrics: SocketAddr,
}

impl Daemon {
    /// Stops it as SIGTERM does (an allocator stops its instances), killed after `grace`.
    pub async fn terminate(self, grace: Duration) {
        self.process.terminate(grace).await;
    }
}

/// Starts binary `name` on loopback (or `extra.host`) with `args` and waits for the overlay and metrics
/// addresses it prints.
pub async fn start_daemon(name: &str, args: &[&str]) -> anyhow::Result<Daemon> {
    start_daemon_with(name, args, None, Extra::default()).await
}

/// A bootstrap `ping-monitor` and an `hl-service` (embedded store under `data`) joined to it:
/// the control side every whole-system scenario starts from. Returns (monitor, hl-service).
pub async fn start_monitor_and_lookup(data: &std::path::Path) -> anyhow::Result<(Daemon, Daemon)> {
    start_monitor_and_lookup_on(data, Host::Loopback).await
}

/// [`start_monitor_and_lookup`], listening on `host`'s address.
pub async fn start_monitor_and_lookup_on(
    data: &std::path::Path,
    host: Host<'_>,
) -> anyhow::Result<(Daemon, Daemon)> {
    let on = |host| Extra {
        host,
        ..Extra::default()
    };
    let monitor = start_daemon_with("ping-monitor", &[], None, on(host)).await?;
    let bootstrap = monitor.bootstrap.to_string();
    let data = data.to_str().context("the data directory is not UTF-8")?;
    let lookup = start_daemon_with(
        "hl-service",
        &["--bootstrap", &bootstrap, "--data-dir", data],
        None,
        on(host),
    )
    .await?;
    Ok((monitor, lookup))
}

/// [`start_daemon`], waiting also for a line starting with `ready` if given (after the
/// addresses: an allocator's `runtime: `, once it serves start requests), with `extra`.
pub async fn start_daemon_with(
    name: &str,
    args: &[&str],
    ready: Option<&str>,
    extra: Extra<'_>,
) -> anyhow::Result<Daemon> {
    // A throw-away identity and free ports on the host's address.
    let listen = format!("{}:0", extra.host.ip());
    let own = [
        "--ephemeral",
        "--p2p-listen-addr",
        &listen,
        "--prom-listen-addr",
        &listen,
    ];
    let all: Vec<&str> = own.iter().chain(args).copied().collect();
    spawn_daemon(&sibling_binary(name)?, &all, ready, extra).await
}

/// Starts `program` with exactly `args` and waits until it has printed its overlay address,
/// its metrics address and the `ready` line if there is one (in any order: the metrics line
/// comes once /metrics is served, which may be after the `ready` line).
pub async fn spawn_daemon(
    program: &Path,
    args: &[&str],
    ready: Option<&str>,
    extra: Extra<'_>,
) -> anyhow::Result<Daemon> {
    let (mut bootstrap, mut metrics, mut is_ready) = (None, None, ready.is_none());
    let (process, (bootstrap, metrics)) = spawn_reading_with(program, args, extra, |line| {
        if bootstrap.is_none() && line.contains("/p2p/") {
            bootstrap = Some(line.parse::<BootstrapAddr>());
        }
        if let Some(addr) = line
            .strip_prefix("metrics: http://")
            .and_then(|rest| rest.strip_suffix("/metrics"))
        {
            metrics = Some(addr.parse::<SocketAddr>());
        }
        is_ready |= ready.is_some_and(|ready| line.starts_with(ready));
        let done = metrics.is_some() && is_ready;
        done.then(|| (bootstrap.take(), metrics.take()))
    })
    .await?;
    Ok(Daemon {
        pid: process.pid,
        process,
        bootstrap: bootstrap
            .context("no overlay address printed")?
            .map_err(anyhow::Error::msg)?,
        metrics: metrics.context("no metrics address printed")??,
    })
}

/// Runs a binary to completion and returns its standard output; an error with its standard
/// error if it fails.
pub async fn run_output(name: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(sibling_binary(name)?)
        .args(args)
        .env_remove("P2P_BOOTSTRAPS")
        .env_remove("P2P_PSK")
        .stdin(Stdio::null())
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "{name} {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Runs a binary to completion; returns its wall time and peak RSS in kB (from wait4's
/// rusage, so it covers the whole run).
pub fn run_measured(name: &str, args: &[&str]) -> anyhow::Result<(Duration, u64)> {
    let start = std::time::Instant::now();
    let child = std::process::Command::new(sibling_binary(name)?)
        .args(args)
        .env_remove("P2P_BOOTSTRAPS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value, and wait4 only writes into the two
    // out-parameters we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if waited != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{name} {args:?} failed (status {status})");
    }
    Ok((start.elapsed(), usage.ru_maxrss as u64))
}
