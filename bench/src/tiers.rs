//! Routing under emulated tiers (`tiers`): one service with three instances (a `bench serve`
//! and its sidecar each), the ingress reaching each sidecar's QUIC endpoint through a
//! userspace delay relay: an edge instance about 1 ms away and two cloud instances 20 ms and
//! 40 ms away, each with jitter. For each choice policy (`rtt-histogram`, `peak-ewma`,
//! `round-robin`), in the same run, a fresh ingress with that policy and the default limits
//! of `perf.conf` takes an open-loop load twice:
//!
//! 1. steady: where requests go (the sidecars' `proxy_served_requests_total`) and the latency;
//! 2. stall: the edge instance (its sidecar and its service) is frozen with SIGSTOP, as
//!    `docker pause` would, for `--stall`, then thawed; the same figures over the whole run,
//!    and the edge's share of the requests from 2 s after the thaw;
//! 3. service death: the edge's service (not its sidecar) is killed for `--dead`, then
//!    started again on its port; the same figures.

use std::{
    net::{Ipv4Addr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use testkit::UdpDelayRelay;

use crate::{
    load::{self, GetClient, OpenLoop},
    pinning::Pinning,
    plot::Curve,
    procs::{Extra, Process},
    proxy_path::{Lookup, StartedProxy, start_proxy_with},
    report::{Report, outln},
    scrape::{scrape, value},
    serve,
    stats::{histogram_percentiles, ms2, print_table},
};

/// The service the three instances serve.
const SERVICE: &str = "bench-tiers";
/// How long an ingress may take to find all three instances.
const READY_WITHIN: Duration = Duration::from_secs(60);
const POLICIES: [&str; 3] = ["rtt-histogram", "peak-ewma", "round-robin"];
const PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 100.0];

/// One instance's distance: its round-trip time and the jitter added each way.
struct Tier {
    name: &'static str,
    rtt: Duration,
    jitter: Duration,
}

const TIERS: [Tier; 3] = [
    Tier {
        name: "edge",
        rtt: Duration::from_millis(1),
        jitter: Duration::from_micros(200),
    },
    Tier {
        name: "cloud-20ms",
        rtt: Duration::from_millis(20),
        jitter: Duration::from_millis(2),
    },
    Tier {
        name: "cloud-40ms",
        rtt: Duration::from_millis(40),
        jitter: Duration::from_millis(4),
    },
];

#[derive(clap::Args)]
pub struct Args {
    /// Requests a second of the open-loop runs.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Unrecorded load after an ingress starts (connections, the instances' RTTs).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Length of the steady run.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    steady: Duration,
    /// How long the edge instance stays frozen.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    stall: Duration,
    /// Load before the stall and after it, within the stall run (and the service-death run).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    around_stall: Duration,
    /// How long the edge's service stays dead (its sidecar running).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    dead: Duration,
    /// The policies to run, in this order (each gets a fresh ingress; the instances are
    /// shared, so the order can be changed to see whether it matters).
    #[arg(long, value_delimiter = ',', default_values_t = POLICIES.map(String::from),
          value_parser = clap::builder::PossibleValuesParser::new(POLICIES))]
    policies: Vec<String>,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            rate: 200,
            warmup: Duration::from_secs(3),
            steady: Duration::from_secs(20),
            stall: Duration::from_secs(30),
            around_stall: Duration::from_secs(5),
            dead: Duration::from_secs(10),
            policies: POLICIES.map(String::from).to_vec(),
        }
    }
}

impl Args {
    pub fn quick() -> Self {
        Self {
            rate: 100,
            warmup: Duration::from_secs(1),
            steady: Duration::from_secs(2),
            stall: Duration::from_secs(2),
            around_stall: Duration::from_secs(3),
            dead: Duration::from_secs(2),
            policies: POLICIES.map(String::from).to_vec(),
        }
    }
}

/// One instance: its service, its sidecar and the relay in front of the sidecar.
struct Instance {
    tier: &'static Tier,
    /// `None` while it is dead (the service-death run).
    service: Option<Process>,
    service_addr: std::net::SocketAddr,
    sidecar: StartedProxy,
    /// Held: the relay stops when dropped, and the sidecar advertises its address.
    _relay: UdpDelayRelay,
}

impl Instance {
    async fn start(tier: &'static Tier, bootstrap: &str) -> anyhow::Result<Self> {
        let (service, service_addr) = serve::start().await?;
        // The sidecar's QUIC port is chosen first (held, then released), so that the relay
        // can point at it and the sidecar advertise the relay.
        let quic = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?;
        let relay = UdpDelayRelay::start(quic, tier.rtt / 2)?;
        relay.set_jitter(tier.jitter / 2);
        let (quic, advertised) = (quic.to_string(), relay.addr.to_string());
        let sidecar = start_proxy_with(
            bootstrap,
            &["--quic-addr", &quic, "--quic-advertise-addr", &advertised],
            &[SERVICE, &service_addr.to_string()],
            Extra::default(),
        )
        .await?;
        Ok(Self {
            tier,
            service: Some(service),
            service_addr,
            sidecar,
            _relay: relay,
        })
    }

    /// Kills the service (SIGKILL), leaving its sidecar running.
    fn kill_service(&self) {
        if let Some(service) = &self.service {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(service.pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the sidecar and the service.
    fn signal(&self, signal: libc::c_int) {
        let service = self.service.as_ref().map(|s| s.pid);
        for pid in std::iter::once(self.sidecar.process.pid).chain(service) {
            // SAFETY: kill(2) has no memory-safety preconditions; both are our children,
            // not reaped.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    async fn served(&self, client: &GetClient) -> anyhow::Result<f64> {
        let text = scrape(client, self.sidecar.metrics)
            .await
            .map_err(anyhow::Error::msg)?;
        value(&text, "proxy_served_requests_total")
            .with_context(|| format!("the {} sidecar exposes no request count", self.tier.name))
    }
}

/// What one open-loop run measured: latency and each instance's share of the requests.
struct Phase {
    open: OpenLoop,
    /// Requests each instance served during the run, in [`TIERS`] order.
    served: Vec<f64>,
    /// Each instance's median RTT as the ingress saw it at the end (its last second of probes
    /// and requests), in [`TIERS`] order.
    seen_rtt: Vec<Option<f64>>,
    /// Each instance's request count at the end.
    end: Vec<f64>,
    /// The edge's share of the requests from [`BACK_WITHIN`] after it thawed to the end.
    edge_back: Option<f64>,
}

impl Phase {
    fn share(&self, instance: usize) -> f64 {
        let total: f64 = self.served.iter().sum();
        if total == 0.0 {
            0.0
        } else {
            self.served[instance] / total
        }
    }
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("tiers");
    let pinning = Pinning::new();
    let (lookup, mut instances) = pinning
        .start_pinned(async {
            let lookup = Lookup::with_service(SERVICE).await?;
            let mut instances = Vec::new();
            for tier in &TIERS {
                instances.push(Instance::start(tier, &lookup.bootstrap).await?);
            }
            anyhow::Ok((lookup, instances))
        })
        .await?;
    let client: GetClient = load::client();

    let mut results = Vec::new();
    let mut pinned = String::new();
    for policy in &args.policies {
        let policy = policy.as_str();
        let config = lookup.dir.path().join(format!("perf-{policy}.conf"));
        std::fs::write(&config, perf_conf(policy))?;
        let ingress = pinning
            .start_pinned(start_ingress(&lookup.bootstrap, &config))
            .await?;
        if pinned.is_empty() {
            let mut processes = vec![
                ("bench (load, relays)".to_owned(), std::process::id()),
                ("ingress".to_owned(), ingress.process.pid),
            ];
            for instance in &instances {
                let name = instance.tier.name;
                processes.push((format!("{name} sidecar"), instance.sidecar.process.pid));
                if let Some(service) = &instance.service {
                    processes.push((format!("{name} service"), service.pid));
                }
            }
            pinned = pinning.describe(&processes);
        }
        let uri: http::Uri = format!("http://{}/{SERVICE}/echo", ingress.ingress).parse()?;
        wait_for_instances(&client, &ingress, &instances, &uri).await?;
        load::open_loop(&client, uri.clone(), args.rate, args.warmup).await?;

        let steady = measure(&client, &ingress, &instances, async {
            load::open_loop(&client, uri.clone(), args.rate, args.steady).await
        })
        .await?;
        let whole = args.around_stall * 2 + args.stall;
        let after_thaw = std::sync::Mutex::new(None);
        let mut stalled = measure(&client, &ingress, &instances, async {
            let edge = &instances[0];
            let freeze = async {
                tokio::time::sleep(args.around_stall).await;
                edge.signal(libc::SIGSTOP);
                tokio::time::sleep(args.stall).await;
                edge.signal(libc::SIGCONT);
                tokio::time::sleep(BACK_WITHIN).await;
                *after_thaw.lock().expect("not poisoned") = served(&client, &instances).await.ok();
            };
            let (open, ()) = tokio::join!(
                load::open_loop(&client, uri.clone(), args.rate, whole),
                freeze
            );
            open
        })
        .await?;
        stalled.edge_back = after_thaw.into_inner().expect("not poisoned").map(|then| {
            let since: Vec<f64> = stalled.end.iter().zip(&then).map(|(a, b)| a - b).collect();
            since[0] / since.iter().sum::<f64>().max(1.0)
        });

        let whole = args.around_stall * 2 + args.dead;
        let (dead, restarted) = measure_with(&client, &ingress, &instances, async {
            let edge = &instances[0];
            let kill = async {
                tokio::time::sleep(args.around_stall).await;
                edge.kill_service();
                tokio::time::sleep(args.dead).await;
                serve::start_on(edge.service_addr.port()).await
            };
            let (open, restarted) = tokio::join!(
                load::open_loop(&client, uri.clone(), args.rate, whole),
                kill
            );
            (open, restarted)
        })
        .await?;
        instances[0].service = Some(restarted?.0);
        ingress.process.terminate(Duration::from_secs(5)).await;
        results.push((policy, [steady, stalled, dead]));
    }

    outln!(
        out,
        "## Routing under emulated tiers: three instances, one stalling\n\n`{command}`\n\n\
         One service, three instances (a `bench serve` and its sidecar each), each sidecar's \
         QUIC endpoint behind a userspace UDP delay relay: {}. For each policy a fresh ingress \
         with `perf.conf`'s default limits (soft {}, hard {}) and that policy takes \
         {} requests/s (open loop, after {:.0} s unrecorded warm-up): a steady run of \
         {:.0} s, then a run of {:.0} s during which the edge instance (sidecar and service) \
         is frozen with SIGSTOP for {:.0} s from second {:.0}, as `docker pause` would, then \
         a run of {:.0} s during which the edge's service (not its sidecar) is killed for \
         {:.0} s from second {:.0} and then started again on its port. Where requests went is \
         read from each sidecar's `proxy_served_requests_total` (which counts the requests a \
         sidecar refused for its dead service too). CPU: {pinned}.\n",
        TIERS
            .iter()
            .map(|t| format!(
                "{} {} ms RTT ± {:.1} ms",
                t.name,
                t.rtt.as_millis(),
                t.jitter.as_secs_f64() * 1e3 / 2.0
            ))
            .collect::<Vec<_>>()
            .join(", "),
        SOFT_RTT,
        HARD_RTT,
        args.rate,
        args.warmup.as_secs_f64(),
        args.steady.as_secs_f64(),
        (args.around_stall * 2 + args.stall).as_secs_f64(),
        args.stall.as_secs_f64(),
        args.around_stall.as_secs_f64(),
        (args.around_stall * 2 + args.dead).as_secs_f64(),
        args.dead.as_secs_f64(),
        args.around_stall.as_secs_f64(),
    );
    for (phase, title, pick) in [
        ("steady", "Steady", 0),
        ("stall", "With the edge instance frozen", 1),
        (
            "dead",
            "With the edge's service dead, its sidecar running",
            2,
        ),
    ] {
        outln!(out, "### {title}\n");
        outln!(
            out,
            "| policy | share to {} | to {} | to {} | requests | errors |",
            TIERS[0].name,
            TIERS[1].name,
            TIERS[2].name
        );
        outln!(out, "|---|---|---|---|---|---|");
        let phases: Vec<(&str, &Phase)> = results
            .iter()
            .map(|(policy, phases)| (*policy, &phases[pick]))
            .collect();
        for (policy, p) in &phases {
            outln!(
                out,
                "| {policy} | {:.1} % | {:.1} % | {:.1} % | {} | {} |",
                p.share(0) * 100.0,
                p.share(1) * 100.0,
                p.share(2) * 100.0,
                p.open.sent,
                p.open.errors
            );
        }
        outln!(out);
        let rows: Vec<(&str, Vec<String>)> = phases
            .iter()
            .map(|(policy, p)| {
                let at = histogram_percentiles(&p.open.latency, &PERCENTILES);
                (*policy, at.into_iter().map(ms2).collect())
            })
            .collect();
        print_table(out, "latency (policy)", &PERCENTILES, &rows);
        outln!(
            out,
            "| median RTT the ingress saw at the end | {} |\n|---|{}",
            TIERS.map(|t| t.name).join(" | "),
            "---|".repeat(TIERS.len())
        );
        for (policy, p) in &phases {
            let cells: Vec<String> = p
                .seen_rtt
                .iter()
                .map(|rtt| rtt.map_or("-".to_owned(), |s| format!("{:.2} ms", s * 1e3)))
                .collect();
            outln!(out, "| {policy} | {} |", cells.join(" | "));
        }
        outln!(out);
        for (policy, p) in &phases {
            if let Some(share) = p.edge_back {
                outln!(
                    out,
                    "{policy}: {:.1} % of the requests went to the edge from {} s after it thawed \
                     to the end of the run.  ",
                    share * 100.0,
                    BACK_WITHIN.as_secs()
                );
            }
        }
        for (policy, p) in &phases {
            if let Some(error) = &p.open.first_error {
                outln!(out, "{policy}, first error: {error}  ");
            }
        }
        let curves: Vec<Curve> = phases
            .iter()
            .map(|(policy, p)| Curve {
                label: policy,
                latency_us: &p.open.latency,
            })
            .collect();
        out.plot(
            &format!("tiers-{phase}"),
            &format!("Tiers, {}: latency by policy", title.to_lowercase()),
            &curves,
        )?;
    }
    drop(instances);
    drop(lookup);
    Ok(())
}

/// The edge's share is counted from this long after it thawed.
const BACK_WITHIN: Duration = Duration::from_secs(2);

const SOFT_RTT: &str = "20ms";
const HARD_RTT: &str = "100ms";

/// `perf.conf` with the default limits and `policy`.
fn perf_conf(policy: &str) -> String {
    format!(
        "[defaults]\nsoft-rtt = \"{SOFT_RTT}\"\nhard-rtt = \"{HARD_RTT}\"\npolicy = \"{policy}\"\n"
    )
}

async fn start_ingress(bootstrap: &str, config: &Path) -> anyhow::Result<StartedProxy> {
    let config = config.to_str().context("path")?;
    start_proxy_with(bootstrap, &["--configfile", config], &[], Extra::default()).await
}

/// Until the ingress answers and has measured all three instances (each has an RTT quantile
/// in its metrics).
async fn wait_for_instances(
    client: &GetClient,
    ingress: &StartedProxy,
    instances: &[Instance],
    uri: &http::Uri,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        // Requests make the service "in use", which is what gets its instances probed.
        let _ = tokio::time::timeout(Duration::from_secs(1), client.get(uri.clone())).await;
        let text = scrape(client, ingress.metrics)
            .await
            .map_err(anyhow::Error::msg)?;
        let measured = seen_rtts(&text, instances).iter().flatten().count();
        if measured >= TIERS.len() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the ingress measured {measured} of {} instances within {READY_WITHIN:?}",
            TIERS.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `load` and counts what each instance served meanwhile.
async fn measure(
    client: &GetClient,
    ingress: &StartedProxy,
    instances: &[Instance],
    load: impl Future<Output = anyhow::Result<OpenLoop>>,
) -> anyhow::Result<Phase> {
    let (phase, ()) = measure_with(client, ingress, instances, async { (load.await, ()) }).await?;
    Ok(phase)
}

/// [`measure`] for a load that returns something besides.
async fn measure_with<T>(
    client: &GetClient,
    ingress: &StartedProxy,
    instances: &[Instance],
    load: impl Future<Output = (anyhow::Result<OpenLoop>, T)>,
) -> anyhow::Result<(Phase, T)> {
    let before = served(client, instances).await?;
    let (open, besides) = load.await;
    let after = served(client, instances).await?;
    let text = scrape(client, ingress.metrics)
        .await
        .map_err(anyhow::Error::msg)?;
    let phase = Phase {
        open: open?,
        served: after.iter().zip(&before).map(|(a, b)| a - b).collect(),
        seen_rtt: seen_rtts(&text, instances),
        end: after,
        edge_back: None,
    };
    Ok((phase, besides))
}

/// Each instance's median RTT in seconds in an ingress's metrics, if it has one yet.
fn seen_rtts(metrics: &str, instances: &[Instance]) -> Vec<Option<f64>> {
    instances
        .iter()
        .map(|instance| {
            metrics.lines().find_map(|line| {
                let labels = line.strip_prefix("proxy_instance_rtt_seconds{")?;
                let (labels, value) = labels.split_once("} ")?;
                let wanted = labels.contains(&format!("instance=\"{}\"", instance.sidecar.peer))
                    && labels.contains("quantile=\"0.5\"");
                wanted.then(|| value.trim().parse().ok()).flatten()
            })
        })
        .collect()
}

async fn served(client: &GetClient, instances: &[Instance]) -> anyhow::Result<Vec<f64>> {
    let mut counts = Vec::new();
    for instance in instances {
        counts.push(instance.served(client).await?);
    }
    Ok(counts)
}
