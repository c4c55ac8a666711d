//! The allocator program: starts instances of services on this machine when proxies ask
//! (`/mtc/allocator/start/1`), culls those that stay idle, and adopts what it started before a
//! restart.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use futures::FutureExt;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use super::{
    book::{CullPolicy, Instance, Verdict, idle_from_metrics, reuses},
    ports::{self, InstancePorts, PortPool},
    protocol::{NAMESPACE, StartProtocol, StartRequest, StartResponse, instance},
    runtime::{Launch, Runtime, docker::DockerRuntime, process::ProcessRuntime},
};
use crate::{
    blob::{BlobStore, transfer},
    common::{
        conf_json,
        daemon::Daemon,
        http,
        overlay_args::{BOOTSTRAPS_ENV, EPHEMERAL_ENV, PSK_ENV},
        program::{CommonArgs, DaemonArgs, Program},
        program::{P2P_LISTEN_ENV, PROM_LISTEN_ENV},
    },
    lookup::{ServiceRecord, client},
    overlay::{Node, identity::expand_home},
};

/// Where the allocator keeps its identity (private key) unless --keyfile names another file.
pub const DEFAULT_KEYFILE: &str = "~/.privKeyAlloc";

/// The runtime `--runtime` asks for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeChoice {
    /// Docker when an engine answers, else processes.
    Auto,
    /// Docker containers, for image archives (no engine: the allocator does not start).
    Docker,
    /// Processes run by a proxy (--proxy-binary), for executables.
    Process,
}

/// Allocator: starts service instances on this machine when proxies ask for them (Docker
/// containers or processes, each with its proxy), culls idle ones, adopts its instances after
/// a restart. Serves /mtc/allocator/start/1 on the overlay, /metrics over HTTP.
#[derive(clap::Parser, Debug)]
#[command(name = "allocator", version)]
pub struct Cli {
    /// Where instances run.
    #[arg(long, value_enum, default_value_t = RuntimeChoice::Auto, env = "MTC_RUNTIME")]
    pub runtime: RuntimeChoice,

    /// The proxy binary each process instance runs beside its service. [default: `proxy`
    /// next to this program]
    #[arg(long, env = "MTC_PROXY_BINARY", value_name = "FILE")]
    pub proxy_binary: Option<PathBuf>,

    /// Where blobs and process instances are kept.
    #[arg(
        long,
        env = "MTC_DATA_DIR",
        value_name = "DIR",
        default_value = "~/.local/share/multi-tier-cloud/allocator"
    )]
    pub data_dir: PathBuf,

    /// The address other machines reach this one at, given to instances as PROXY_IP.
    /// [default: the address of the interface with the default route, else 127.0.0.1]
    #[arg(long, env = "MTC_HOST_IP", value_name = "IP")]
    pub host_ip: Option<IpAddr>,

    /// Ports given to instances (three each), outside the kernel's ephemeral range.
    #[arg(long, default_value = "20000-29999", value_name = "FIRST-LAST",
          value_parser = ports::parse_range)]
    pub port_range: RangeInclusive<u16>,

    /// Most instances at once; further start requests are refused, saying so.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub max_instances: usize,

    /// An instance whose proxy served no request for this long is stopped and removed.
    #[arg(long, default_value = "60s", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// An instance younger than this is booting and never culled.
    #[arg(long, default_value = "30s", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub boot_grace: Duration,

    /// How often instances are checked.
    #[arg(long, default_value = "5s", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub check_interval: Duration,

    /// Start requests for a service within this of the last start get that instance.
    #[arg(long, default_value = "10s", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub reuse_window: Duration,

    /// On shutdown, leave the instances running (a restarted allocator adopts them).
    #[arg(long)]
    pub leave_instances: bool,

    /// The original's conf.json: its Bootstraps are used if no --bootstrap is given (its Perf
    /// is the proxies' business).
    #[arg(long, value_name = "FILE")]
    pub configfile: Option<PathBuf>,

    /// The flags every long-running program takes: P2P and metrics listen addresses, and the
    /// flags every program takes.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

impl Program for Cli {
    const NAME: &'static str = "allocator";
    const CONFIG_ENV: &'static str = "ALLOCATOR_CONFIG";
    const PROM_LISTEN_ADDR: Option<&'static str> = Some(":9101");

    fn common(&self) -> &CommonArgs {
        &self.daemon.common
    }
}

/// The allocator's series on /metrics.
#[derive(Clone)]
struct Metrics {
    instances: IntGaugeVec,
    starts: IntCounterVec,
    start_seconds: Histogram,
    culls: IntCounterVec,
    check_rounds: IntCounter,
}

impl Metrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let instances = IntGaugeVec::new(
            Opts::new("allocator_instances", "Instances running, by service"),
            &["service"],
        )?;
        let starts = IntCounterVec::new(
            Opts::new(
                "allocator_starts_total",
                "Start requests by outcome: started, reused (one just started) or refused",
            ),
            &["outcome"],
        )?;
        let start_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "allocator_start_duration_seconds",
                "From a start request to the instance started (artifact fetched and loaded)",
            )
            .buckets(prometheus::exponential_buckets(0.05, 2.0, 10)?),
        )?;
        let culls = IntCounterVec::new(
            Opts::new(
                "allocator_culls_total",
                "Instances stopped: idle, unresponsive, or found exited",
            ),
            &["reason"],
        )?;
        let check_rounds = IntCounter::new(
            "allocator_check_rounds_total",
            "Rounds of instance checks done (each looks at every instance once, every \
             --check-interval)",
        )?;
        // Every outcome and reason from zero: a rate over them reads 0 rather than nothing.
        for outcome in ["started", "reused", "refused"] {
            starts.with_label_values(&[outcome]);
        }
        for reason in ["idle", "unresponsive", "exited"] {
            culls.with_label_values(&[reason]);
        }
        registry.register(Box::new(instances.clone()))?;
        registry.register(Box::new(starts.clone()))?;
        registry.register(Box::new(start_seconds.clone()))?;
        registry.register(Box::new(culls.clone()))?;
        registry.register(Box::new(check_rounds.clone()))?;
        Ok(Self {
            instances,
            starts,
            start_seconds,
            culls,
            check_rounds,
        })
    }
}

/// An instance being tracked.
struct Tracked {
    instance: Instance,
    since: Instant,
    missed_checks: u32,
}

#[derive(Default)]
struct State {
    instances: HashMap<String, Tracked>,
    /// The last instance started per service, and when.
    last_start: HashMap<String, (Instant, String)>,
}

struct Allocator {
    node: Node,
    runtime: Runtime,
    blobs: Arc<BlobStore>,
    /// This allocator's peer ID: the label on its instances.
    me: String,
    host_ip: IpAddr,
    /// P2P_BOOTSTRAPS for instances: this allocator's bootstraps and itself.
    bootstraps: String,
    psk: Option<String>,
    max_instances: usize,
    reuse_window: Duration,
    cull: CullPolicy,
    ports: Mutex<PortPool>,
    state: Mutex<State>,
    /// Serialises starts per service, so that concurrent requests see each other's instance.
    starting: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Metrics,
    scraper: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
}

/// The IP of the interface a default route leaves by (a UDP "connect" sends nothing).
fn default_route_ip() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect(("192.0.2.1", 9)).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

async fn choose_runtime(cli: &Cli, data_dir: &std::path::Path) -> anyhow::Result<Runtime> {
    let process = || -> anyhow::Result<Runtime> {
        let proxy = match &cli.proxy_binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()?.with_file_name("proxy"),
        };
        Ok(Runtime::Process(
            ProcessRuntime::new(proxy, data_dir.join("instances")).map_err(anyhow::Error::msg)?,
        ))
    };
    match cli.runtime {
        RuntimeChoice::Docker => Ok(Runtime::Docker(
            DockerRuntime::connect().await.map_err(anyhow::Error::msg)?,
        )),
        RuntimeChoice::Process => process(),
        RuntimeChoice::Auto => match DockerRuntime::connect().await {
            Ok(docker) => Ok(Runtime::Docker(docker)),
            Err(reason) => {
                tracing::info!(%reason, "using the process runtime");
                process()
            }
        },
    }
}

/// The allocator program: adopts the instances a previous run left, serves start requests
/// and checks its instances until SIGINT or SIGTERM, then stops them unless
/// --leave-instances.
pub async fn run(mut cli: Cli) -> anyhow::Result<()> {
    if let Some(path) = &cli.configfile {
        // The original's conf.json: its bootstraps, if the flags name none.
        let bootstraps = conf_json::bootstraps_of(path)?;
        cli.daemon.common.overlay.or_bootstraps(bootstraps);
    }
    if let Some(ephemeral) = ports::kernel_ephemeral_range() {
        ports::check_outside_ephemeral(&cli.port_range, ephemeral).map_err(anyhow::Error::msg)?;
    }
    let data_dir = expand_home(&cli.data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let blobs = Arc::new(BlobStore::open(&data_dir.join("blobs"))?);
    let runtime = choose_runtime(&cli, &data_dir).await?;

    let mut config = cli
        .daemon
        .common
        .overlay
        .node_config("allocator", DEFAULT_KEYFILE)?;
    config.listen = vec![cli.daemon.p2p_listen_addr_of::<Cli>()];
    // Handed on to the instances (a random one, from `-psk ""`, too: they join this network).
    let network_passphrase = config
        .network_key
        .as_ref()
        .map(|key| key.passphrase().to_owned());
    let own_bootstraps: Vec<String> = config.bootstraps.iter().map(|b| b.to_string()).collect();
    let daemon = Daemon::start(
        config,
        cli.daemon.prom_listen_addr_of::<Cli>().expect("a default"),
    )
    .await?;
    let node = daemon.node.clone();
    let mut bootstraps = own_bootstraps;
    bootstraps.extend(node.listen_addrs().await.iter().map(|a| a.to_string()));
    let metrics = Metrics::register(&daemon.registry)?;
    transfer::serve(
        &node,
        Arc::clone(&blobs),
        transfer::BlobCounters::register(&daemon.registry)?,
    )
    .await;

    let allocator = Arc::new(Allocator {
        me: node.peer_id().to_string(),
        node: node.clone(),
        runtime,
        blobs,
        host_ip: cli
            .host_ip
            .or_else(default_route_ip)
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        bootstraps: bootstraps.join(" "),
        psk: network_passphrase,
        max_instances: cli.max_instances,
        reuse_window: cli.reuse_window,
        cull: CullPolicy {
            idle_timeout: cli.idle_timeout,
            boot_grace: cli.boot_grace,
            max_missed_checks: 3,
        },
        ports: Mutex::new(PortPool::new(cli.port_range.clone())),
        state: Mutex::default(),
        starting: tokio::sync::Mutex::default(),
        metrics,
        scraper: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http(),
    });
    allocator.adopt().await?;
    println!("runtime: {}", allocator.runtime.name());

    let serving = Arc::clone(&allocator);
    node.serve::<StartProtocol, _, _>(move |peer, request| {
        let allocator = Arc::clone(&serving);
        async move {
            tracing::info!(%peer, service = %request.service, "start requested");
            allocator.handle(request).await
        }
    });
    node.advertise(NAMESPACE).await;
    let checking = Arc::clone(&allocator);
    let interval = cli.check_interval;
    tokio::spawn(async move {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            checking.check().await;
        }
    });

    let listing = Arc::clone(&allocator);
    let targets: http::Handler = Arc::new(move || {
        let allocator = Arc::clone(&listing);
        async move { ("application/json", allocator.scrape_targets()) }.boxed()
    });
    daemon.run_until_signal(vec![("/targets", targets)]).await?;
    if !cli.leave_instances {
        allocator.stop_all().await;
    }
    Ok(())
}

impl Allocator {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, service: &str) {
        let n = self
            .state()
            .instances
            .values()
            .filter(|t| t.instance.service == service)
            .count();
        self.metrics
            .instances
            .with_label_values(&[service])
            .set(n as i64);
    }

    fn track(&self, instance: Instance) {
        let service = instance.service.clone();
        self.state().instances.insert(
            instance.id.clone(),
            Tracked {
                instance,
                since: Instant::now(),
                missed_checks: 0,
            },
        );
        self.count(&service);
    }

    fn forget(&self, id: &str) {
        let Some(tracked) = self.state().instances.remove(id) else {
            return;
        };
        self.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(tracked.instance.ports);
        self.count(&tracked.instance.service);
    }

    /// Takes over the instances a previous run of this allocator left: running ones are
    /// tracked again (booting again as far as culling goes), exited ones removed.
    async fn adopt(&self) -> anyhow::Result<()> {
        let found = self
            .runtime
            .list(&self.me)
            .await
            .map_err(anyhow::Error::msg)?;
        for (instance, running) in found {
            if running {
                tracing::info!(id = %instance.id, service = %instance.service, "adopted");
                self.ports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .mark_used(instance.ports);
                self.track(instance);
            } else if let Err(error) = self.runtime.stop(&instance.id).await {
                tracing::warn!(id = %instance.id, %error, "cannot remove an exited instance");
            }
        }
        Ok(())
    }

    async fn handle(self: &Arc<Self>, request: StartRequest) -> StartResponse {
        let begin = Instant::now();
        let lock = {
            let mut starting = self.starting.lock().await;
            Arc::clone(starting.entry(request.service.clone()).or_default())
        };
        let _one_at_a_time = lock.lock().await;
        let response = match self.reused(&request.service, &request.digest) {
            Some(instance) => StartResponse::Started {
                instance,
                reused: true,
            },
            None => match self.start(&request).await {
                Ok(instance) => StartResponse::Started {
                    instance,
                    reused: false,
                },
                Err(reason) => {
                    tracing::warn!(service = %request.service, %reason, "start refused");
                    StartResponse::Refused(reason)
                }
            },
        };
        let outcome = match &response {
            StartResponse::Started { reused: true, .. } => "reused",
            StartResponse::Started { .. } => {
                self.metrics
                    .start_seconds
                    .observe(begin.elapsed().as_secs_f64());
                "started"
            }
            StartResponse::Refused(_) => "refused",
        };
        self.metrics.starts.with_label_values(&[outcome]).inc();
        response
    }

    /// The instance of `service` with `digest` started within the reuse window, if it still
    /// runs.
    fn reused(&self, service: &str, digest: &str) -> Option<String> {
        let state = self.state();
        let (at, id) = state.last_start.get(service)?;
        let running = state.instances.get(id)?;
        (reuses(Some(*at), Instant::now(), self.reuse_window) && running.instance.digest == digest)
            .then(|| id.clone())
    }

    async fn start(&self, request: &StartRequest) -> Result<String, String> {
        if self.state().instances.len() >= self.max_instances {
            return Err(format!(
                "this allocator already runs its maximum of {} instances (--max-instances)",
                self.max_instances
            ));
        }
        let record = client::get(&self.node, &request.service)
            .await
            .map_err(|e| format!("cannot look '{}' up: {e}", request.service))?
            .ok_or_else(|| format!("the lookup has no service named '{}'", request.service))?;
        let digest = record.digest.to_string();
        if digest != request.digest {
            return Err(format!(
                "digest mismatch: asked to run {} but the lookup's record of '{}' names {digest}",
                request.digest, record.name
            ));
        }
        if self.blobs.size_of(&record.digest).is_none() {
            let holder = transfer::fetch(&self.node, record.digest, &self.blobs)
                .await
                .map_err(|e| format!("cannot fetch the artifact of '{}': {e}", record.name))?;
            tracing::info!(%digest, %holder, "artifact fetched");
        }
        self.runtime.prepare(&record, &self.blobs).await?;

        let ports = self
            .ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(ports::bindable)
            .ok_or("no free ports left in --port-range")?;
        let mut instance = Instance {
            id: String::new(),
            service: record.name.clone(),
            digest,
            ports,
        };
        let launch = Launch {
            record: &record,
            name: format!("mtc-{}-{}", record.name, ports.proxy),
            env: self.environment(&record, ports),
            labels: instance.labels(&self.me),
        };
        match self.runtime.start(&launch, &self.blobs).await {
            Ok(id) => {
                tracing::info!(%id, service = %record.name, ?ports, "instance started");
                instance.id = id.clone();
                self.track(instance);
                self.state()
                    .last_start
                    .insert(record.name.clone(), (Instant::now(), id.clone()));
                Ok(id)
            }
            Err(reason) => {
                self.ports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .release(ports);
                Err(reason)
            }
        }
    }

    /// The /metrics endpoints of the proxies of this allocator's instances, as Prometheus'
    /// HTTP service discovery reads them (`http_sd_configs` in prometheus.yml): one target
    /// group per instance, labelled with its service (`mtc_service`, so as not to clash with
    /// the proxy's own `service` label) and its ID.
    fn scrape_targets(&self) -> String {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let groups: Vec<serde_json::Value> = state
            .instances
            .values()
            .map(|tracked| {
                let instance = &tracked.instance;
                serde_json::json!({
                    "targets": [SocketAddr::new(self.host_ip, instance.ports.metrics).to_string()],
                    "labels": {
                        "mtc_service": instance.service,
                        "mtc_instance": instance.id,
                    },
                })
            })
            .collect();
        serde_json::Value::Array(groups).to_string()
    }

    /// The environment of an instance (the container contract of sidecar-image/README.md).
    fn environment(&self, record: &ServiceRecord, ports: InstancePorts) -> Vec<(String, String)> {
        let mut env = vec![
            (instance::SERVICE_NAME.to_owned(), record.name.clone()),
            (
                instance::SERVICE_PROTOCOL.into(),
                record.protocol.as_str().into(),
            ),
            (instance::PROXY_PORT.into(), ports.proxy.to_string()),
            (instance::PROXY_IP.into(), self.host_ip.to_string()),
            (instance::SERVICE_PORT.into(), ports.service.to_string()),
            (instance::METRICS_PORT.into(), ports.metrics.to_string()),
            (BOOTSTRAPS_ENV.into(), self.bootstraps.clone()),
            (EPHEMERAL_ENV.into(), "true".into()),
            // Every listener of the instance on the host IP and no other interface (a process
            // instance would otherwise also inherit this allocator's own listen addresses).
            (
                instance::QUIC_ADDR.into(),
                SocketAddr::new(self.host_ip, ports.proxy).to_string(),
            ),
            (
                PROM_LISTEN_ENV.into(),
                SocketAddr::new(self.host_ip, ports.metrics).to_string(),
            ),
            (
                P2P_LISTEN_ENV.into(),
                SocketAddr::new(self.host_ip, 0).to_string(),
            ),
        ];
        if let Some(psk) = &self.psk {
            env.push((PSK_ENV.into(), psk.clone()));
        }
        if let Ok(filter) = std::env::var("RUST_LOG") {
            env.push(("RUST_LOG".into(), filter));
        }
        env
    }

    /// How long the proxy of the instance with metrics on `port` has been idle, if it
    /// answers.
    async fn idle_of(&self, port: u16) -> Option<Duration> {
        let uri = format!("http://127.0.0.1:{port}/metrics").parse().ok()?;
        let ask = async {
            use http_body_util::BodyExt;
            let response = self.scraper.get(uri).await.ok()?;
            let body = response.into_body().collect().await.ok()?.to_bytes();
            idle_from_metrics(&String::from_utf8_lossy(&body))
        };
        tokio::time::timeout(Duration::from_secs(2), ask)
            .await
            .ok()
            .flatten()
    }

    /// One round of checks: instances that exited are forgotten, idle or unresponsive ones
    /// past their boot grace stopped.
    async fn check(&self) {
        let tracked: Vec<(Instance, Instant)> = self
            .state()
            .instances
            .values()
            .map(|t| (t.instance.clone(), t.since))
            .collect();
        for (instance, since) in tracked {
            let running = match self.runtime.is_running(&instance.id).await {
                Some(running) => running,
                // The runtime cannot say now: ask again next round.
                None => continue,
            };
            if !running {
                tracing::info!(id = %instance.id, service = %instance.service, "instance exited");
                let _ = self.runtime.stop(&instance.id).await;
                self.forget(&instance.id);
                self.metrics.culls.with_label_values(&["exited"]).inc();
                continue;
            }
            let idle = self.idle_of(instance.ports.metrics).await;
            let missed = {
                let mut state = self.state();
                let Some(tracked) = state.instances.get_mut(&instance.id) else {
                    continue;
                };
                tracked.missed_checks = if idle.is_some() {
                    0
                } else {
                    tracked.missed_checks + 1
                };
                tracked.missed_checks
            };
            let reason = match self.cull.verdict(since.elapsed(), idle, missed) {
                Verdict::Keep | Verdict::Booting => continue,
                Verdict::Idle => "idle",
                Verdict::Unresponsive => "unresponsive",
            };
            tracing::info!(id = %instance.id, service = %instance.service, reason, "culling");
            match self.runtime.stop(&instance.id).await {
                Ok(()) => {
                    self.forget(&instance.id);
                    self.metrics.culls.with_label_values(&[reason]).inc();
                }
                Err(error) => tracing::warn!(id = %instance.id, %error, "cannot stop"),
            }
        }
        self.metrics.check_rounds.inc();
    }

    async fn stop_all(&self) {
        let ids: Vec<String> = self.state().instances.keys().cloned().collect();
        for id in ids {
            if let Err(error) = self.runtime.stop(&id).await {
                tracing::warn!(%id, %error, "cannot stop");
            }
            self.forget(&id);
        }
    }
}
