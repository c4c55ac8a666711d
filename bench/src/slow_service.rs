//! A slow service through allocators (`slow-service`): a service that takes `--delay` (150 ms)
//! to answer every request, registered as an executable (this benchmark's own `serve`), two
//! allocators of the process runtime, and an ingress with `perf.conf`'s default limits (soft
//! 20 ms, hard 100 ms), under `--rate` requests a second for `--length`. The first request
//! starts an instance; the question is whether the service time is taken for distance, as it
//! was (the ingress asked for "nearer" instances every 30 s, or found every instance over the
//! hard limit and started new ones every few seconds).
//!
//! One allocator runs on a far machine ([`testkit::FarHost`]: a network namespace behind a
//! link delaying every packet, 15 ms each way), the only one at first; the other on the
//! ingress's own machine joins 20 s into the load. The far instance's network RTT (30 ms) is
//! over the soft limit, so the ingress should ask for one nearer allocation once it can, and
//! the near instance keep the traffic from then on; the 150 ms of service time should never
//! count. The figures: instances started by each allocator, the ingress's allocations by
//! reason, who answered in each 10 s of the run (the service tags its answers with its port,
//! which says which allocator started it), the latency, and the network RTT and service time
//! the ingress reports per instance. Without root (no namespace), both allocators run here.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use testkit::FarHost;

use crate::{
    load::{self, GetClient},
    procs::{Daemon, Extra, Host, sibling_binary, start_daemon_with},
    proxy_path::{Lookup, start_proxy_with},
    report::{Report, outln},
    scrape::{scrape, value},
    stats::{histogram_percentiles, ms2, print_table},
};

const SERVICE: &str = "bench-slow";
const PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 100.0];
/// The first request (and those asked again after it) must be answered within this.
const FIRST_ANSWER: Duration = Duration::from_secs(60);
/// Who answered, counted per window of this length.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct Args {
    /// Requests a second (open loop).
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Length of the run.
    #[arg(long, default_value = "2min", value_parser = humantime::parse_duration)]
    length: Duration,
    /// How long the service takes to answer.
    #[arg(long, default_value = "150ms", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// One-way delay of the link to the far machine (a network namespace), where the first
    /// allocator runs.
    #[arg(long, default_value = "15ms", value_parser = humantime::parse_duration)]
    far: Duration,
    /// When, into the load, the allocator on the ingress's own machine joins.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    near_joins_after: Duration,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            rate: 50,
            length: Duration::from_secs(120),
            delay: Duration::from_millis(150),
            far: Duration::from_millis(15),
            near_joins_after: Duration::from_secs(20),
        }
    }
}

impl Args {
    pub fn quick() -> Self {
        Self {
            length: Duration::from_secs(5),
            near_joins_after: Duration::from_secs(1),
            ..Self::default()
        }
    }
}

/// The allocators' port ranges: an answer's `x-served-by` (its service port) says which
/// allocator started the instance.
const PORTS: [(u16, u16); 2] = [(24000, 24999), (25000, 25999)];

/// Allocator `n` (0: far, 1: near) of the process runtime on `host`.
async fn allocator(lookup: &Lookup, n: usize, host: Host<'_>) -> anyhow::Result<Daemon> {
    let data = lookup.dir.path().join(format!("allocator-{n}"));
    let proxy = sibling_binary("proxy")?;
    let ports = format!("{}-{}", PORTS[n].0, PORTS[n].1);
    let host_ip = host.ip().to_string();
    start_daemon_with(
        "allocator",
        &[
            "--bootstrap",
            &lookup.bootstrap,
            "--runtime",
            "process",
            "--data-dir",
            data.to_str().context("path")?,
            "--host-ip",
            &host_ip,
            "--port-range",
            &ports,
            "--proxy-binary",
            proxy.to_str().context("path")?,
        ],
        Some("runtime: "),
        Extra {
            host,
            ..Extra::default()
        },
    )
    .await
}

/// Which allocator's instance a tag (its service port) belongs to.
fn allocator_of(tag: &str) -> Option<usize> {
    let port: u16 = tag.parse().ok()?;
    PORTS
        .iter()
        .position(|(low, high)| (*low..=*high).contains(&port))
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("slow-service");
    // The first allocator runs on a far machine if one can be had here; else both on this
    // one, and the report says so.
    let far = match FarHost::unavailable() {
        None => Some(FarHost::start(args.far).context("far host")?),
        Some(why) => {
            eprintln!("slow-service: no far machine ({why}); both allocators run here");
            None
        }
    };
    let (here, there) = match &far {
        Some(far) => (Host::Here(far.near), Host::Far(far)),
        None => (Host::Loopback, Host::Loopback),
    };
    let lookup = Lookup::start_on(here).await?;
    let executable = std::env::current_exe()?;
    let delay = humantime::format_duration(args.delay).to_string();
    lookup
        .add(&[
            "--exec",
            executable.to_str().context("path")?,
            SERVICE,
            "--",
            "bench",
            "serve",
            "--host",
            "$PROXY_IP",
            "--port",
            "$SERVICE_PORT",
            "--delay",
            &delay,
            "--tag",
            "$SERVICE_PORT",
        ])
        .await?;
    let far_allocator = allocator(&lookup, 1, there).await?;
    let ingress = start_proxy_with(
        &lookup.bootstrap,
        &[],
        &[],
        Extra {
            host: here,
            ..Extra::default()
        },
    )
    .await?;
    let client: GetClient = load::client();
    let uri: http::Uri = format!("http://{}/{SERVICE}/", ingress.ingress).parse()?;
    // The first answer: the far instance's cold start (the far allocator's provider record
    // may not have reached the ingress yet: a refusal is asked again).
    let began = std::time::Instant::now();
    let first = loop {
        match load::get(&client, uri.clone()).await {
            Ok(_) => break began.elapsed(),
            Err(error) if began.elapsed() > FIRST_ANSWER => {
                anyhow::bail!("no answer within {FIRST_ANSWER:?}: {error:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    // The near allocator joins while the load runs: until then the far one is the only one.
    let near_joins = async {
        tokio::time::sleep(args.near_joins_after).await;
        allocator(&lookup, 0, here).await
    };
    let (open, near_allocator) = tokio::join!(
        load::open_loop(&client, uri, args.rate, args.length),
        near_joins
    );
    let (open, near_allocator) = (open?, near_allocator?);
    let allocators = [near_allocator, far_allocator];

    let ingress_metrics = scrape(&client, ingress.metrics)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut started = Vec::new();
    for allocator in &allocators {
        let text = scrape(&client, allocator.metrics)
            .await
            .map_err(anyhow::Error::msg)?;
        started.push(value(&text, "allocator_starts_total{outcome=\"started\"}").unwrap_or(0.0));
    }
    let allocations = |reason: &str| {
        ingress_metrics
            .lines()
            .filter(|l| {
                l.starts_with("proxy_allocations_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    // Every instance the ingress still lists: (instance, series, quantile) -> seconds.
    let mut quantiles: BTreeMap<(String, &str, String), f64> = BTreeMap::new();
    for series in [
        "proxy_instance_service_time_seconds",
        "proxy_instance_rtt_seconds",
    ] {
        for line in ingress_metrics.lines() {
            let Some(rest) = line.strip_prefix(series).and_then(|r| r.strip_prefix('{')) else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let label = |name: &str| {
                let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
                Some(labels[start..].split('"').next()?.to_owned())
            };
            if label("service").as_deref() != Some(SERVICE) {
                continue;
            }
            if let (Some(instance), Some(q), Ok(v)) =
                (label("instance"), label("quantile"), value.trim().parse())
            {
                quantiles.insert((instance, series, q), v);
            }
        }
    }
    let ms =
        |seconds: Option<&f64>| seconds.map_or("-".to_owned(), |s| format!("{:.2} ms", s * 1e3));
    let machines = match &far {
        Some(_) => format!(
            "one allocator (ports {}-{}) on a far machine (a network namespace behind a link \
             delaying every packet {} each way: `testkit::FarHost`), from the start, and one \
             (ports {}-{}) on the ingress's own machine, joining {} into the load",
            PORTS[1].0,
            PORTS[1].1,
            humantime::format_duration(args.far),
            PORTS[0].0,
            PORTS[0].1,
            humantime::format_duration(args.near_joins_after),
        ),
        None => format!(
            "two allocators of the process runtime, both on this machine (no far machine \
             could be had: {})",
            FarHost::unavailable().unwrap_or_default()
        ),
    };

    outln!(
        out,
        "## A slow service through allocators\n\n`{command}`\n\n\
         A service answering every request after {} (`bench serve --delay`, registered as an \
         executable), {machines}; an ingress with the default limits (soft 20 ms, hard 100 ms \
         of network RTT). A first request started the far instance and was answered after \
         {:.1} s (asked again while the ingress could not yet find the far allocator); then {} \
         requests/s for {:.0} s (open loop). Before the network RTT was told apart from the service time, such a \
         service made the ingress start an instance every few seconds up to the allocators' \
         limit. What should happen: one instance on the far machine (the only allocator), one \
         nearer allocation once the near allocator is there (the far instance's network RTT is \
         over the soft limit), and from then on every request answered on the near machine.\n",
        delay,
        first.as_secs_f64(),
        args.rate,
        args.length.as_secs_f64(),
    );
    outln!(
        out,
        "| instances started near | far | ingress allocations, no instance | nearer | requests | errors |"
    );
    outln!(out, "|---|---|---|---|---|---|");
    outln!(
        out,
        "| {} | {} | {} | {} | {} | {} |\n",
        started[0] as u64,
        started[1] as u64,
        allocations("none"),
        allocations("nearer"),
        open.sent,
        open.errors
    );
    // Who answered, per window of the run.
    let windows = args.length.as_secs().div_ceil(WINDOW.as_secs()).max(1) as usize;
    let mut answered = vec![[0u64; 3]; windows];
    for (at, tag) in &open.served_by {
        let window = ((at.as_secs() / WINDOW.as_secs()) as usize).min(windows - 1);
        answered[window][allocator_of(tag).unwrap_or(2)] += 1;
    }
    outln!(
        out,
        "| requests sent in | answered near | far | unknown |\n|---|---|---|---|"
    );
    for (i, [near, far, unknown]) in answered.iter().enumerate() {
        let from = i as u64 * WINDOW.as_secs();
        outln!(
            out,
            "| {from}-{} s | {near} | {far} | {unknown} |",
            from + WINDOW.as_secs()
        );
    }
    outln!(out);
    outln!(
        out,
        "| instance the ingress lists at the end | network RTT p50 | p99 | service time p50 | p99 |\n|---|---|---|---|---|"
    );
    let instances: std::collections::BTreeSet<&String> =
        quantiles.keys().map(|(instance, _, _)| instance).collect();
    for instance in instances {
        let get = |series, q: &str| quantiles.get(&(instance.clone(), series, q.to_owned()));
        let (rtt, service) = (
            "proxy_instance_rtt_seconds",
            "proxy_instance_service_time_seconds",
        );
        outln!(
            out,
            "| {} | {} | {} | {} | {} |",
            &instance[instance.len().saturating_sub(8)..],
            ms(get(rtt, "0.5")),
            ms(get(rtt, "0.99")),
            ms(get(service, "0.5")),
            ms(get(service, "0.99")),
        );
    }
    outln!(out);
    let at = histogram_percentiles(&open.latency, &PERCENTILES);
    print_table(
        out,
        "latency",
        &PERCENTILES,
        &[("ours", at.into_iter().map(ms2).collect())],
    );
    if let Some(error) = &open.first_error {
        outln!(out, "first error: {error}\n");
    }
    ingress.process.terminate(Duration::from_secs(5)).await;
    for allocator in allocators {
        allocator.terminate(Duration::from_secs(15)).await;
    }
    drop(lookup);
    drop(far);
    Ok(())
}
