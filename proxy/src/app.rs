//! The `proxy` program: the local ingress of a machine (anonymous mode) or the sidecar of one
//! service instance (service mode), with the original's command line.
//!
//! ```text
//! proxy [OPTIONS] PORT                                   # anonymous: ingress on 127.0.0.1:PORT
//! proxy [OPTIONS] PORT SERVICE IP:SERVICE_PORT [METRICS_PORT] [-- COMMAND ARGS]   # sidecar
//! ```
//!
//! The positionals may come from the environment an allocator gives a container: PORT from
//! `PROXY_PORT`, SERVICE from `SERVICE_NAME`, IP:SERVICE_PORT from `PROXY_IP` and
//! `SERVICE_PORT`, METRICS_PORT from `METRICS_PORT`. After `--`, the service's command line:
//! the proxy starts it and supervises it (see [`crate::supervise`]).
//!
//! In service mode the proxy also serves an ingress on PORT (for the service's own outgoing
//! requests), answers requests arriving over QUIC on `--quic-addr` (UDP, by default the same
//! port number as PORT) by calling the service at IP:SERVICE_PORT (see [`crate::sidecar`]),
//! and advertises the service's instance key ([`ServiceRecord::instance_key`]) on the overlay
//! once the lookup has told it the record and the service answers; it stops advertising on
//! SIGINT or SIGTERM.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context;
use libp2p::{Multiaddr, multiaddr::Protocol};
use mtc_overlay::{
    allocator::protocol::instance,
    common::{
        conf_json,
        daemon::Daemon,
        net::{ip_of, parse_socket_addr},
        program::{CommonArgs, DaemonArgs, Program as Flags},
    },
    lookup::{ServiceProtocol, ServiceRecord},
    overlay::{Backoff, Node},
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::live::LivePerf,
    ingress::{IngressSettings, limits::ClientConnections},
    l4::{TunnelMetrics, admit::UdpLimits},
    metrics::{Activity, IngressMetrics, LiveCollector, SidecarCollector, SidecarView},
    sidecar::{Sidecar, health::ServiceState},
    supervise::Service,
    workers::{self, Shared, Workers},
};

/// Sidecar and local ingress: `/<service>/<path>` on 127.0.0.1:PORT goes to the nearest
/// instance of <service> over QUIC. Given SERVICE and IP:SERVICE_PORT, also the sidecar of one
/// instance of SERVICE.
// The doc comments are --help texts, where `<service>` is a placeholder, not HTML.
#[allow(rustdoc::invalid_html_tags)]
#[derive(clap::Parser, Debug)]
#[command(name = "proxy", version)]
pub struct Cli {
    /// Port of the HTTP ingress on --listen-ip (HTTP/1.1 and h2c); l4-proxy's control API.
    #[arg(value_name = "PORT", env = instance::PROXY_PORT)]
    pub port: u16,

    /// Service mode: the service this proxy is the sidecar of.
    #[arg(value_name = "SERVICE", env = instance::SERVICE_NAME)]
    pub service: Option<String>,

    /// Service mode: where the service listens. [env: PROXY_IP and SERVICE_PORT]
    #[arg(value_name = "IP:SERVICE_PORT", value_parser = parse_service_addr)]
    pub address: Option<SocketAddr>,

    /// Port of /metrics on every interface (the original's fourth argument), unless
    /// --prom-listen-addr (or the old MTC_METRICS_ADDR) says where; without any, a free port,
    /// printed at start, on every interface for a sidecar and on --listen-ip for an ingress.
    #[arg(value_name = "METRICS_PORT", env = instance::METRICS_PORT)]
    pub metrics_port: Option<u16>,

    /// Service mode: the service's command line, started and supervised by the proxy;
    /// `$VAR` and `${VAR}` in it are expanded from the environment.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,

    /// perf.conf: RTT limits and the tuning of choosing, probing, ejection and retries
    /// (TOML, or the original's JSON). Built-in defaults (those of the repository's perf.conf)
    /// without it. Read again on SIGHUP and when it changes. (`--configfile`, the original's
    /// name, still works.)
    #[arg(long, alias = "configfile", env = "MTC_PERF_CONF", value_name = "FILE")]
    pub perf_conf: Option<PathBuf>,

    /// How often perf.conf is checked for changes; 0s: only on SIGHUP.
    #[arg(long, env = "MTC_PERF_POLL", default_value = "1s", value_name = "DURATION",
          value_parser = parse_duration)]
    pub perf_poll: Duration,

    /// IP the ingress listens on.
    #[arg(
        long,
        env = "MTC_LISTEN_IP",
        default_value = "127.0.0.1",
        value_name = "IP"
    )]
    pub listen_ip: IpAddr,

    /// Data-plane (QUIC, UDP) listen address, advertised on the overlay. [default: :PORT in
    /// service mode, :0 otherwise]
    #[arg(long, env = instance::QUIC_ADDR, value_name = "ADDR", value_parser = parse_socket_addr)]
    pub quic_addr: Option<SocketAddr>,

    /// Data-plane address advertised instead of --quic-addr, for when others reach this proxy
    /// at another address (NAT, a relay).
    #[arg(long, env = "MTC_QUIC_ADVERTISE_ADDR", value_name = "ADDR")]
    pub quic_advertise_addr: Option<SocketAddr>,

    /// How long a resolved service record is used before the lookup is asked again: seconds
    /// (as the original) or a duration ("1h").
    #[arg(long, default_value = "3600", value_name = "DURATION", value_parser = parse_duration)]
    pub rcache_ttl: Duration,

    /// How long a request waits for an instance of a service that has none (one is being
    /// started) before it is answered 503.
    #[arg(long, default_value = "15s", value_name = "DURATION", value_parser = parse_duration)]
    pub instance_wait: Duration,

    /// Most requests of one service waiting for instances at once; more are answered 503 at
    /// once.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_waiting: usize,

    /// Largest request head (request line and headers) in bytes; larger ones get 431.
    #[arg(long, default_value_t = 64 * 1024, value_name = "BYTES")]
    pub max_head_bytes: usize,

    /// A client that has not sent a whole request head within this is disconnected.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub head_timeout: Duration,

    /// Most connections one client address may hold open to the ingress; one more is answered
    /// 503 and closed.
    #[arg(long, env = "MTC_MAX_CLIENT_CONNECTIONS", default_value_t = 1000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_client_connections: u32,

    /// Service mode: how the service is spoken to (the `--protocol` of its record; allocators
    /// set SERVICE_PROTOCOL from it): `http` (HTTP/1.1, gRPC calls over HTTP/2), `h2c` or
    /// `grpc` (every request over HTTP/2), `tcp`, `udp`. A UDP service cannot be checked by
    /// connecting to it, so its sidecar takes it as serving from the start.
    #[arg(long, env = instance::SERVICE_PROTOCOL, default_value = "http", value_enum)]
    pub protocol: ServiceProtocol,

    /// l4-proxy: a UDP client that sends and receives nothing for this long is forgotten, and
    /// its tunnel closed.
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = parse_duration)]
    pub udp_idle_timeout: Duration,

    /// l4-proxy: UDP clients (source addresses) one chain listener holds at once; datagrams of
    /// further sources are dropped, counted as `too_many_clients`.
    #[arg(long, default_value_t = 1024, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_udp_clients: u32,

    /// l4-proxy: datagrams a second one UDP source may send (bursts of a tenth of a second
    /// pass); the excess is dropped, counted as `rate_limited`.
    #[arg(long, default_value_t = 100_000, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub udp_rate: u32,

    /// Threads serving requests, each with its own event loop, listeners, QUIC endpoints and
    /// connections, sharing nothing per request (see the `workers` module); the kernel spreads
    /// client connections and peers over them. One (the default) is one thread, as nginx's and
    /// haproxy's single worker. l4-proxy serves its control API and the tunnels it opens on
    /// the first.
    #[arg(
        long,
        env = "MTC_WORKER_THREADS",
        default_value_t = 1,
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub worker_threads: u16,

    /// The shared flags. The proxy's --p2p-listen-addr defaults to :0 (every interface) for a
    /// sidecar and to --listen-ip for an ingress; its --prom-listen-addr to :METRICS_PORT if
    /// given, else to the old MTC_METRICS_ADDR, else to any port (printed at start) on every
    /// interface for a sidecar and on --listen-ip for an ingress.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

impl Flags for Cli {
    const NAME: &'static str = "proxy";
    const CONFIG_ENV: &'static str = "PROXY_CONFIG";
    const P2P_LISTEN_ADDR: Option<&'static str> = None;

    fn common(&self) -> &CommonArgs {
        &self.daemon.common
    }
}

/// Layer-4 tunnels and service chains (the original's l4-proxy): `GET /tcp/<svc1>/<svc2>...`
/// (or /udp/...) on 127.0.0.1:PORT answers a local address; every TCP connection or UDP
/// client sent there is carried through svc1, svc2, ... over QUIC, and the replies come
/// straight back. Given SERVICE and IP:SERVICE_PORT, also the sidecar of one instance of a
/// TCP or UDP service (say which with --protocol).
#[derive(clap::Parser, Debug)]
#[command(name = "l4-proxy", version)]
pub struct L4Cli {
    /// The same flags and positionals as `proxy`'s; only the name and help differ.
    #[command(flatten)]
    pub proxy: Cli,
}

impl Flags for L4Cli {
    const NAME: &'static str = "l4-proxy";
    const CONFIG_ENV: &'static str = "PROXY_CONFIG";
    const P2P_LISTEN_ADDR: Option<&'static str> = None;

    fn common(&self) -> &CommonArgs {
        &self.proxy.daemon.common
    }
}

/// Which program runs: what PORT serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `proxy`: the HTTP ingress.
    Proxy,
    /// `l4-proxy`: the control API of layer-4 chains ([`crate::l4::front`]).
    L4Proxy,
}

fn parse_service_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("'{text}' is not a service address: expected IP:SERVICE_PORT"))
}

/// The environment variable --prom-listen-addr was read from before it had the name every
/// program uses.
const OLD_METRICS_ENV: &str = "MTC_METRICS_ADDR";

/// Seconds ("3600", as the original's -rcache-ttl) or a duration with its unit ("1h").
fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("'{text}' is not a duration ({e}): write e.g. 3600, 10s or 1h"))
}

impl Cli {
    /// The service's address: the positional, else `PROXY_IP:SERVICE_PORT` from the
    /// environment. Service mode needs one; anonymous mode must not have one.
    fn service_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        let from_env = || -> Option<String> {
            Some(format!(
                "{}:{}",
                std::env::var(instance::PROXY_IP).ok()?,
                std::env::var(instance::SERVICE_PORT).ok()?
            ))
        };
        match (&self.service, self.address) {
            (Some(_), Some(addr)) => Ok(Some(addr)),
            (Some(service), None) => match from_env() {
                Some(text) => parse_service_addr(&text)
                    .map(Some)
                    .map_err(|e| anyhow::anyhow!("PROXY_IP and SERVICE_PORT: {e}")),
                None => anyhow::bail!(
                    "service mode needs the address of '{service}': give IP:SERVICE_PORT after \
                     the service name (or set PROXY_IP and SERVICE_PORT)"
                ),
            },
            (None, _) if !self.command.is_empty() => {
                anyhow::bail!(
                    "a command after '--' needs service mode: PORT SERVICE IP:SERVICE_PORT"
                )
            }
            (None, _) => Ok(None),
        }
    }

    fn quic_addr(&self) -> SocketAddr {
        self.quic_addr.unwrap_or_else(|| {
            let port = if self.service.is_some() { self.port } else { 0 };
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
        })
    }

    /// Where the overlay listens: --p2p-listen-addr, else every interface for a sidecar
    /// (other machines reach its instance there) and --listen-ip for an ingress (a user who
    /// asked for loopback is not exposed on every interface).
    fn p2p_listen_addr(&self) -> Multiaddr {
        self.daemon
            .p2p_listen_addr
            .clone()
            .unwrap_or_else(|| Multiaddr::from(self.default_ip()).with(Protocol::Tcp(0)))
    }

    /// Where a listener no flag places goes: every interface for a sidecar, --listen-ip for
    /// an ingress.
    fn default_ip(&self) -> IpAddr {
        match self.service {
            Some(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            None => self.listen_ip,
        }
    }

    /// Where /metrics is served: --prom-listen-addr, else the old MTC_METRICS_ADDR, else
    /// METRICS_PORT on every interface, else any port on every interface (a sidecar) or on
    /// --listen-ip (an ingress).
    fn metrics_addr(&self) -> anyhow::Result<SocketAddr> {
        if let Some(addr) = self.daemon.prom_listen_addr {
            return Ok(addr);
        }
        if let Ok(text) = std::env::var(OLD_METRICS_ENV) {
            return parse_socket_addr(&text).map_err(|e| anyhow::anyhow!("{OLD_METRICS_ENV}: {e}"));
        }
        Ok(match self.metrics_port {
            Some(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            None => SocketAddr::new(self.default_ip(), 0),
        })
    }
}

/// Whether `addr` is on a loopback interface.
fn is_loopback(addr: &Multiaddr) -> bool {
    ip_of(addr).is_some_and(|ip| ip.is_loopback())
}

/// Tunes glibc's allocator for a data plane, before anything allocates; the mains call it.
///
/// Every 64 KiB read buffer of a tunnel or a body is freed once QUIC has it acknowledged, and
/// glibc by default gives the top of its heap back to the kernel whenever 128 KiB of it is
/// free, so the next buffers were fresh pages, faulted in and zeroed: 6 % of a tunnel's CPU in
/// a profile (clear_page, page faults). Keeping up to 16 MiB of free heap, and taking
/// buffers up to 4 MiB from the heap rather than from mmap, took a 1 GiB tunnel transfer
/// from 228/256 to 283-302/298-319 MiB/s (down/up) and its CPU from 3.62 to 2.94-3.17 s per
/// GiB (bench/ANALYSIS.md). Peak RSS is a high-water mark and is not raised by it.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// How long the data plane must have served nothing before free heap goes back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const IDLE_BEFORE_TRIM: Duration = Duration::from_secs(30);

/// Gives free heap back to the kernel every [`IDLE_BEFORE_TRIM`] while the data plane is idle.
///
/// [`tune_allocator`] keeps up to 16 MiB of free heap for the next burst, and memory freed in
/// the middle of the heap is never given back by glibc on its own: an idle proxy that had
/// joined a network of 200–1000 nodes (a burst of overlay connections, each with its buffers)
/// stayed at 28–43 MiB, against 13 MiB in a 2-node network (bench/ANALYSIS.md, "A thousand
/// nodes"). `malloc_trim(0)` returns every free page of every arena. It runs again every
/// 30 s for as long as the data plane is idle, since the overlay (whose work is not counted
/// as served) keeps allocating and freeing meanwhile: at most one walk of an idle heap of a
/// few MiB every 30 s.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn give_back_idle_memory(activity: Arc<Activity>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(IDLE_BEFORE_TRIM) => {}
            () = stop.cancelled() => return,
        }
        if activity.idle(std::time::Instant::now()) >= IDLE_BEFORE_TRIM {
            // SAFETY: malloc_trim only returns free pages; it is safe at any time.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// The `proxy` program.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    run_program(cli, Program::Proxy).await
}

/// The `l4-proxy` program.
pub async fn run_l4(cli: L4Cli) -> anyhow::Result<()> {
    run_program(cli.proxy, Program::L4Proxy).await
}

async fn run_program(cli: Cli, program: Program) -> anyhow::Result<()> {
    let service_addr = cli.service_addr()?;
    let mut cli = cli;
    if let Some(path) = &cli.perf_conf {
        // The original's conf.json: its bootstraps, if the flags name none.
        let bootstraps = conf_json::bootstraps_of(path)?;
        cli.daemon.common.overlay.or_bootstraps(bootstraps);
    }
    let perf = LivePerf::load(cli.perf_conf.as_deref())?;
    let stop = CancellationToken::new();
    // At once: from here on a SIGHUP reloads perf.conf rather than ends the process.
    perf.watch(cli.perf_poll, stop.clone())
        .context("cannot watch for SIGHUP")?;
    // Every worker's sockets, before the data-plane address is advertised (see workers).
    let worker_threads = usize::from(cli.worker_threads);
    let http_workers = match program {
        Program::Proxy => worker_threads,
        Program::L4Proxy => 1,
    };
    let sockets = workers::bind(
        worker_threads,
        http_workers,
        SocketAddr::new(cli.listen_ip, cli.port),
        cli.quic_addr(),
    )?;
    let ingress_addr = sockets[0].http_addr().context("the first worker listens")?;
    let quic_addr = sockets[0].quic_addr()?;

    // The data plane proves the overlay identity, so both use one key pair.
    let default_keyfile = format!("~/.privKeyProxy-{}", cli.port);
    let mut config = cli
        .daemon
        .common
        .overlay
        .node_config("proxy", &default_keyfile)?;
    let p2p_listen = cli.p2p_listen_addr();
    // A node on loopback in a network that reaches beyond this machine cannot serve the DHT
    // to the others: they would keep an address of it they cannot dial. It still asks it.
    config.dht_server =
        !is_loopback(&p2p_listen) || config.bootstraps.iter().all(|b| is_loopback(&b.addr));
    config.listen = vec![p2p_listen];
    config.data_plane = Some(cli.quic_advertise_addr.unwrap_or(quic_addr));
    let keypair = config.keypair.clone();
    let network_key = config.network_key.as_ref().map(|key| *key.key_bytes());
    let daemon = Daemon::start(config, cli.metrics_addr()?).await?;
    let node = daemon.node.clone();

    let activity = Activity::new();
    let template = match (&cli.service, service_addr) {
        (Some(service), Some(upstream)) => {
            tracing::info!(%service, %upstream, protocol = ?cli.protocol, "sidecar");
            let sidecar = match cli.protocol {
                ServiceProtocol::Udp => Sidecar::unchecked(upstream, Arc::clone(&activity)),
                ServiceProtocol::Http | ServiceProtocol::Tcp => {
                    Sidecar::new(upstream, Arc::clone(&activity))
                }
                ServiceProtocol::H2c => Sidecar::h2c(upstream, Arc::clone(&activity)),
            };
            Some((service.clone(), sidecar))
        }
        _ => None,
    };
    perf.register(&daemon.registry)?;
    let workers = Workers::start(
        sockets,
        Shared {
            program,
            node: node.clone(),
            keypair,
            network_key,
            settings: IngressSettings {
                perf,
                record_ttl: cli.rcache_ttl,
                instance_wait: cli.instance_wait,
                max_waiting: cli.max_waiting,
                max_head_bytes: cli.max_head_bytes,
                head_timeout: cli.head_timeout,
                client_connections: ClientConnections::new(cli.max_client_connections as usize),
            },
            metrics: IngressMetrics::register(&daemon.registry)?,
            tunnel_metrics: TunnelMetrics::register(&daemon.registry)?,
            activity: Arc::clone(&activity),
            sidecar: template.clone(),
            listen_ip: cli.listen_ip,
            udp: UdpLimits {
                idle: cli.udp_idle_timeout,
                max_clients: cli.max_udp_clients as usize,
                rate: cli.udp_rate,
            },
            stop: stop.clone(),
        },
    )
    .await?;
    // Only now does the ingress listen (workers), and its address is printed: a proxy that
    // cannot join has accepted no client it would never answer.
    match program {
        Program::Proxy => println!("ingress: http://{ingress_addr}"),
        Program::L4Proxy => println!("l4 control API: http://{ingress_addr}"),
    }
    println!("data plane (QUIC): {quic_addr}");
    LiveCollector::register(&daemon.registry, Arc::clone(&activity), workers.views())?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(give_back_idle_memory(Arc::clone(&activity), stop.clone()));
    let advertiser = match template {
        Some((service, sidecar)) => {
            let health = Arc::clone(sidecar.health());
            let probes_answered = workers.probes_answered();
            SidecarCollector::register(&daemon.registry, move || SidecarView {
                probes_answered: probes_answered(),
                service_up: health.state() == ServiceState::Serving,
            })?;
            Some(Advertiser::start(node.clone(), service, &sidecar))
        }
        None => None,
    };

    let mut service = if cli.command.is_empty() {
        None
    } else {
        Some(Service::start(&cli.command).map_err(anyhow::Error::msg)?)
    };
    // Runs until a signal, or until the supervised service exits.
    let mut service_exit = None;
    let until = async {
        match service.as_mut() {
            Some(service) => tokio::select! {
                () = mtc_overlay::common::shutdown_signal() => {}
                exit = service.exited() => service_exit = Some(exit),
            },
            None => mtc_overlay::common::shutdown_signal().await,
        }
        // Before the node stops: ingresses must stop finding an instance that is going.
        if let Some(advertiser) = advertiser {
            advertiser.stop(&node).await;
        }
    };
    daemon.run_until(vec![], until).await?;
    // The workers stop taking requests, let those in flight finish (for a while), then close
    // every connection.
    stop.cancel();
    if let Some(service) = service {
        service.stop().await;
    }
    workers.finish().await;
    match service_exit {
        Some(exit) => anyhow::bail!("{exit}"),
        None => Ok(()),
    }
}

/// How long the advertiser waits for the service before it says so (and again after as long).
const WAIT_WARNING: Duration = Duration::from_secs(10);

/// Advertises this instance once its service answers, and stops when told.
struct Advertiser {
    task: tokio::task::JoinHandle<()>,
    /// The key, set just before it is advertised.
    key: Arc<OnceLock<String>>,
}

impl Advertiser {
    fn start(node: Node, service: String, sidecar: &Arc<Sidecar>) -> Self {
        let key = Arc::new(OnceLock::new());
        let task = tokio::spawn(advertise_service(
            node,
            service,
            Arc::clone(sidecar),
            Arc::clone(&key),
        ));
        Self { task, key }
    }

    /// Stops waiting to advertise, or stops advertising.
    async fn stop(self, node: &Node) {
        self.task.abort();
        let _ = self.task.await;
        if let Some(key) = self.key.get() {
            node.stop_advertising(key).await;
            tracing::info!(%key, "stopped advertising this instance");
        }
    }
}

/// Resolves `service` through the lookup (retrying while it cannot), waits until its service
/// answers, and advertises its instance key (`key` is set first), so that ingresses find this
/// instance only once it can serve. An instance whose service never answers is never
/// advertised.
async fn advertise_service(
    node: Node,
    service: String,
    sidecar: Arc<Sidecar>,
    key: Arc<OnceLock<String>>,
) {
    let stopped = node.stopped();
    let record = tokio::select! {
        record = resolve(&node, &service) => record,
        _ = stopped.cancelled() => return,
    };
    let instance_key = record.instance_key();
    let health = Arc::clone(sidecar.health());
    drop(sidecar);
    let waiting = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = health.serving() => break,
            () = tokio::time::sleep(WAIT_WARNING) => tracing::warn!(
                %service,
                upstream = %health.upstream(),
                waited = ?waiting.elapsed(),
                "the service does not answer yet; this instance is advertised once it does"
            ),
            _ = stopped.cancelled() => return,
        }
    }
    let key = key.get_or_init(|| instance_key);
    node.advertise(key).await;
    tracing::info!(%service, %key, digest = %record.digest, "the service answers; advertising this instance");
}

/// The record of `service`, asked of the lookup until it answers.
async fn resolve(node: &Node, service: &str) -> ServiceRecord {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match mtc_overlay::lookup::client::get(node, service).await {
            Ok(Some(record)) => return record,
            Ok(None) => tracing::warn!(%service, "the lookup knows no such service; asking again"),
            Err(error) => tracing::warn!(%service, %error, "cannot resolve the service; retrying"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
