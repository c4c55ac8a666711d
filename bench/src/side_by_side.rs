//! The `side-by-side` scenario: the same service, load generator and rates through the four
//! [`Paths`] on this machine, in one run.
//!
//! For each rate: latency percentiles (open loop, coordinated omission corrected) and their
//! curves, what each path adds over direct, the CPU each hop spends per 1000 requests; then
//! every hop's peak memory and each path's closed-loop maximum throughput. Wherever ours is
//! behind nginx or haproxy, the report says by how much.

use std::time::Duration;

use crate::{
    compare::{Better, compare},
    load::{self, ClosedLoop, OpenLoop},
    paths::{Paths, Via},
    plot::Curve,
    procs::mib,
    report::{Report, outln},
    stats::{histogram_percentiles, ms2, print_table},
};

#[derive(clap::Args)]
pub struct Args {
    /// Requests a second of the open-loop runs: repeat the flag or give a list
    /// (`--rates 1000,5000`); one full set of runs per rate.
    #[arg(long = "rates", alias = "rate", value_delimiter = ',', default_values_t = [1000, 5000])]
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
}

impl Default for Args {
    fn default() -> Self {
        Self {
            rates: vec![1000, 5000],
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(3),
            workers: 32,
            closed_duration: Duration::from_secs(5),
        }
    }
}

impl Args {
    /// Proves the scenario runs, measures nothing worth keeping.
    pub fn quick() -> Self {
        Self {
            rates: vec![1000],
            duration: Duration::from_secs(2),
            warmup: Duration::from_secs(1),
            workers: 8,
            closed_duration: Duration::from_secs(1),
        }
    }
}

const PERCENTILES: [f64; 5] = [50.0, 90.0, 99.0, 99.9, 100.0];

/// What one path measured at one rate.
struct Measured {
    open: OpenLoop,
    /// CPU of each hop per 1000 requests of the measured run (none for direct).
    cpu: Option<(Duration, Duration)>,
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("side-by-side");
    let paths = Paths::start().await?;
    outln!(
        out,
        "## Side by side: direct, ours, nginx, haproxy, nginx-tls, haproxy-tls (1 KiB responses)\n\n\
         `{command}`\n\n\
         Open loop {:.0} s per path and rate after {:.0} s unrecorded warm-up; closed loop \
         {} workers for {:.0} s per path. Each nginx is one master with `worker_processes 1`, \
         each haproxy one process with `nbthread 1`, both keeping upstream connections alive \
         (nginx `keepalive 64` with HTTP/1.1, haproxy `http-reuse always`); in the -tls paths \
         the hop between the two is TLS 1.3 (ECDSA P-256 certificate, sessions resumed), as \
         ours is encrypted between ingress and sidecar; ours runs one worker thread per proxy \
         (`--worker-threads 1`, the default). CPU: {}.\n",
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        args.workers,
        args.closed_duration.as_secs_f64(),
        paths.pinned,
    );

    for &rate in &args.rates {
        let mut measured = Vec::new();
        for via in Via::ALL {
            let uri = paths.uri(via, "/echo");
            // A client per path and rate: no idle connection from another run is reused.
            let client: load::GetClient = load::client();
            load::open_loop(&client, uri.clone(), rate, args.warmup).await?;
            let before = paths.hop_cpu(via)?;
            let open = load::open_loop(&client, uri, rate, args.duration).await?;
            let after = paths.hop_cpu(via)?;
            let per_1000 = |after: Duration, before: Duration| {
                after
                    .saturating_sub(before)
                    .mul_f64(1000.0 / open.sent.max(1) as f64)
            };
            let cpu = before
                .zip(after)
                .map(|(b, a)| (per_1000(a.0, b.0), per_1000(a.1, b.1)));
            measured.push((via, Measured { open, cpu }));
        }
        outln!(
            out,
            "### {rate} requests/s, open loop, {:.0} s\n",
            args.duration.as_secs_f64()
        );
        print_latency(out, &measured);
        let curves: Vec<Curve> = measured
            .iter()
            .map(|(via, m)| Curve {
                label: via.name(),
                latency_us: &m.open.latency,
            })
            .collect();
        out.plot(
            &format!("side-by-side-{rate}rps"),
            &format!("Latency at {rate} requests/s, 1 KiB responses"),
            &curves,
        )?;
        print_cpu(out, &measured);
    }

    let open_peaks = peaks(&paths)?;
    let mut closed = Vec::new();
    for via in Via::ALL {
        let client: load::GetClient = load::client();
        let uri = paths.uri(via, "/echo");
        let run = load::closed_loop(&client, uri, args.workers, args.closed_duration);
        closed.push((via, run.await?));
    }
    let closed_peaks = peaks(&paths)?;
    outln!(out, "### Memory and maximum throughput\n");
    print_peaks(out, &open_peaks, &closed_peaks);
    print_throughput(out, args.workers, &closed);
    paths.stop().await;
    Ok(())
}

/// Peak RSS of both hops of every proxied path, in kB.
fn peaks(paths: &Paths) -> anyhow::Result<Vec<(Via, (u64, u64))>> {
    Via::PROXIED
        .into_iter()
        .map(|via| Ok((via, paths.hop_peaks(via)?.unwrap_or_default())))
        .collect()
}

fn print_latency(out: &mut Report, measured: &[(Via, Measured)]) {
    let at: Vec<(Via, Vec<Duration>)> = measured
        .iter()
        .map(|(via, m)| (*via, histogram_percentiles(&m.open.latency, &PERCENTILES)))
        .collect();
    let rows: Vec<(&str, Vec<String>)> = at
        .iter()
        .map(|(via, values)| (via.describe(), values.iter().copied().map(ms2).collect()))
        .collect();
    print_table(out, "path", &PERCENTILES, &rows);
    let direct = &at[0].1;
    let added: Vec<(Via, Vec<f64>)> = at[1..]
        .iter()
        .map(|(via, values)| {
            let added = values
                .iter()
                .zip(direct)
                .map(|(v, d)| (v.as_secs_f64() - d.as_secs_f64()) * 1e3)
                .collect();
            (*via, added)
        })
        .collect();
    let rows: Vec<(&str, Vec<String>)> = added
        .iter()
        .map(|(via, ms)| (via.name(), ms.iter().map(|v| format!("{v:+.2}")).collect()))
        .collect();
    print_table(out, "added over direct", &PERCENTILES, &rows);
    for (column, &p) in PERCENTILES.iter().enumerate() {
        let figure = if p >= 100.0 {
            "added max".to_owned()
        } else {
            format!("added p{p}")
        };
        let values: Vec<(&str, f64)> = added.iter().map(|(v, ms)| (v.name(), ms[column])).collect();
        compare(out, &figure, "ms", Better::Lower, &values);
    }
    outln!(out);
    for (via, m) in measured {
        outln!(
            out,
            "{}: {} requests, {} errors{}  ",
            via.name(),
            m.open.sent,
            m.open.errors,
            m.open
                .first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
    }
    outln!(out);
}

fn print_cpu(out: &mut Report, measured: &[(Via, Measured)]) {
    outln!(
        out,
        "| CPU per 1000 requests (open loop) | first hop | second hop | both |"
    );
    outln!(out, "|---|---|---|---|");
    let mut both = Vec::new();
    for (via, m) in measured {
        if let Some((first, second)) = m.cpu {
            outln!(
                out,
                "| {} | {:.3} s | {:.3} s | {:.3} s |",
                via.hops(),
                first.as_secs_f64(),
                second.as_secs_f64(),
                (first + second).as_secs_f64()
            );
            both.push((via.name(), (first + second).as_secs_f64()));
        }
    }
    outln!(out);
    compare(
        out,
        "CPU of both hops per 1000 requests",
        "s",
        Better::Lower,
        &both,
    );
    outln!(out);
}

fn print_peaks(out: &mut Report, open: &[(Via, (u64, u64))], closed: &[(Via, (u64, u64))]) {
    outln!(out, "| peak RSS (VmHWM) | first hop | second hop |");
    outln!(out, "|---|---|---|");
    for (when, peaks) in [
        ("after the open loops", open),
        ("after the closed loops", closed),
    ] {
        for (via, (first, second)) in peaks {
            outln!(
                out,
                "| {}, {when} | {} | {} |",
                via.name(),
                mib(*first),
                mib(*second)
            );
        }
    }
    outln!(out);
    let per_hop: Vec<(&str, f64)> = closed
        .iter()
        .map(|(via, (a, b))| (via.name(), (*a).max(*b) as f64 / 1024.0))
        .collect();
    compare(
        out,
        "largest peak RSS of one hop",
        "MiB",
        Better::Lower,
        &per_hop,
    );
    outln!(
        out,
        "\nnginx figures are master + worker of each hop; haproxy one process per hop; ours one \
         process per hop.\n"
    );
}

fn print_throughput(out: &mut Report, workers: usize, closed: &[(Via, ClosedLoop)]) {
    outln!(
        out,
        "| closed loop, {workers} workers | requests/s | errors |"
    );
    outln!(out, "|---|---|---|");
    for (via, run) in closed {
        outln!(
            out,
            "| {} | {:.0} | {} |",
            via.name(),
            run.per_second(),
            run.errors
        );
    }
    outln!(out);
    let rates: Vec<(&str, f64)> = closed
        .iter()
        .filter(|(via, _)| *via != Via::Direct)
        .map(|(via, run)| (via.name(), run.per_second()))
        .collect();
    compare(
        out,
        "closed-loop requests/s",
        "req/s",
        Better::Higher,
        &rates,
    );
    outln!(out);
}
