//! The `side-by-side` scenario: the same service, load generator and rates through four paths
//! on this machine, one run: straight to the service; through our two proxies (ingress ->
//! QUIC -> sidecar, [`ProxyPath`]); through two nginx; through two haproxy. nginx and haproxy
//! are Debian's binaries started here in the foreground with generated configurations in a
//! temporary directory (never their packaged daemons), one process (nginx: one master and one
//! worker; haproxy: one thread) per hop, each keeping its upstream connections alive.
//!
//! For each rate: latency percentiles (open loop, coordinated omission corrected), what each
//! path adds over direct, the CPU each hop spends per 1000 requests; then every hop's peak
//! memory and each path's closed-loop maximum throughput.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use http::{StatusCode, Uri};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::{
    load::{self, ClosedLoop, OpenLoop},
    procs::{cpu_time, mib, status_kb},
    proxy_path::ProxyPath,
    stats::{histogram_percentiles, ms2, print_table},
};

#[derive(clap::Args)]
pub struct Args {
    /// Requests a second of the open-loop runs: repeat the flag or give a list
    /// (`--rates 1000,5000`); one full set of runs per rate.
    #[arg(long = "rates", alias = "rate", value_delimiter = ',')]
    rates: Vec<u32>,
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
    /// Proves the suite runs, measures nothing worth keeping: 1 s warm-up, 2 s runs, 1 s
    /// closed loops, the first rate only.
    #[arg(long)]
    quick: bool,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            rates: vec![1000],
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(3),
            workers: 32,
            closed_duration: Duration::from_secs(5),
            quick: false,
        }
    }
}

const PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 100.0];
/// How long nginx or haproxy may take to answer through both hops.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// One of Debian's proxies, started here: a foreground process (and, for nginx, its worker),
/// stopped with SIGTERM when dropped.
struct Foreign {
    child: Child,
    pid: u32,
}

impl Foreign {
    /// The process and its children (nginx's worker).
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid];
        pids.extend(children(self.pid));
        pids
    }

    /// CPU time (user + system) of the process and its children.
    fn cpu(&self) -> anyhow::Result<Duration> {
        self.pids().into_iter().map(cpu_time).sum()
    }

    /// Summed peak RSS (VmHWM) of the process and its children, in kB.
    fn peak_kb(&self) -> anyhow::Result<u64> {
        self.pids()
            .into_iter()
            .map(|pid| status_kb(pid, "VmHWM"))
            .sum()
    }

    async fn stop(mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: an nginx master stops its worker on the way out. Harmless once
        // it has exited and been waited for (then the call fails with ESRCH, or the PID is
        // not reused this soon).
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: as in `stop`.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        }
    }
}

/// PIDs whose parent is `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// A program on PATH or in the sbin directories (not always on a user's PATH).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn require(name: &str) -> anyhow::Result<PathBuf> {
    find_program(name).with_context(|| {
        format!(
            "`{name}` not found: the side-by-side scenario runs Debian's {name}; install it with \
             `apt-get install -y --no-install-recommends {name}` (package `{name}`)"
        )
    })
}

/// A free port on loopback (the listener is closed again; the proxy binds it right after).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Two proxies of one kind in a row: `first` takes the requests, `second` sends them on to the
/// service.
struct TwoHops {
    first: Foreign,
    second: Foreign,
    listen: SocketAddr,
}

impl TwoHops {
    fn uri(&self, path: &str) -> Uri {
        format!("http://{}{path}", self.listen)
            .parse()
            .expect("valid URI")
    }

    fn cpu(&self) -> anyhow::Result<(Duration, Duration)> {
        Ok((self.first.cpu()?, self.second.cpu()?))
    }

    fn peaks(&self) -> anyhow::Result<(u64, u64)> {
        Ok((self.first.peak_kb()?, self.second.peak_kb()?))
    }

    async fn stop(self) {
        self.first.stop().await;
        self.second.stop().await;
    }
}

/// Starts `program` with `args`, its standard error kept in `log`.
fn spawn_foreign(program: &Path, args: &[&str], log: &Path) -> anyhow::Result<Foreign> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let pid = child.id().context("exited at once")?;
    Ok(Foreign { child, pid })
}

fn nginx_config(dir: &Path, name: &str, listen: u16, upstream: SocketAddr) -> String {
    let dir = dir.display();
    // As root, nginx would run its worker as `nobody`, who cannot use the temporary directory.
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root root;"
    } else {
        ""
    };
    format!(
        "{user}
worker_processes 1;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
    keepalive_requests 1000000;
    upstream next {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://next;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}

fn haproxy_config(listen: u16, upstream: SocketAddr) -> String {
    format!(
        "global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    http-reuse always
frontend in
    bind 127.0.0.1:{listen}
    default_backend next
backend next
    server next {upstream}
"
    )
}

/// nginx B (to the service) and nginx A (to B), each a master with one worker.
async fn start_nginx(dir: &Path, service: SocketAddr) -> anyhow::Result<TwoHops> {
    let program = require("nginx")?;
    let start = |name: &str, listen: u16, upstream: SocketAddr| -> anyhow::Result<Foreign> {
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, nginx_config(dir, name, listen, upstream))?;
        let early_log = dir.join(format!("{name}.early.log"));
        spawn_foreign(
            &program,
            &[
                "-p",
                dir.to_str().context("path")?,
                "-e",
                early_log.to_str().context("path")?,
                "-c",
                config.to_str().context("path")?,
                "-g",
                "daemon off;",
            ],
            &dir.join(format!("{name}.stderr")),
        )
    };
    let (a_port, b_port) = (free_port()?, free_port()?);
    let second = start("nginx-b", b_port, service)?;
    let first = start("nginx-a", a_port, (Ipv4Addr::LOCALHOST, b_port).into())?;
    let hops = TwoHops {
        first,
        second,
        listen: (Ipv4Addr::LOCALHOST, a_port).into(),
    };
    wait_ready("nginx", &hops, dir).await?;
    Ok(hops)
}

/// haproxy B (to the service) and haproxy A (to B), one process and one thread each.
async fn start_haproxy(dir: &Path, service: SocketAddr) -> anyhow::Result<TwoHops> {
    let program = require("haproxy")?;
    let start = |name: &str, listen: u16, upstream: SocketAddr| -> anyhow::Result<Foreign> {
        let config = dir.join(format!("{name}.cfg"));
        std::fs::write(&config, haproxy_config(listen, upstream))?;
        spawn_foreign(
            &program,
            &["-f", config.to_str().context("path")?, "-db"],
            &dir.join(format!("{name}.stderr")),
        )
    };
    let (a_port, b_port) = (free_port()?, free_port()?);
    let second = start("haproxy-b", b_port, service)?;
    let first = start("haproxy-a", a_port, (Ipv4Addr::LOCALHOST, b_port).into())?;
    let hops = TwoHops {
        first,
        second,
        listen: (Ipv4Addr::LOCALHOST, a_port).into(),
    };
    wait_ready("haproxy", &hops, dir).await?;
    Ok(hops)
}

/// Until a GET through both hops is answered 200; the logs in `dir` in the error if not.
async fn wait_ready(name: &str, hops: &TwoHops, dir: &Path) -> anyhow::Result<()> {
    let client: load::GetClient = load::client();
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        let answer = tokio::time::timeout_at(deadline.into(), client.get(hops.uri("/ready"))).await;
        let last = match answer {
            Ok(Ok(response)) if response.status() == StatusCode::OK => return Ok(()),
            Ok(Ok(response)) => format!("answered {}", response.status()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        if Instant::now() >= deadline {
            let mut logs = String::new();
            for entry in std::fs::read_dir(dir)?.flatten() {
                let path = entry.path();
                let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
                if file.starts_with(name) && (file.ends_with(".log") || file.ends_with(".stderr")) {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    if !text.trim().is_empty() {
                        logs.push_str(&format!("\n{file}:\n{}", text.trim()));
                    }
                }
            }
            bail!("{name} did not answer through both hops within {READY_WITHIN:?}: {last}{logs}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU affinity: the load generator (this process) on CPU 0, every other process on the
/// remaining CPUs, with `taskset`. Children inherit the affinity of the thread that forks
/// them, so this process first moves itself to the others' CPUs, starts everything, then
/// moves itself to CPU 0.
struct Pinning {
    taskset: Option<PathBuf>,
    others: String,
}

impl Pinning {
    fn new() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let taskset = find_program("taskset").filter(|_| cpus >= 2);
        let others = if cpus > 2 {
            format!("1-{}", cpus - 1)
        } else {
            "1".to_owned()
        };
        Self { taskset, others }
    }

    /// Every thread of this process on `cpus`.
    fn pin_self(&self, cpus: &str) -> anyhow::Result<()> {
        let Some(taskset) = &self.taskset else {
            return Ok(());
        };
        let status = std::process::Command::new(taskset)
            .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "taskset failed: {status}");
        Ok(())
    }

    /// What was done, with each process's allowed CPUs read back from /proc.
    fn describe(&self, processes: &[(String, u32)]) -> String {
        if self.taskset.is_none() {
            return "not pinned (taskset not found, or fewer than 2 CPUs): every process shares \
                    every core"
                .to_owned();
        }
        let read: Vec<String> = processes
            .iter()
            .map(|(name, pid)| {
                let cpus = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                            .map(|v| v.trim().to_owned())
                    })
                    .unwrap_or_else(|| "?".to_owned());
                format!("{name} {cpus}")
            })
            .collect();
        format!(
            "pinned with taskset: the load generator (this process, all threads) on CPU 0; the \
             service, the proxies of every path (ours, nginx, haproxy) and our bootstrap and \
             lookup on CPU {}, all sharing it (read back: {})",
            self.others,
            read.join(", ")
        )
    }
}

/// What one path measured at one rate.
struct Measured {
    open: OpenLoop,
    /// CPU of each hop per 1000 requests of the measured run (none for direct).
    cpu: Option<(Duration, Duration)>,
}

pub async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.rates.is_empty() {
        args.rates.push(1000);
    }
    if args.quick {
        args.rates.truncate(1);
        args.warmup = Duration::from_secs(1);
        args.duration = Duration::from_secs(2);
        args.closed_duration = Duration::from_secs(1);
    }
    // Before anything starts: a clear message if a package is missing.
    require("nginx")?;
    require("haproxy")?;
    let command = std::iter::once("target/release/bench".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");

    let pinning = Pinning::new();
    pinning.pin_self(&pinning.others)?;
    let started = async {
        let path = ProxyPath::start().await?;
        let dir = tempfile::tempdir()?;
        let nginx = start_nginx(dir.path(), path.service).await?;
        let haproxy = start_haproxy(dir.path(), path.service).await?;
        anyhow::Ok((path, dir, nginx, haproxy))
    }
    .await;
    pinning.pin_self("0")?;
    let (path, dir, nginx, haproxy): (ProxyPath, TempDir, TwoHops, TwoHops) = started?;
    let mut processes: Vec<(String, u32)> = vec![
        ("bench (load)".into(), std::process::id()),
        ("service".into(), path.service_pid),
        ("ingress".into(), path.ingress_pid),
        ("sidecar".into(), path.sidecar_pid),
    ];
    for (name, hops) in [("nginx", &nginx), ("haproxy", &haproxy)] {
        for (hop, proxy) in [("A", &hops.first), ("B", &hops.second)] {
            for pid in proxy.pids() {
                let role = if pid == proxy.pid { "" } else { " worker" };
                processes.push((format!("{name} {hop}{role}"), pid));
            }
        }
    }
    let pinned = pinning.describe(&processes);

    let uris = [
        ("direct", path.direct("/echo")),
        ("ours", path.through_proxies("/echo")),
        ("nginx", nginx.uri("/echo")),
        ("haproxy", haproxy.uri("/echo")),
    ];
    let hop_cpu = |name: &str| -> anyhow::Result<Option<(Duration, Duration)>> {
        Ok(match name {
            "ours" => Some((cpu_time(path.ingress_pid)?, cpu_time(path.sidecar_pid)?)),
            "nginx" => Some(nginx.cpu()?),
            "haproxy" => Some(haproxy.cpu()?),
            _ => None,
        })
    };

    println!(
        "## Side by side: direct, ours, nginx, haproxy (1 KiB responses)\n\n\
         `{command}`\n\n\
         Open loop {:.0} s per path and rate after {:.0} s unrecorded warm-up; closed loop \
         {} workers for {:.0} s per path. Each nginx is one master with `worker_processes 1`, \
         each haproxy one process with `nbthread 1`, both keeping upstream connections alive \
         (nginx `keepalive 64` with HTTP/1.1, haproxy `http-reuse always`). CPU: {pinned}.\n",
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        args.workers,
        args.closed_duration.as_secs_f64(),
    );

    for &rate in &args.rates {
        let mut measured = Vec::new();
        for (name, uri) in &uris {
            // A client per path and rate: no idle connection from another run is reused.
            let client: load::GetClient = load::client();
            load::open_loop(&client, uri.clone(), rate, args.warmup).await?;
            let before = hop_cpu(name)?;
            let open = load::open_loop(&client, uri.clone(), rate, args.duration).await?;
            let after = hop_cpu(name)?;
            let per_1000 = |after: Duration, before: Duration| {
                after
                    .saturating_sub(before)
                    .mul_f64(1000.0 / open.sent.max(1) as f64)
            };
            let cpu = before
                .zip(after)
                .map(|(b, a)| (per_1000(a.0, b.0), per_1000(a.1, b.1)));
            measured.push((*name, Measured { open, cpu }));
        }
        println!(
            "### {rate} requests/s, open loop, {:.0} s\n\n`{command}`\n",
            args.duration.as_secs_f64()
        );
        print_latency(&measured);
        print_cpu(&measured);
    }

    let open_peaks = [
        (
            "ours",
            (
                status_kb(path.ingress_pid, "VmHWM")?,
                status_kb(path.sidecar_pid, "VmHWM")?,
            ),
        ),
        ("nginx", nginx.peaks()?),
        ("haproxy", haproxy.peaks()?),
    ];
    let mut closed = Vec::new();
    for (name, uri) in &uris {
        let client: load::GetClient = load::client();
        let run = load::closed_loop(&client, uri.clone(), args.workers, args.closed_duration);
        closed.push((*name, run.await?));
    }
    let closed_peaks = [
        (
            "ours",
            (
                status_kb(path.ingress_pid, "VmHWM")?,
                status_kb(path.sidecar_pid, "VmHWM")?,
            ),
        ),
        ("nginx", nginx.peaks()?),
        ("haproxy", haproxy.peaks()?),
    ];
    println!("### Memory and maximum throughput\n\n`{command}`\n");
    print_peaks(&open_peaks, &closed_peaks);
    print_throughput(args.workers, &closed);

    nginx.stop().await;
    haproxy.stop().await;
    drop(dir);
    drop(path);
    Ok(())
}

fn describe(name: &str) -> &'static str {
    match name {
        "direct" => "direct: client -> service",
        "ours" => "ours: client -> ingress -> QUIC -> sidecar -> service",
        "nginx" => "nginx: client -> nginx A -> nginx B -> service",
        _ => "haproxy: client -> haproxy A -> haproxy B -> service",
    }
}

fn print_latency(measured: &[(&str, Measured)]) {
    let at: Vec<(&str, Vec<Duration>)> = measured
        .iter()
        .map(|(name, m)| (*name, histogram_percentiles(&m.open.latency, &PERCENTILES)))
        .collect();
    let rows: Vec<(&str, Vec<String>)> = at
        .iter()
        .map(|(name, values)| (describe(name), values.iter().copied().map(ms2).collect()))
        .collect();
    print_table("path", &PERCENTILES, &rows);
    let direct = &at[0].1;
    let added: Vec<(&str, Vec<String>)> = at[1..]
        .iter()
        .map(|(name, values)| {
            let cells = values
                .iter()
                .zip(direct)
                .map(|(v, d)| format!("{:+.2}", (v.as_secs_f64() - d.as_secs_f64()) * 1e3))
                .collect();
            (*name, cells)
        })
        .collect();
    print_table("added over direct", &PERCENTILES, &added);
    for (name, m) in measured {
        println!(
            "{name}: {} requests, {} errors{}  ",
            m.open.sent,
            m.open.errors,
            m.open
                .first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    println!();
}

fn print_cpu(measured: &[(&str, Measured)]) {
    println!("| CPU per 1000 requests (open loop) | first hop | second hop | both |");
    println!("|---|---|---|---|");
    for (name, m) in measured {
        if let Some((first, second)) = m.cpu {
            let hops = match *name {
                "ours" => "ours (ingress, sidecar)",
                "nginx" => "nginx (A, B; master + worker each)",
                _ => "haproxy (A, B)",
            };
            println!(
                "| {hops} | {:.3} s | {:.3} s | {:.3} s |",
                first.as_secs_f64(),
                second.as_secs_f64(),
                (first + second).as_secs_f64()
            );
        }
    }
    println!();
}

fn print_peaks(open: &[(&str, (u64, u64))], closed: &[(&str, (u64, u64))]) {
    println!("| peak RSS (VmHWM) | first hop | second hop |");
    println!("|---|---|---|");
    for (when, peaks) in [
        ("after the open loops", open),
        ("after the closed loops", closed),
    ] {
        for (name, (first, second)) in peaks {
            println!("| {name}, {when} | {} | {} |", mib(*first), mib(*second));
        }
    }
    println!();
    println!(
        "nginx figures are master + worker of each hop; haproxy one process per hop; ours one \
         process per hop.\n"
    );
}

fn print_throughput(workers: usize, closed: &[(&str, ClosedLoop)]) {
    println!("| closed loop, {workers} workers | requests/s | errors |");
    println!("|---|---|---|");
    for (name, run) in closed {
        println!("| {name} | {:.0} | {} |", run.per_second(), run.errors);
    }
    println!();
}
