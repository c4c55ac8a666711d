//! Probe load on a sidecar (`probes`): how many probe messages one instance answers a second
//! when 1, 10 or 50 ingresses use its service. Each ingress (a `proxy` process) first gets a
//! few requests answered (the service is then in use and the instance verified), then for
//! `--measure` either sends nothing more (idle: the service stays in use, as within 30 s of a
//! request) or sends `--busy-rate` requests a second of its own (busy). The sidecar counts the
//! probes it answers (`proxy_probes_answered_total`).
//!
//! The earlier design probed every instance of a service in use five times a second from each
//! ingress, whatever the traffic: 5 x N probes a second for N ingresses, by construction (its
//! sidecar did not count them; the figure is its probe interval, 200 ms, times N).

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{
    load::{self, GetClient},
    pinning::Pinning,
    proxy_path::{Lookup, StartedProxy, start_proxy_with},
    report::{Report, outln},
    scrape::{scrape, value},
    serve,
};

const SERVICE: &str = "bench-probes";
/// How long every ingress may take to reach the instance.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// The earlier design's probe interval, per ingress and instance.
const OLD_PROBE_INTERVAL: Duration = Duration::from_millis(200);

#[derive(clap::Args)]
pub struct Args {
    /// Numbers of ingresses, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 10, 50])]
    ingresses: Vec<usize>,
    /// How long probes are counted, per run and mode.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    measure: Duration,
    /// Requests a second from each ingress in the busy mode.
    #[arg(long, default_value_t = 20)]
    busy_rate: u32,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            ingresses: vec![1, 10, 50],
            measure: Duration::from_secs(20),
            busy_rate: 20,
        }
    }
}

impl Args {
    pub fn quick() -> Self {
        Self {
            ingresses: vec![1, 3],
            measure: Duration::from_secs(2),
            busy_rate: 20,
        }
    }
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("probes");
    let pinning = Pinning::new();
    let (lookup, service, sidecar) = pinning
        .start_pinned(async {
            let lookup = Lookup::with_service(SERVICE).await?;
            let (service, addr) = serve::start().await?;
            let sidecar = start_proxy_with(
                &lookup.bootstrap,
                &[],
                &[SERVICE, &addr.to_string()],
                Default::default(),
            )
            .await?;
            anyhow::Ok((lookup, service, sidecar))
        })
        .await?;
    let client: GetClient = load::client();

    let mut rows = Vec::new();
    for &n in &args.ingresses {
        let ingresses = pinning
            .start_pinned(async {
                let mut started = Vec::new();
                for _ in 0..n {
                    started.push(
                        start_proxy_with(&lookup.bootstrap, &[], &[], Default::default()).await?,
                    );
                }
                anyhow::Ok(started)
            })
            .await?;
        for ingress in &ingresses {
            wait_answered(&client, ingress).await?;
        }
        let idle = probes_during(&client, &sidecar, args.measure, async {}).await?;
        let busy = probes_during(&client, &sidecar, args.measure, async {
            let loads = ingresses.iter().map(|ingress| {
                load::open_loop(&client, uri(ingress), args.busy_rate, args.measure)
            });
            futures::future::join_all(loads).await;
        })
        .await?;
        for ingress in ingresses {
            ingress.process.terminate(Duration::from_secs(5)).await;
        }
        rows.push((n, idle, busy));
    }

    outln!(
        out,
        "## Probe load on one instance\n\n`{command}`\n\n\
         One instance (a `bench serve` and its sidecar) of one service, used by N ingresses \
         (`proxy` processes on this machine). Each ingress first gets a few requests \
         answered; then probes answered by the sidecar (`proxy_probes_answered_total`) are \
         counted over {:.0} s while the ingresses send nothing more (idle: the service is \
         still in use) and while each sends {} requests/s (busy). The earlier design probed \
         every instance in use every {} ms from each ingress whatever the traffic: its \
         figure is that interval times N, by construction.\n",
        args.measure.as_secs_f64(),
        args.busy_rate,
        OLD_PROBE_INTERVAL.as_millis(),
    );
    outln!(
        out,
        "| ingresses | probes/s, earlier design | probes/s now, idle | probes/s now, busy |"
    );
    outln!(out, "|---|---|---|---|");
    for (n, idle, busy) in rows {
        outln!(
            out,
            "| {n} | {:.1} | {idle:.2} | {busy:.2} |",
            n as f64 / OLD_PROBE_INTERVAL.as_secs_f64()
        );
    }
    outln!(out);
    drop(sidecar);
    drop(service);
    drop(lookup);
    Ok(())
}

fn uri(ingress: &StartedProxy) -> http::Uri {
    format!("http://{}/{SERVICE}/", ingress.ingress)
        .parse()
        .expect("a valid URI")
}

/// Until `ingress` has had a few requests answered by the instance.
async fn wait_answered(client: &GetClient, ingress: &StartedProxy) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    let mut answered = 0;
    while answered < 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the ingress did not reach {SERVICE} within {READY_WITHIN:?}"
        );
        match tokio::time::timeout(Duration::from_secs(5), client.get(uri(ingress))).await {
            Ok(Ok(response)) if response.status().is_success() => answered += 1,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Ok(())
}

/// Probes the sidecar answered a second while `during` ran (at least `length`).
async fn probes_during(
    client: &GetClient,
    sidecar: &StartedProxy,
    length: Duration,
    during: impl Future<Output = ()>,
) -> anyhow::Result<f64> {
    let count = async || -> anyhow::Result<f64> {
        let text = scrape(client, sidecar.metrics)
            .await
            .map_err(anyhow::Error::msg)?;
        value(&text, "proxy_probes_answered_total").context("the sidecar counts no probes")
    };
    let (before, began) = (count().await?, Instant::now());
    let ((), ()) = tokio::join!(during, tokio::time::sleep(length));
    let after = count().await?;
    Ok((after - before) / began.elapsed().as_secs_f64())
}
