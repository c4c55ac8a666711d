//! The `workers` scenario: what a second worker thread buys. Closed-loop throughput and CPU
//! per request through ours with one and two workers per proxy (`--worker-threads`), beside
//! two haproxy hops with one and two threads each (`nbthread`), and straight to the service.
//!
//! Nothing is pinned here: a second worker needs a second core, so every process (the load
//! generator, the service and both hops) may run on every CPU. On a 2-core machine they all
//! share the two; the report says so.

use std::time::Duration;

use http::Uri;

use crate::{
    foreign, load,
    procs::cpu_time,
    proxy_path::ProxyPath,
    report::{Report, outln},
};

#[derive(clap::Args)]
pub struct Args {
    /// Rounds; each measures every path once, in the same order.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent connections of the closed loop (the kernel spreads them over the workers).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Length of each measured run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unrecorded load before each run.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            rounds: 3,
            connections: 64,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
        }
    }
}

impl Args {
    /// Proves the scenario runs, measures nothing worth keeping.
    pub fn quick() -> Self {
        Self {
            rounds: 1,
            connections: 8,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(200),
        }
    }
}

/// The threads per hop measured.
const THREADS: [usize; 2] = [1, 2];

/// One measured run.
#[derive(Clone, Copy)]
struct Run {
    per_second: f64,
    errors: u64,
    /// CPU of both hops per 1000 requests (none for direct).
    cpu: Option<Duration>,
}

/// The runs of one path, a run per round.
struct Series {
    name: String,
    threads: Option<usize>,
    runs: Vec<Run>,
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("workers");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut series: Vec<Series> = vec![Series {
        name: "direct".into(),
        threads: None,
        runs: Vec::new(),
    }];
    for threads in THREADS {
        for name in ["ours", "haproxy"] {
            series.push(Series {
                name: name.into(),
                threads: Some(threads),
                runs: Vec::new(),
            });
        }
    }
    for _ in 0..args.rounds {
        for threads in THREADS {
            let flag = threads.to_string();
            let path = ProxyPath::start_with(&["--worker-threads", &flag]).await?;
            let hops = (path.ingress_pid, path.sidecar_pid);
            let ours = measure(&args, path.through_proxies("/echo"), || {
                Ok(cpu_time(hops.0)? + cpu_time(hops.1)?)
            })
            .await?;
            let dir = tempfile::tempdir()?;
            let haproxy = foreign::start_haproxy(dir.path(), path.service, None, threads).await?;
            let theirs = measure(&args, haproxy.uri("/echo"), || {
                let (a, b) = haproxy.cpu()?;
                Ok(a + b)
            })
            .await?;
            haproxy.stop().await;
            if threads == 1 {
                let direct = measure(&args, path.direct("/echo"), || Ok(Duration::ZERO)).await?;
                series[0].runs.push(Run {
                    cpu: None,
                    ..direct
                });
            }
            for (name, run) in [("ours", ours), ("haproxy", theirs)] {
                if let Some(s) = series
                    .iter_mut()
                    .find(|s| s.name == name && s.threads == Some(threads))
                {
                    s.runs.push(run);
                }
            }
        }
    }

    outln!(
        out,
        "## Workers: one and two threads per proxy (closed loop, 1 KiB responses)\n\n\
         `{command}`\n\n\
         {} rounds; in each, per path, {:.1} s unrecorded then {:.1} s measured, {} connections \
         from one load generator. Ours with `--worker-threads 1` and `2` on both proxies \
         (share-nothing workers, `SO_REUSEPORT` listeners and QUIC endpoints); two haproxy hops \
         with `nbthread 1` and `2`. Nothing is pinned: every process (the load generator, the \
         service and both hops) may run on each of this machine's {cpus} CPUs. CPU is that of \
         both hops per 1000 requests.\n",
        args.rounds,
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64(),
        args.connections,
    );
    outln!(
        out,
        "| path | threads per hop | requests/s, each round | median | CPU s / 1000 requests (median) | errors |"
    );
    outln!(out, "|---|---|---|---|---|---|");
    for s in &series {
        let rates: Vec<String> = s
            .runs
            .iter()
            .map(|r| format!("{:.0}", r.per_second))
            .collect();
        let cpu = median(s.runs.iter().filter_map(|r| r.cpu).map(|c| c.as_secs_f64()));
        outln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} |",
            s.name,
            s.threads.map_or("-".into(), |t| t.to_string()),
            rates.join(", "),
            median(s.runs.iter().map(|r| r.per_second)).unwrap_or(0.0),
            cpu.map_or("-".into(), |c| format!("{c:.3}")),
            s.runs.iter().map(|r| r.errors).sum::<u64>(),
        );
    }
    outln!(out);
    for name in ["ours", "haproxy"] {
        let at = |threads| {
            series
                .iter()
                .find(|s| s.name == name && s.threads == Some(threads))
                .and_then(|s| median(s.runs.iter().map(|r| r.per_second)))
        };
        if let (Some(one), Some(two)) = (at(1), at(2)) {
            outln!(
                out,
                "- {name}: two threads per hop give {:.2} times the requests/s of one.",
                two / one.max(1.0)
            );
        }
    }
    outln!(out);
    Ok(())
}

/// Warms up, then one closed-loop run on `uri`; `cpu` says the CPU time of the hops so far.
async fn measure(
    args: &Args,
    uri: Uri,
    cpu: impl Fn() -> anyhow::Result<Duration>,
) -> anyhow::Result<Run> {
    let client: load::GetClient = load::client();
    load::closed_loop(&client, uri.clone(), args.connections, args.warmup).await?;
    let before = cpu()?;
    let run = load::closed_loop(&client, uri, args.connections, args.duration).await?;
    let spent = cpu()?.saturating_sub(before);
    Ok(Run {
        per_second: run.per_second(),
        errors: run.errors,
        cpu: Some(spent.mul_f64(1000.0 / run.answered.max(1) as f64)),
    })
}

fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}
