//! Layer-4 tunnels (`tunnel`): a TCP and UDP service behind four paths, pinned as the
//! data-plane scenarios are: straight to it; through ours (`l4-proxy` -> QUIC -> the
//! service's sidecar, an `l4-proxy` too); through two haproxy in `mode tcp`; and through two
//! haproxy in `mode tcp` with TLS 1.3 between them, the like-for-like peer of our encrypted
//! hop. haproxy carries no UDP, so the UDP figures are direct and ours only.
//!
//! The service (the hidden `bench serve-l4`, a process of its own) speaks a one-byte
//! protocol on TCP: `D` and a u64 (big-endian) is a download of that many bytes, `U` and a
//! u64 an upload it counts and answers with the count, `E` an echo; on UDP (the same port
//! number) it echoes every datagram.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

use crate::{
    body::FILLER,
    compare::{Better, compare},
    foreign::{self, Mode, TwoHops},
    pinning::Pinning,
    procs::{
        Extra, Process, context_switches, cpu_time, mib, sibling_binary, spawn_reading,
        spawn_reading_with, status_kb,
    },
    proxy_path::Lookup,
    report::{Report, outln},
    stats::{mib_per_s, ms2, percentile},
};

/// A transfer that takes longer than this has failed.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long ours may take to carry its first connection (instances found on the overlay).
const READY_WITHIN: Duration = Duration::from_secs(60);
/// Bytes of each echo round trip.
const ECHO_BYTES: usize = 64;
/// Bytes of each UDP datagram.
const DATAGRAM_BYTES: usize = 512;
/// How long the stalled client of a download does not read.
const STALL: Duration = Duration::from_secs(2);
const TCP_SERVICE: &str = "bench-tcp";
const UDP_SERVICE: &str = "bench-udp";

#[derive(clap::Args)]
pub struct Args {
    /// Bytes of the download and of the upload through each path.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Echo round trips of 64 bytes on one connection, for the added latency.
    #[arg(long, default_value_t = 20_000)]
    round_trips: usize,
    /// UDP datagrams a second sent for `--udp-duration`, at each of these rates in turn: the
    /// first is the fixed rate's loss, the others where ours saturates.
    #[arg(long, value_delimiter = ',', default_value = "20000,40000,60000")]
    udp_rates: Vec<u64>,
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    udp_duration: Duration,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            bytes: 1 << 30,
            round_trips: 20_000,
            udp_rates: vec![20_000, 40_000, 60_000],
            udp_duration: Duration::from_secs(5),
        }
    }
}

impl Args {
    pub fn quick() -> Self {
        Self {
            bytes: 16 << 20,
            round_trips: 500,
            udp_rates: vec![2_000],
            udp_duration: Duration::from_secs(1),
        }
    }
}

/// The service's arguments (`bench serve-l4`).
#[derive(clap::Args)]
pub struct ServeArgs {
    /// TCP and UDP port; 0 takes a free one. Printed as `listening: ADDR`.
    #[arg(long, default_value_t = 0)]
    port: u16,
}

/// Runs the TCP and UDP service until killed.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, args.port)).await?;
    let addr = listener.local_addr()?;
    let udp = UdpSocket::bind(addr)
        .await
        .context("no UDP socket on the TCP port's number")?;
    // Buffers as large as the proxies': a loss is then theirs, not the service's.
    proxy::transport::size_socket_buffers(&udp);
    println!("listening: {addr}");
    tokio::spawn(async move {
        let mut buffer = vec![0; 65536];
        while let Ok((n, from)) = udp.recv_from(&mut buffer).await {
            let _ = udp.send_to(&buffer[..n], from).await;
        }
    });
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            if let Err(error) = serve_connection(stream).await {
                eprintln!("serve-l4: {error}");
            }
        });
    }
}

async fn serve_connection(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut mode = [0; 1];
    if stream.read(&mut mode).await? == 0 {
        // A liveness check: connected and closed.
        return Ok(());
    }
    match mode[0] {
        b'D' => {
            let mut left = stream.read_u64().await?;
            while left > 0 {
                let n = left.min(FILLER.len() as u64) as usize;
                stream.write_all(&FILLER[..n]).await?;
                left -= n as u64;
            }
            stream.shutdown().await?;
        }
        b'U' => {
            let expected = stream.read_u64().await?;
            let mut buffer = vec![0; 256 * 1024];
            let mut counted = 0;
            while counted < expected {
                match stream.read(&mut buffer).await? {
                    0 => break,
                    n => counted += n as u64,
                }
            }
            stream.write_u64(counted).await?;
            stream.shutdown().await?;
        }
        b'E' => {
            let (mut read, mut write) = stream.split();
            tokio::io::copy(&mut read, &mut write).await?;
        }
        other => bail!("unknown mode {other}"),
    }
    Ok(())
}

/// One of the compared paths.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Direct,
    Ours,
    Haproxy,
    HaproxyTls,
}

impl Via {
    const ALL: [Via; 4] = [Via::Direct, Via::Ours, Via::Haproxy, Via::HaproxyTls];

    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Ours => "ours",
            Via::Haproxy => "haproxy-tcp",
            Via::HaproxyTls => "haproxy-tcp-tls",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Via::Direct => "direct: client -> service",
            Via::Ours => "ours: client -> l4-proxy -> QUIC -> sidecar (l4-proxy) -> service",
            Via::Haproxy => "haproxy-tcp: client -> haproxy A -> haproxy B -> service (mode tcp)",
            Via::HaproxyTls => {
                "haproxy-tcp-tls: client -> haproxy A -> TLS 1.3 -> haproxy B -> service (mode tcp)"
            }
        }
    }
}

/// Every path's processes, killed when dropped.
struct TunnelPaths {
    service: SocketAddr,
    /// Ours: the l4-proxy's TCP and UDP listeners of the two chains.
    tcp: SocketAddr,
    udp: SocketAddr,
    l4: Process,
    tcp_sidecar: Process,
    haproxy: TwoHops,
    haproxy_tls: TwoHops,
    pinned: String,
    _held: (Process, Process, Lookup, TempDir),
    /// Held: this process stays on its CPU until the paths are dropped.
    _pinning: Option<Pinning>,
}

/// Starts an `l4-proxy` on loopback with `args` after the common flags; returns it and the
/// line `wanted` picks.
async fn start_l4(
    bootstrap: &str,
    args: &[&str],
    prefix: &str,
) -> anyhow::Result<(Process, String)> {
    let mut all = vec![
        "--bootstrap",
        bootstrap,
        "--ephemeral",
        "--p2p-listen-addr",
        "127.0.0.1:0",
        "--prom-listen-addr",
        "127.0.0.1:0",
        "--quic-addr",
        "127.0.0.1:0",
    ];
    all.extend_from_slice(args);
    spawn_reading_with(
        &sibling_binary("l4-proxy")?,
        &all,
        Extra::default(),
        |line| line.strip_prefix(prefix).map(str::to_owned),
    )
    .await
}

/// The chain `spec`'s listener, asked of the control API at `control`.
async fn chain_listener(control: &str, spec: &str) -> anyhow::Result<SocketAddr> {
    let (status, body) = testkit::http_get(control, spec)
        .await
        .with_context(|| format!("{spec}: the control API at {control} does not answer"))?;
    anyhow::ensure!(status == 200, "{spec}: answered {status}: {body}");
    body.trim()
        .parse()
        .with_context(|| format!("{spec}: {body}"))
}

impl TunnelPaths {
    async fn start() -> anyhow::Result<Self> {
        foreign::require("haproxy")?;
        let pinning = Pinning::new();
        let paths = pinning
            .start_pinned(async {
                let lookup = Lookup::start().await?;
                let artifact = lookup.dir.path().join("artifact");
                // A placeholder program (add refuses what is not one): instances are started
                // by the benchmark, never from the record.
                std::fs::write(&artifact, "#!/bin/sh\n# bench-l4 placeholder\nexit 1\n")?;
                let artifact = artifact.to_str().context("path")?;
                for (name, protocol) in [(TCP_SERVICE, "tcp"), (UDP_SERVICE, "udp")] {
                    lookup
                        .add(&["--exec", artifact, "--protocol", protocol, name])
                        .await?;
                }
                let (service_process, service) =
                    spawn_reading(&std::env::current_exe()?, &["serve-l4"], |line| {
                        line.strip_prefix("listening: ")?.parse::<SocketAddr>().ok()
                    })
                    .await?;
                let bootstrap = lookup.bootstrap.clone();
                let at = service.to_string();
                let quic = "data plane (QUIC): ";
                let (tcp_sidecar, _) = start_l4(
                    &bootstrap,
                    &["--protocol", "tcp", "0", TCP_SERVICE, &at],
                    quic,
                )
                .await?;
                let (udp_sidecar, _) = start_l4(
                    &bootstrap,
                    &["--protocol", "udp", "0", UDP_SERVICE, &at],
                    quic,
                )
                .await?;
                let (l4, control) = start_l4(&bootstrap, &["0"], "l4 control API: http://").await?;
                let tcp = chain_listener(&control, &format!("/tcp/{TCP_SERVICE}")).await?;
                let udp = chain_listener(&control, &format!("/udp/{UDP_SERVICE}")).await?;

                let dir = tempfile::tempdir()?;
                let tls = foreign::Tls::generate(dir.path())?;
                let haproxy = foreign::launch_haproxy(
                    "haproxy-tcp",
                    dir.path(),
                    service,
                    None,
                    Mode::Tcp,
                    1,
                )?;
                let haproxy_tls = foreign::launch_haproxy(
                    "haproxy-tcp-tls",
                    dir.path(),
                    service,
                    Some(&tls),
                    Mode::Tcp,
                    1,
                )?;
                anyhow::Ok(Self {
                    service,
                    tcp,
                    udp,
                    l4,
                    tcp_sidecar,
                    haproxy,
                    haproxy_tls,
                    pinned: String::new(),
                    _held: (service_process, udp_sidecar, lookup, dir),
                    _pinning: None,
                })
            })
            .await?;
        let mut paths = paths;
        for via in Via::ALL {
            paths.wait_ready(via).await?;
        }
        paths.wait_udp_ready().await?;
        let mut processes: Vec<(String, u32)> = vec![
            ("bench (load)".into(), std::process::id()),
            ("l4-proxy".into(), paths.l4.pid),
            ("sidecar".into(), paths.tcp_sidecar.pid),
        ];
        for (name, hops) in [
            ("haproxy", &paths.haproxy),
            ("haproxy-tls", &paths.haproxy_tls),
        ] {
            processes.push((format!("{name} A"), hops.first.pid));
            processes.push((format!("{name} B"), hops.second.pid));
        }
        paths.pinned = pinning.describe(&processes);
        paths._pinning = Some(pinning);
        Ok(paths)
    }

    /// Until a datagram is echoed through ours (the UDP chain's instance found).
    async fn wait_udp_ready(&self) -> anyhow::Result<()> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        socket.connect(self.udp).await?;
        let deadline = Instant::now() + READY_WITHIN;
        let mut buffer = [0; 64];
        while Instant::now() < deadline {
            socket.send(b"ready?").await?;
            let answer = tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buffer));
            if let Ok(Ok(_)) = answer.await {
                return Ok(());
            }
        }
        bail!("ours did not echo a datagram within {READY_WITHIN:?}")
    }

    /// Where a client of `via` connects over TCP.
    fn tcp(&self, via: Via) -> SocketAddr {
        match via {
            Via::Direct => self.service,
            Via::Ours => self.tcp,
            Via::Haproxy => self.haproxy.listen(),
            Via::HaproxyTls => self.haproxy_tls.listen(),
        }
    }

    /// Until an echo round trip through `via` works.
    async fn wait_ready(&self, via: Via) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let attempt = tokio::time::timeout(Duration::from_secs(5), echo(self.tcp(via), 1));
            let last = match attempt.await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(error)) => error.to_string(),
                Err(_) => "no answer".to_owned(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} did not carry an echo within {READY_WITHIN:?}: {last}",
                    via.name()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The PIDs of `via`'s two hops.
    fn hop_pids(&self, via: Via) -> Option<(u32, u32)> {
        match via {
            Via::Direct => None,
            Via::Ours => Some((self.l4.pid, self.tcp_sidecar.pid)),
            Via::Haproxy => Some((self.haproxy.first.pid, self.haproxy.second.pid)),
            Via::HaproxyTls => Some((self.haproxy_tls.first.pid, self.haproxy_tls.second.pid)),
        }
    }

    async fn stop(self) {
        self.haproxy.stop().await;
        self.haproxy_tls.stop().await;
    }
}

/// Opens a connection to `addr` and says what it is for.
async fn open(addr: SocketAddr, mode: u8, length: Option<u64>) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut head = vec![mode];
    if let Some(length) = length {
        head.extend_from_slice(&length.to_be_bytes());
    }
    stream.write_all(&head).await?;
    Ok(stream)
}

/// `bytes` downloaded through `addr`; how long to the end.
async fn download(addr: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let begin = Instant::now();
    let mut stream = open(addr, b'D', Some(bytes)).await?;
    let mut buffer = vec![0; 256 * 1024];
    let mut received = 0;
    loop {
        match stream.read(&mut buffer).await? {
            0 => break,
            n => received += n as u64,
        }
    }
    anyhow::ensure!(received == bytes, "received {received} of {bytes} bytes");
    Ok(begin.elapsed())
}

/// `bytes` uploaded through `addr`; how long until the service said it had them all.
async fn upload(addr: SocketAddr, bytes: u64) -> anyhow::Result<Duration> {
    let begin = Instant::now();
    let mut stream = open(addr, b'U', Some(bytes)).await?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(FILLER.len() as u64) as usize;
        stream.write_all(&FILLER[..n]).await?;
        left -= n as u64;
    }
    let counted = stream.read_u64().await?;
    anyhow::ensure!(
        counted == bytes,
        "the service read {counted} of {bytes} bytes"
    );
    Ok(begin.elapsed())
}

/// Starts a download of `bytes` through `addr`, reads its first MiB, then nothing for
/// [`STALL`]; returns the connection, still open (the caller reads the hops' memory first).
async fn stall(addr: SocketAddr, bytes: u64) -> anyhow::Result<TcpStream> {
    let mut stream = open(addr, b'D', Some(bytes)).await?;
    let mut buffer = vec![0; 64 * 1024];
    let mut received = 0;
    while received < (1 << 20).min(bytes) {
        match stream.read(&mut buffer).await? {
            0 => bail!("the download ended after {received} bytes"),
            n => received += n as u64,
        }
    }
    tokio::time::sleep(STALL).await;
    Ok(stream)
}

/// `round_trips` echoes of [`ECHO_BYTES`] on one connection through `addr`; each one's time.
async fn echo(addr: SocketAddr, round_trips: usize) -> anyhow::Result<Vec<Duration>> {
    let mut stream = open(addr, b'E', None).await?;
    let message = [b'e'; ECHO_BYTES];
    let mut back = [0; ECHO_BYTES];
    let mut times = Vec::with_capacity(round_trips);
    for _ in 0..round_trips {
        let begin = Instant::now();
        stream.write_all(&message).await?;
        stream.read_exact(&mut back).await?;
        times.push(begin.elapsed());
    }
    Ok(times)
}

/// Datagrams sent at `rate` a second for `duration` to `addr`, and how many came back.
async fn udp_load(addr: SocketAddr, rate: u64, duration: Duration) -> anyhow::Result<(u64, u64)> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    // Buffers as large as the proxies': a loss is then theirs, not the load generator's.
    proxy::transport::size_socket_buffers(&socket);
    let socket = std::sync::Arc::new(socket);
    socket.connect(addr).await?;
    let receiver = {
        let socket = std::sync::Arc::clone(&socket);
        tokio::spawn(async move {
            let mut buffer = vec![0; 65536];
            let mut received = 0u64;
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buffer)).await
            {
                received += 1;
            }
            received
        })
    };
    let datagram = [b'u'; DATAGRAM_BYTES];
    // A tick every millisecond, each sending what the rate owes by then.
    let begin = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while begin.elapsed() < duration {
        tick.tick().await;
        let owed = (begin.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < owed {
            // A full socket buffer drops it, as a real sender at a fixed rate would.
            let _ = socket.send(&datagram).await;
            sent += 1;
        }
    }
    Ok((sent, receiver.await?))
}

/// Bounds a transfer in time.
async fn timed<T>(transfer: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::time::timeout(TRANSFER_TIMEOUT, transfer)
        .await
        .with_context(|| format!("not done within {TRANSFER_TIMEOUT:?}"))?
}

fn cpu_of(pids: Option<(u32, u32)>) -> anyhow::Result<Duration> {
    Ok(match pids {
        Some((a, b)) => cpu_time(a)? + cpu_time(b)?,
        None => Duration::ZERO,
    })
}

fn switches_of(pids: Option<(u32, u32)>) -> anyhow::Result<u64> {
    Ok(match pids {
        Some((a, b)) => context_switches(a)? + context_switches(b)?,
        None => 0,
    })
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("tunnel");
    let paths = TunnelPaths::start().await?;
    let size = args.bytes as f64 / (1 << 20) as f64;
    outln!(
        out,
        "## Layer-4 tunnels: TCP through each path, UDP through ours\n\n`{command}`\n\n\
         A TCP service (`bench serve-l4`) behind: {}. One download and one upload of {size:.0} \
         MiB per path on one connection each, then {} echo round trips of {ECHO_BYTES} bytes \
         on one connection (the added latency is the path's percentile less direct's); the \
         CPU of both hops over the two transfers, per GiB, and over the echoes, per 1000, with \
         their context switches per echo; the peak RSS (VmHWM) of each hop after everything. Each haproxy is one process with `nbthread 1`; ours is one thread \
         per proxy (`--worker-threads 1`). CPU: {}.\n",
        Via::ALL.map(Via::describe).join("; "),
        args.round_trips,
        paths.pinned
    );
    outln!(
        out,
        "| path | download | upload | CPU of both hops per GiB | echo p50 | echo p99 | added p50 | added p99 | CPU of both hops per 1000 echoes | their context switches per echo | first hop peak RSS | second hop peak RSS |"
    );
    outln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let gib = args.bytes as f64 * 2.0 / (1u64 << 30) as f64;
    let mut direct_echo = (Duration::ZERO, Duration::ZERO);
    let (mut downs, mut ups, mut cpus, mut added50, mut added99, mut peaks) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut echo_cpus, mut echo_switches) = (vec![], vec![]);
    for via in Via::ALL {
        let addr = paths.tcp(via);
        let pids = paths.hop_pids(via);
        let cpu_before = cpu_of(pids)?;
        let down = timed(download(addr, args.bytes))
            .await
            .with_context(|| format!("download through {}", via.name()))?;
        let up = timed(upload(addr, args.bytes))
            .await
            .with_context(|| format!("upload through {}", via.name()))?;
        let cpu = (cpu_of(pids)? - cpu_before).as_secs_f64() / gib;
        let (cpu_before, switches_before) = (cpu_of(pids)?, switches_of(pids)?);
        let mut times = timed(echo(addr, args.round_trips))
            .await
            .with_context(|| format!("echo through {}", via.name()))?;
        let echoes = args.round_trips.max(1) as f64;
        let echo_cpu = (cpu_of(pids)? - cpu_before).as_secs_f64() * 1e3 / echoes * 1000.0;
        let switches = (switches_of(pids)? - switches_before) as f64 / echoes;
        let (p50, p99) = (percentile(&mut times, 50.0), percentile(&mut times, 99.0));
        if via == Via::Direct {
            direct_echo = (p50, p99);
        }
        let (a50, a99) = (
            p50.saturating_sub(direct_echo.0),
            p99.saturating_sub(direct_echo.1),
        );
        let hop_peaks = match pids {
            Some((a, b)) => Some((status_kb(a, "VmHWM")?, status_kb(b, "VmHWM")?)),
            None => None,
        };
        let (first, second) =
            hop_peaks.map_or((String::new(), String::new()), |(a, b)| (mib(a), mib(b)));
        let (cpu_text, a50_text, a99_text, echo_cpu_text, switches_text) = if via == Via::Direct {
            Default::default()
        } else {
            (
                format!("{cpu:.2} s"),
                ms2(a50),
                ms2(a99),
                format!("{echo_cpu:.0} ms"),
                format!("{switches:.1}"),
            )
        };
        outln!(
            out,
            "| {} | {:.0} MiB/s | {:.0} MiB/s | {cpu_text} | {} | {} | {a50_text} | {a99_text} | {echo_cpu_text} | {switches_text} | {first} | {second} |",
            via.name(),
            mib_per_s(args.bytes, down),
            mib_per_s(args.bytes, up),
            ms2(p50),
            ms2(p99),
        );
        if via != Via::Direct {
            let name = via.name();
            downs.push((name, mib_per_s(args.bytes, down)));
            ups.push((name, mib_per_s(args.bytes, up)));
            cpus.push((name, cpu));
            added50.push((name, a50.as_secs_f64() * 1e3));
            added99.push((name, a99.as_secs_f64() * 1e3));
            echo_cpus.push((name, echo_cpu));
            echo_switches.push((name, switches));
            if let Some((a, b)) = hop_peaks {
                peaks.push((name, a.max(b) as f64 / 1024.0));
            }
        }
    }
    outln!(out);
    compare(out, "download throughput", "MiB/s", Better::Higher, &downs);
    compare(out, "upload throughput", "MiB/s", Better::Higher, &ups);
    compare(out, "CPU of both hops per GiB", "s", Better::Lower, &cpus);
    compare(out, "added echo p50", "ms", Better::Lower, &added50);
    compare(out, "added echo p99", "ms", Better::Lower, &added99);
    compare(
        out,
        "CPU of both hops per 1000 echoes",
        "ms",
        Better::Lower,
        &echo_cpus,
    );
    compare(
        out,
        "context switches of both hops per echo",
        "",
        Better::Lower,
        &echo_switches,
    );
    compare(
        out,
        "largest peak RSS of one hop",
        "MiB",
        Better::Lower,
        &peaks,
    );
    outln!(out);

    outln!(
        out,
        "A client that stops reading: a download of {size:.0} MiB read for its first MiB, then \
         not at all for {} s; each hop's resident memory (VmRSS) just before the download and \
         at the end of the stall (what a slow reader makes a hop hold):\n",
        STALL.as_secs()
    );
    outln!(out, "| path | first hop | second hop |");
    outln!(out, "|---|---|---|");
    for via in [Via::Ours, Via::Haproxy, Via::HaproxyTls] {
        let Some((a, b)) = paths.hop_pids(via) else {
            continue;
        };
        let before = (status_kb(a, "VmRSS")?, status_kb(b, "VmRSS")?);
        let stalled = timed(stall(paths.tcp(via), args.bytes))
            .await
            .with_context(|| format!("stalled download through {}", via.name()));
        let after = (status_kb(a, "VmRSS")?, status_kb(b, "VmRSS")?);
        drop(stalled?);
        outln!(
            out,
            "| {} | {} -> {} | {} -> {} |",
            via.name(),
            mib(before.0),
            mib(after.0),
            mib(before.1),
            mib(after.1)
        );
    }
    outln!(out);

    outln!(
        out,
        "UDP: datagrams of {DATAGRAM_BYTES} bytes at a fixed rate for {:.0} s from one client \
         socket, each echoed by the service (haproxy carries no UDP); the load generator's and \
         the service's sockets have the proxies' buffer sizes (4 MiB asked), so that a loss is \
         the path's:\n",
        args.udp_duration.as_secs_f64()
    );
    outln!(
        out,
        "| rate | path | sent | echoed | loss | echoed a second |"
    );
    outln!(out, "|---|---|---|---|---|---|");
    for &rate in &args.udp_rates {
        for (name, addr) in [("direct", paths.service), ("ours", paths.udp)] {
            let (sent, echoed) = udp_load(addr, rate, args.udp_duration).await?;
            let loss = 1.0 - echoed as f64 / sent.max(1) as f64;
            outln!(
                out,
                "| {rate}/s | {name} | {sent} | {echoed} | {:.2} % | {:.0} |",
                loss * 100.0,
                echoed as f64 / args.udp_duration.as_secs_f64()
            );
        }
    }
    outln!(out);
    paths.stop().await;
    Ok(())
}
