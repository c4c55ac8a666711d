//! The `protocols` scenario (issue 17): what crossing both proxies (ingress -> QUIC ->
//! sidecar) costs a WebSocket message, a server-sent event and a gRPC call, against the same
//! exchange straight to the service; for gRPC also against two nginx hops (`grpc_pass`) and
//! two haproxy hops (HTTP/2 on both sides), with the CPU both hops spent.
//!
//! The services run in this process (a WebSocket echo, an event stream, testkit-grpc's Talk
//! service), so an event's write and its arrival are read off one clock. Nothing is pinned:
//! the figures are for comparing paths measured in the same run, one after the other.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::Channel;

use crate::{
    foreign::{self, TwoHops},
    procs::{Extra, cpu_time},
    proxy_path::{Lookup, start_proxy_with},
    report::{Report, outln},
    stats::percentile,
};

const WEBSOCKET: &str = "bench-ws";
const EVENTS: &str = "bench-events";
const GRPC: &str = "bench-grpc";
/// How long a path may take to answer its first exchange.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// Between two events of the stream.
const EVENT_INTERVAL: Duration = Duration::from_millis(2);

#[derive(clap::Args)]
pub struct Args {
    /// WebSocket round trips, and events, measured per path (after a tenth as many
    /// unrecorded).
    #[arg(long, default_value_t = 5000)]
    messages: usize,
    /// Sequential gRPC unary calls measured per path (after a tenth as many unrecorded).
    #[arg(long, default_value_t = 5000)]
    calls: usize,
    /// Concurrent callers of the gRPC closed loop (on one HTTP/2 connection per path).
    #[arg(long, default_value_t = 32)]
    callers: usize,
    /// Length of the gRPC closed loop per path.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            messages: 5000,
            calls: 5000,
            callers: 32,
            duration: Duration::from_secs(5),
        }
    }
}

impl Args {
    /// Proves the scenario runs, measures nothing worth keeping.
    pub fn quick() -> Self {
        Self {
            messages: 200,
            calls: 200,
            callers: 4,
            duration: Duration::from_millis(500),
        }
    }
}

/// p50, p90, p99 and the largest of `samples`, in ms.
fn quantiles(samples: &mut [Duration]) -> String {
    let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
    let max = samples.iter().max().copied().unwrap_or_default();
    format!(
        "{} | {} | {} | {}",
        ms(percentile(samples, 50.0)),
        ms(percentile(samples, 90.0)),
        ms(percentile(samples, 99.0)),
        ms(max)
    )
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("protocols");
    let lookup = Lookup::with_service(WEBSOCKET).await?;
    let artifact = lookup.dir.path().join("artifact");
    let artifact = artifact.to_str().context("path")?;
    for service in [EVENTS, GRPC] {
        lookup.add(&["--exec", artifact, service]).await?;
    }
    let websocket = websocket_service().await?;
    let started = Instant::now();
    let events = event_service(started, args.messages + args.messages / 10).await?;
    let (grpc, _) = testkit_grpc::serve().await?;

    let bootstrap = &lookup.bootstrap;
    let sidecar = |flags: &'static [&'static str], name: &'static str, addr: SocketAddr| {
        let addr = addr.to_string();
        async move { start_proxy_with(bootstrap, flags, &[name, &addr], Extra::default()).await }
    };
    let _ws_sidecar = sidecar(&[], WEBSOCKET, websocket).await?;
    let _events_sidecar = sidecar(&[], EVENTS, events).await?;
    let grpc_sidecar = sidecar(&["--protocol", "h2c"], GRPC, grpc).await?;
    let ingress = start_proxy_with(bootstrap, &[], &[], Extra::default()).await?;

    outln!(
        out,
        "## Protocols through the proxies: WebSocket, server-sent events, gRPC"
    );
    outln!(out);
    outln!(
        out,
        "`{command}`. Services in the benchmark's process on loopback; ours is client -> \
         ingress -> QUIC -> sidecar -> service; nothing pinned; paths measured one after the \
         other. Times in ms: p50 | p90 | p99 | max."
    );
    outln!(out);

    // WebSocket: one message out, its echo back, one at a time.
    outln!(
        out,
        "| WebSocket round trip ({} messages of 64 bytes) | p50 | p90 | p99 | max |",
        args.messages
    );
    outln!(out, "|---|---|---|---|---|");
    for (name, url) in [
        ("direct", format!("ws://{websocket}/")),
        ("ours", format!("ws://{}/{WEBSOCKET}/", ingress.ingress)),
    ] {
        let mut samples = websocket_round_trips(&url, args.messages).await?;
        outln!(out, "| {name} | {} |", quantiles(&mut samples));
    }
    outln!(out);

    // Server-sent events: written every 2 ms, each timed from its write to its arrival.
    outln!(
        out,
        "| server-sent event, write to arrival ({} events) | p50 | p90 | p99 | max |",
        args.messages
    );
    outln!(out, "|---|---|---|---|---|");
    for (name, addr, path) in [
        ("direct", events, "/stream".to_owned()),
        ("ours", ingress.ingress, format!("/{EVENTS}/stream")),
    ] {
        let mut samples = event_delays(addr, &path, started, args.messages).await?;
        outln!(out, "| {name} | {} |", quantiles(&mut samples));
    }
    outln!(out);

    // gRPC unary: sequential latency, then a closed loop with the CPU of both hops.
    let dir = tempfile::tempdir()?;
    let nginx = foreign::start_nginx_grpc(dir.path(), grpc)?;
    let haproxy = foreign::launch_haproxy(
        "haproxy-grpc",
        dir.path(),
        grpc,
        None,
        foreign::Mode::Grpc,
        1,
    )?;
    let ours_pids = (ingress.process.pid, grpc_sidecar.process.pid);
    outln!(
        out,
        "| gRPC unary call ({} sequential; closed loop: {} callers, {:?}) | p50 | p90 | p99 | max | calls/s | CPU of both hops per 1000 calls (s) |",
        args.calls,
        args.callers,
        args.duration
    );
    outln!(out, "|---|---|---|---|---|---|---|");
    let paths: [(&str, SocketAddr, &str, Option<Hops<'_>>); 4] = [
        ("direct", grpc, "", None),
        ("ours", ingress.ingress, GRPC, Some(Hops::Ours(ours_pids))),
        (
            "nginx (grpc_pass)",
            nginx.listen(),
            "",
            Some(Hops::Foreign(&nginx)),
        ),
        (
            "haproxy (h2)",
            haproxy.listen(),
            "",
            Some(Hops::Foreign(&haproxy)),
        ),
    ];
    for (name, addr, prefix, hops) in paths {
        let client = grpc_client(addr, prefix).await.with_context(|| {
            format!(
                "gRPC through {name}: {}",
                foreign::logs_of(name, dir.path())
            )
        })?;
        let mut samples = grpc_calls(&client, args.calls).await?;
        let before = match &hops {
            Some(hops) => Some(hops.cpu()?),
            None => None,
        };
        let calls = grpc_closed_loop(&client, args.callers, args.duration).await?;
        let cpu = match (&hops, before) {
            (Some(hops), Some(before)) => {
                let spent = hops.cpu()?.saturating_sub(before);
                format!("{:.3}", spent.as_secs_f64() * 1000.0 / calls.max(1) as f64)
            }
            _ => "-".to_owned(),
        };
        let per_second = calls as f64 / args.duration.as_secs_f64();
        outln!(
            out,
            "| {name} | {} | {per_second:.0} | {cpu} |",
            quantiles(&mut samples)
        );
    }
    outln!(out);
    nginx.stop().await;
    haproxy.stop().await;
    Ok(())
}

/// The two hops of a path, for their CPU time.
enum Hops<'a> {
    Ours((u32, u32)),
    Foreign(&'a TwoHops),
}

impl Hops<'_> {
    fn cpu(&self) -> anyhow::Result<Duration> {
        Ok(match self {
            Hops::Ours((a, b)) => cpu_time(*a)? + cpu_time(*b)?,
            Hops::Foreign(hops) => {
                let (a, b) = hops.cpu()?;
                a + b
            }
        })
    }
}

/// A WebSocket service echoing every message (the sidecar's liveness checks connect and
/// close: those fail the handshake and are let go).
async fn websocket_service() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let Ok(socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let (mut out, mut incoming) = socket.split();
                while let Some(Ok(message)) = incoming.next().await {
                    if message.is_close() || out.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// An event stream: each request gets `count` events, one every [`EVENT_INTERVAL`], each
/// carrying the time it was written (microseconds since `epoch`).
async fn event_service(epoch: Instant, count: usize) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                if testkit::read_request_head(&mut stream).await.is_none() {
                    return;
                }
                let start = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                              transfer-encoding: chunked\r\n\r\n";
                if stream.write_all(start).await.is_err() {
                    return;
                }
                let mut tick = tokio::time::interval(EVENT_INTERVAL);
                for _ in 0..count {
                    tick.tick().await;
                    let event = format!("data: {}\n\n", epoch.elapsed().as_micros());
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
                let _ = stream.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    Ok(addr)
}

/// `count` round trips of a 64-byte message on a WebSocket to `url` (after unrecorded ones),
/// once it connects.
async fn websocket_round_trips(url: &str, count: usize) -> anyhow::Result<Vec<Duration>> {
    let deadline = Instant::now() + READY_WITHIN;
    let mut socket = loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((socket, _)) => break socket,
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, url, "not yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => anyhow::bail!("no WebSocket to {url}: {error}"),
        }
    };
    let payload = "x".repeat(64);
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + count / 10 {
        let sent = Instant::now();
        socket.send(Message::text(payload.clone())).await?;
        match socket.next().await {
            Some(Ok(Message::Text(_))) => {}
            other => anyhow::bail!("no echo through {url}: {other:?}"),
        }
        if i >= count / 10 {
            samples.push(sent.elapsed());
        }
    }
    socket.close(None).await?;
    Ok(samples)
}

/// The delays from write to arrival of `count` events read from `path` at `addr` (after
/// unrecorded ones), once it answers 200.
async fn event_delays(
    addr: SocketAddr,
    path: &str,
    epoch: Instant,
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    let deadline = Instant::now() + READY_WITHIN;
    let mut stream = loop {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut first = [0u8; 12];
        stream.read_exact(&mut first).await?;
        if &first == b"HTTP/1.1 200" {
            break stream;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{path} at {addr} never answered 200"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let skip = count / 10;
    let mut samples = Vec::with_capacity(count);
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    let mut seen = 0;
    while seen < count + skip {
        let n = stream.read(&mut buffer).await?;
        anyhow::ensure!(n > 0, "the event stream ended after {seen} events");
        let now = epoch.elapsed();
        received.extend_from_slice(&buffer[..n]);
        // Every whole `data: MICROS\n\n` in what arrived, whatever chunk lines surround it.
        while let Some(at) = find(&received, b"data: ") {
            let rest = &received[at + 6..];
            let Some(end) = find(rest, b"\n\n") else {
                break;
            };
            let written: u64 = std::str::from_utf8(&rest[..end])?.parse()?;
            if seen >= skip {
                samples.push(now.saturating_sub(Duration::from_micros(written)));
            }
            seen += 1;
            received.drain(..at + 6 + end + 2);
        }
    }
    Ok(samples)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A Talk client through `addr` with the service under `/<prefix>` (none: at the root), once
/// a call is answered.
async fn grpc_client(
    addr: SocketAddr,
    prefix: &str,
) -> anyhow::Result<testkit_grpc::TalkClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
    let origin = if prefix.is_empty() {
        format!("http://{addr}")
    } else {
        format!("http://{addr}/{prefix}")
    };
    let mut client = testkit_grpc::TalkClient::with_origin(channel, origin.parse()?);
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        match client.echo(word()).await {
            Ok(_) => return Ok(client),
            Err(status) if Instant::now() < deadline => {
                tracing::debug!(%status, %addr, "not yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => anyhow::bail!("no gRPC answer through {addr}: {status}"),
        }
    }
}

fn word() -> testkit_grpc::Word {
    testkit_grpc::Word {
        text: "x".repeat(64),
        ..Default::default()
    }
}

/// `count` sequential unary calls' times (after unrecorded ones).
async fn grpc_calls(
    client: &testkit_grpc::TalkClient<Channel>,
    count: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut client = client.clone();
    let mut samples = Vec::with_capacity(count);
    for i in 0..count + count / 10 {
        let sent = Instant::now();
        client.echo(word()).await?;
        if i >= count / 10 {
            samples.push(sent.elapsed());
        }
    }
    Ok(samples)
}

/// Unary calls answered in `length` by `callers` callers calling one after the other.
async fn grpc_closed_loop(
    client: &testkit_grpc::TalkClient<Channel>,
    callers: usize,
    length: Duration,
) -> anyhow::Result<u64> {
    let end = Instant::now() + length;
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut answered = 0u64;
                while Instant::now() < end {
                    client.echo(word()).await?;
                    answered += 1;
                }
                Ok::<_, tonic::Status>(answered)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total)
}
