//! The request path through the data plane, built from the release binaries as processes: a
//! ping-monitor (bootstrap), an hl-service (lookup) where hl-cli registers `bench-echo`, the
//! test service (`bench serve`), its sidecar proxy and an ingress proxy. Then the
//! `proxy-latency` scenario: latency at a fixed request rate straight to the service and
//! through ingress -> QUIC -> sidecar, the proxies' CPU per request and peak memory, and the
//! most requests a second each path takes.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use http::{StatusCode, Uri};
use tempfile::TempDir;

use crate::{
    load::{self, ClosedLoop, OpenLoop},
    procs::{
        Daemon, Extra, Process, cpu_time, mib, run_measured, sibling_binary, spawn_reading_with,
        start_monitor_and_lookup, status_kb,
    },
    serve,
    stats::{histogram_percentiles, ms2, print_table},
};

/// The service registered with the lookup and served behind the sidecar.
const SERVICE: &str = "bench-echo";
/// How long the ingress may take to find the sidecar's instance.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Every process of the path, killed when this is dropped.
pub struct ProxyPath {
    /// Where the service listens, for requests that bypass the proxies.
    pub service: SocketAddr,
    /// The ingress proxy's HTTP listener.
    pub ingress: SocketAddr,
    pub ingress_pid: u32,
    pub sidecar_pid: u32,
    /// The service process (`bench serve`).
    pub service_pid: u32,
    /// Held so they live as long as the path: the proxies, the service, the lookup and the
    /// bootstrap.
    _held: (Process, Process, Process, Lookup),
}

/// A ping-monitor (the bootstrap) and an hl-service (the lookup) with its data directory,
/// killed when dropped.
pub struct Lookup {
    /// The bootstrap's multiaddr, for `--bootstrap`.
    pub bootstrap: String,
    /// Held so they live as long as this (killed before the directory is removed).
    _daemons: (Daemon, Daemon),
    /// A temporary directory removed when dropped (the lookup's data is under it).
    pub dir: TempDir,
}

impl Lookup {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (monitor, lookup) = start_monitor_and_lookup(&dir.path().join("lookup")).await?;
        let bootstrap = monitor.bootstrap.to_string();
        Ok(Self {
            bootstrap,
            _daemons: (lookup, monitor),
            dir,
        })
    }

    /// Registers a service: `hl-cli --bootstrap B add ARGS...`.
    pub async fn add(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec![
            "--bootstrap".to_owned(),
            self.bootstrap.clone(),
            "add".into(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        tokio::task::spawn_blocking(move || {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            run_measured("hl-cli", &all)
        })
        .await??;
        Ok(())
    }
}

/// Peak RSS (VmHWM) of the two proxies, in kB.
pub struct Peaks {
    pub ingress: u64,
    pub sidecar: u64,
}

impl ProxyPath {
    /// Starts every process and waits until a request through the ingress is answered.
    pub async fn start() -> anyhow::Result<Self> {
        let lookup = Lookup::start().await?;
        // The record needs an artifact; the service is never started from it.
        let artifact = lookup.dir.path().join("artifact");
        std::fs::write(&artifact, b"bench-echo artifact\n")?;
        lookup
            .add(&["--exec", artifact.to_str().context("path")?, SERVICE])
            .await?;
        let bootstrap = lookup.bootstrap.clone();

        let (service_process, service) = serve::start().await?;
        let (sidecar, _) = start_proxy(&bootstrap, &[SERVICE, &service.to_string()]).await?;
        let (ingress_proxy, ingress) = start_proxy(&bootstrap, &[]).await?;
        let path = Self {
            service,
            ingress,
            ingress_pid: ingress_proxy.pid,
            sidecar_pid: sidecar.pid,
            service_pid: service_process.pid,
            _held: (ingress_proxy, sidecar, service_process, lookup),
        };
        path.wait_ready().await?;
        Ok(path)
    }

    /// `path` on the service itself.
    pub fn direct(&self, path: &str) -> Uri {
        format!("http://{}{path}", self.service)
            .parse()
            .expect("valid URI")
    }

    /// `path` on the service through the ingress and the sidecar.
    pub fn through_proxies(&self, path: &str) -> Uri {
        format!("http://{}/{SERVICE}{path}", self.ingress)
            .parse()
            .expect("valid URI")
    }

    pub fn peaks(&self) -> anyhow::Result<Peaks> {
        Ok(Peaks {
            ingress: status_kb(self.ingress_pid, "VmHWM")?,
            sidecar: status_kb(self.sidecar_pid, "VmHWM")?,
        })
    }

    /// Until the ingress has found the sidecar (through the lookup's record and the DHT).
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client: load::GetClient = load::client();
        let uri = self.through_proxies("/ready");
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let answer = tokio::time::timeout_at(deadline.into(), client.get(uri.clone())).await;
            let last = match answer {
                Ok(Ok(response)) if response.status() == StatusCode::OK => return Ok(()),
                Ok(Ok(response)) => format!("answered {}", response.status()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer".to_owned(),
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "the ingress did not reach {SERVICE} within {READY_WITHIN:?}: {last}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Starts a proxy on loopback (ingress on a free port; a sidecar with `service` given as
/// `[SERVICE, ADDR]`); returns it and its ingress address once its data plane is up.
async fn start_proxy(bootstrap: &str, service: &[&str]) -> anyhow::Result<(Process, SocketAddr)> {
    start_proxy_with(bootstrap, service, Extra::default()).await
}

/// [`start_proxy`] with `extra` (its logs kept, say).
pub async fn start_proxy_with(
    bootstrap: &str,
    service: &[&str],
    extra: Extra<'_>,
) -> anyhow::Result<(Process, SocketAddr)> {
    let mut args = vec![
        "--bootstrap",
        bootstrap,
        "--ephemeral",
        "--p2p-listen-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--quic-addr",
        "127.0.0.1:0",
        "0",
    ];
    args.extend_from_slice(service);
    // The ingress line comes first, the data plane's once everything listens.
    let mut ingress = None;
    spawn_reading_with(&sibling_binary("proxy")?, &args, extra, |line| {
        if let Some(addr) = line.strip_prefix("ingress: http://") {
            ingress = addr.parse().ok();
        }
        line.starts_with("data plane (QUIC): ")
            .then_some(ingress)
            .flatten()
    })
    .await
}

#[derive(clap::Args)]
pub struct Args {
    /// Requests a second of the open-loop runs.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Measured length of each open-loop run.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unrecorded load before each open-loop run (connections, caches, the instance's RTTs).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Concurrent workers of the closed-loop (throughput) runs.
    #[arg(long, default_value_t = 32)]
    workers: usize,
    /// Length of each closed-loop run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    closed_duration: Duration,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            rate: 1000,
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(3),
            workers: 32,
            closed_duration: Duration::from_secs(5),
        }
    }
}

const PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 100.0];

/// CPU time (user + system) of each proxy per 1000 requests of the measured open loop.
struct CpuPer1000 {
    ingress: Duration,
    sidecar: Duration,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let path = ProxyPath::start().await?;
    let client: load::GetClient = load::client();
    let (direct_uri, ours_uri) = (path.direct("/echo"), path.through_proxies("/echo"));
    let open = |uri: Uri, duration| load::open_loop(&client, uri, args.rate, duration);

    open(direct_uri.clone(), args.warmup).await?;
    let direct = open(direct_uri.clone(), args.duration).await?;
    open(ours_uri.clone(), args.warmup).await?;
    let cpu_before = (cpu_time(path.ingress_pid)?, cpu_time(path.sidecar_pid)?);
    let ours = open(ours_uri.clone(), args.duration).await?;
    let per_1000 =
        |cpu: Duration, before: Duration| (cpu - before).mul_f64(1000.0 / ours.sent as f64);
    let cpu = CpuPer1000 {
        ingress: per_1000(cpu_time(path.ingress_pid)?, cpu_before.0),
        sidecar: per_1000(cpu_time(path.sidecar_pid)?, cpu_before.1),
    };
    let open_peaks = path.peaks()?;

    let closed = |uri: Uri| load::closed_loop(&client, uri, args.workers, args.closed_duration);
    let direct_max = closed(direct_uri).await?;
    let ours_max = closed(ours_uri).await?;
    let closed_peaks = path.peaks()?;

    println!(
        "### Data plane: {} requests/s open loop for {:.0} s, 1 KiB responses\n",
        args.rate,
        args.duration.as_secs_f64()
    );
    print_latency(&direct, &ours);
    print_footprint(&cpu, &open_peaks, &closed_peaks);
    print_throughput(args.workers, &direct_max, &ours_max);
    Ok(())
}

fn print_latency(direct: &OpenLoop, ours: &OpenLoop) {
    let direct_at = histogram_percentiles(&direct.latency, &PERCENTILES);
    let ours_at = histogram_percentiles(&ours.latency, &PERCENTILES);
    let added: Vec<String> = ours_at
        .iter()
        .zip(&direct_at)
        .map(|(o, d)| {
            let diff = o.as_secs_f64() - d.as_secs_f64();
            format!("{:+.2}", diff * 1e3)
        })
        .collect();
    print_table(
        "path",
        &PERCENTILES,
        &[
            (
                "direct: client -> service",
                direct_at.into_iter().map(ms2).collect(),
            ),
            (
                "ours: client -> ingress -> QUIC -> sidecar -> service",
                ours_at.into_iter().map(ms2).collect(),
            ),
            ("added by the two proxies", added),
        ],
    );
    for (name, run) in [("direct", direct), ("ours", ours)] {
        println!(
            "{name}: {} requests, {} errors{}",
            run.sent,
            run.errors,
            run.first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    println!();
}

fn print_footprint(cpu: &CpuPer1000, open: &Peaks, closed: &Peaks) {
    println!("| measure | ingress | sidecar |");
    println!("|---|---|---|");
    println!(
        "| CPU per 1000 requests (open loop) | {:.3} s | {:.3} s |",
        cpu.ingress.as_secs_f64(),
        cpu.sidecar.as_secs_f64()
    );
    println!(
        "| peak RSS (VmHWM) after the open loop | {} | {} |",
        mib(open.ingress),
        mib(open.sidecar)
    );
    println!(
        "| peak RSS (VmHWM) after the closed loop | {} | {} |",
        mib(closed.ingress),
        mib(closed.sidecar)
    );
    println!();
}

fn print_throughput(workers: usize, direct: &ClosedLoop, ours: &ClosedLoop) {
    println!("| closed loop, {workers} workers | requests/s | errors |");
    println!("|---|---|---|");
    for (name, run) in [("direct", direct), ("ours", ours)] {
        println!("| {name} | {:.0} | {} |", run.per_second(), run.errors);
    }
    println!();
}
