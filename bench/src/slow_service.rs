//! A slow service through allocators (`slow-service`): a service that takes `--delay` (150 ms)
//! to answer every request, registered as an executable (this benchmark's own `serve`), two
//! allocators of the process runtime, and an ingress with `perf.conf`'s default limits (soft
//! 20 ms, hard 100 ms), under `--rate` requests a second for `--length`. The first request
//! starts an instance; the question is whether the service time is taken for distance, as it
//! was (the ingress asked for "nearer" instances every 30 s, or found every instance over the
//! hard limit and started new ones every few seconds).
//!
//! Both allocators run on this machine, so neither is nearer than the other: the figure is
//! how many instances each started, the ingress's allocations by reason, the latency, and the
//! service time and network RTT the ingress reports for the instance.

use std::time::Duration;

use anyhow::Context;

use crate::{
    load::{self, GetClient},
    procs::{Daemon, Extra, sibling_binary, start_daemon_with},
    proxy_path::{Lookup, start_proxy_with},
    report::{Report, outln},
    scrape::{scrape, value},
    stats::{histogram_percentiles, ms2, print_table},
};

const SERVICE: &str = "bench-slow";
const PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 100.0];

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
}

impl Default for Args {
    fn default() -> Self {
        Self {
            rate: 50,
            length: Duration::from_secs(120),
            delay: Duration::from_millis(150),
        }
    }
}

impl Args {
    pub fn quick() -> Self {
        Self {
            length: Duration::from_secs(5),
            ..Self::default()
        }
    }
}

async fn allocator(lookup: &Lookup, n: usize) -> anyhow::Result<Daemon> {
    let data = lookup.dir.path().join(format!("allocator-{n}"));
    let proxy = sibling_binary("proxy")?;
    let ports = format!("{}-{}", 24000 + n * 1000, 24999 + n * 1000);
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
            "127.0.0.1",
            "--port-range",
            &ports,
            "--proxy-binary",
            proxy.to_str().context("path")?,
        ],
        Some("runtime: "),
        Extra::default(),
    )
    .await
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("slow-service");
    let lookup = Lookup::start().await?;
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
            "--port",
            "$SERVICE_PORT",
            "--delay",
            &delay,
        ])
        .await?;
    let allocators = [allocator(&lookup, 0).await?, allocator(&lookup, 1).await?];
    let ingress = start_proxy_with(&lookup.bootstrap, &[], &[], Extra::default()).await?;
    let client: GetClient = load::client();
    let uri: http::Uri = format!("http://{}/{SERVICE}/", ingress.ingress).parse()?;
    let open = load::open_loop(&client, uri, args.rate, args.length).await?;

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
    let quantile = |series: &str, q: &str| {
        ingress_metrics.lines().find_map(|l| {
            let rest = l.strip_prefix(series)?.strip_prefix('{')?;
            let (labels, value) = rest.split_once("} ")?;
            let wanted = labels.contains(&format!("quantile=\"{q}\""))
                && labels.contains(&format!("service=\"{SERVICE}\""));
            wanted.then(|| value.trim().parse::<f64>().ok()).flatten()
        })
    };
    let ms =
        |seconds: Option<f64>| seconds.map_or("-".to_owned(), |s| format!("{:.2} ms", s * 1e3));

    outln!(
        out,
        "## A slow service through allocators\n\n`{command}`\n\n\
         A service answering every request after {} (`bench serve --delay`, registered as an \
         executable), two allocators of the process runtime on this machine, an ingress with \
         the default limits (soft 20 ms, hard 100 ms of network RTT), {} requests/s for \
         {:.0} s (open loop; the first request starts an instance, and the requests of its \
         first second or so wait for it: they are the tail of the latency). Before the network \
         RTT was told apart from the service time, such a service made the ingress start an \
         instance every few seconds up to the allocators' limit.\n",
        delay,
        args.rate,
        args.length.as_secs_f64(),
    );
    outln!(
        out,
        "| instances started by allocator 1 | by allocator 2 | ingress allocations, no instance | nearer | requests | errors |"
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
    outln!(
        out,
        "| the instance, as the ingress saw it at the end | p50 | p99 |\n|---|---|---|"
    );
    for (what, series) in [
        ("service time", "proxy_instance_service_time_seconds"),
        ("network RTT", "proxy_instance_rtt_seconds"),
    ] {
        outln!(
            out,
            "| {what} | {} | {} |",
            ms(quantile(series, "0.5")),
            ms(quantile(series, "0.99"))
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
    Ok(())
}
