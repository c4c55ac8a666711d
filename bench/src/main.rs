//! Benchmarks of multi-tier-cloud that need whole programs or networks (micro-benchmarks of
//! pure code are criterion benches under `benches/`). Each writes Markdown tables into a
//! [`Report`]; `all` writes them to `bench/RESULTS.md`.
//!
//! ```sh
//! cargo build --release --workspace
//! cargo run -p bench --release -- all          # or one: overlay, monitor-memory, lookup, quic,
//!                                              # side-by-side, stream, cold-start, tiers,
//!                                              # probes, slow-service, tunnel, workers,
//!                                              # faults, protocols
//! ```

mod body;
mod cold_start;
mod compare;
mod faults;
mod foreign;
mod load;
mod lookup;
mod monitor_memory;
mod overlay;
mod paths;
mod pinning;
mod plot;
mod probes;
mod procs;
mod protocols;
mod proxy_path;
mod quic;
mod report;
mod scrape;
mod serve;
mod side_by_side;
mod slow_service;
mod stats;
mod stream;
mod tiers;
mod tunnel;
mod workers;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::report::Report;

#[derive(Parser)]
#[command(name = "bench", about = "Benchmarks of multi-tier-cloud")]
struct Cli {
    /// Where `all` writes RESULTS.md, and every scenario its plots (under `results/`).
    #[arg(long, global = true, default_value = env!("CARGO_MANIFEST_DIR"))]
    out: PathBuf,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Every scenario, one after the other; writes RESULTS.md and the plots.
    All {
        /// Small sizes and short runs: proves the suite works end to end, measures nothing
        /// worth keeping (CI runs this, with `--out` elsewhere).
        #[arg(long)]
        quick: bool,
    },
    /// Networks of N nodes over several processes, with a ping-monitor and idle proxies:
    /// joins, cold and warm provider lookups, and each node's idle connections, memory and CPU.
    Overlay(overlay::Args),
    /// Resident memory and CPU of an idle ping-monitor process with N peers.
    MonitorMemory(monitor_memory::Args),
    /// A large image archive through hl-cli, hl-service and a second node; get latency.
    Lookup(lookup::Args),
    /// The data plane's QUIC transport: authenticated handshakes and stream round trips.
    Quic(quic::Args),
    /// The same rates through direct, ours (ingress -> QUIC -> sidecar), two nginx and two
    /// haproxy (Debian's, started here): latency, CPU and memory per hop, maximum throughput.
    SideBySide(side_by_side::Args),
    /// A large response and a large upload through each of those paths: throughput, memory.
    #[command(alias = "proxy-stream")]
    Stream(stream::Args),
    /// Request to first byte for a service with no instance: an allocator starts one (process
    /// and Docker runtimes), the first run and the later ones apart, where the time goes.
    ColdStart(cold_start::Args),
    /// Three instances behind delay relays (edge and two clouds), then one stalling: where
    /// each choice policy sends requests, and their tail latency.
    Tiers(tiers::Args),
    /// Probe messages a second on one instance used by 1, 10 and 50 ingresses, idle and busy.
    Probes(probes::Args),
    /// A service answering in 150 ms, an allocator on a far machine and one joining on the
    /// ingress's: instances started, allocations asked, who answered, service time apart
    /// from network RTT.
    SlowService(slow_service::Args),
    /// TCP through l4-proxy and its sidecar, two haproxy in mode tcp and with TLS between
    /// them: throughput, CPU, memory, added latency; UDP datagrams a second and loss.
    Tunnel(tunnel::Args),
    /// Closed-loop throughput and CPU with one and two worker threads per proxy: ours
    /// (`--worker-threads`) and haproxy (`nbthread`), nothing pinned.
    Workers(workers::Args),
    /// SIGKILL (and restart) and SIGSTOP of an instance, its sidecar, the allocator, an
    /// hl-service, the ping-monitor and an etcd member under a steady load through an
    /// ingress: failed requests, time to recover, what was left behind, state picked up.
    Faults(faults::Args),
    /// A WebSocket round trip, a server-sent event's delay and gRPC unary calls (latency,
    /// closed-loop throughput, CPU of both hops) through ours, against direct and, for gRPC,
    /// two nginx (grpc_pass) and two haproxy (HTTP/2) hops.
    Protocols(protocols::Args),
    /// Overlay nodes driven by `overlay` over standard input and output.
    #[command(hide = true)]
    OverlayNodes(overlay::NodesArgs),
    /// The HTTP service behind the proxies (the data-plane scenarios start it themselves).
    #[command(hide = true)]
    Serve(serve::Args),
    /// The TCP and UDP service behind the tunnels (`tunnel` starts it).
    #[command(hide = true)]
    ServeL4(tunnel::ServeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut out = Report::new(&cli.out, None);
    match cli.scenario {
        Scenario::All { quick } => {
            out = Report::new(&cli.out, Some(quick));
            all(quick, &mut out).await?;
            out.write_results(&cli.out, &report::command_line())?;
        }
        Scenario::Overlay(args) => overlay::run(args, &mut out).await?,
        Scenario::MonitorMemory(args) => monitor_memory::run(args, &mut out).await?,
        Scenario::Lookup(args) => lookup::run(args, &mut out).await?,
        Scenario::Quic(args) => quic::run(args, &mut out).await?,
        Scenario::SideBySide(args) => side_by_side::run(args, &mut out).await?,
        Scenario::Stream(args) => stream::run(args, &mut out).await?,
        Scenario::ColdStart(args) => cold_start::run(args, &mut out).await?,
        Scenario::Tiers(args) => tiers::run(args, &mut out).await?,
        Scenario::Probes(args) => probes::run(args, &mut out).await?,
        Scenario::SlowService(args) => slow_service::run(args, &mut out).await?,
        Scenario::Tunnel(args) => tunnel::run(args, &mut out).await?,
        Scenario::Workers(args) => workers::run(args, &mut out).await?,
        Scenario::Faults(args) => faults::run(args, &mut out).await?,
        Scenario::Protocols(args) => protocols::run(args, &mut out).await?,
        Scenario::OverlayNodes(args) => overlay::serve_nodes(args).await?,
        Scenario::Serve(args) => serve::run(args).await?,
        Scenario::ServeL4(args) => tunnel::serve(args).await?,
    }
    Ok(())
}

/// Every scenario, with its default sizes or its quick ones; an error names the scenario.
async fn all(quick: bool, out: &mut Report) -> anyhow::Result<()> {
    macro_rules! run {
        ($($module:ident),*) => {$(
            let args = if quick {
                $module::Args::quick()
            } else {
                $module::Args::default()
            };
            let started = std::time::Instant::now();
            $module::run(args, out)
                .await
                .context(concat!("scenario ", stringify!($module)))?;
            // What each scenario costs (CI runs them all in its time budget).
            let took = started.elapsed().as_secs_f64();
            eprintln!("bench: {} took {took:.0} s", stringify!($module));
        )*};
    }
    run!(
        overlay,
        monitor_memory,
        lookup,
        quic,
        side_by_side,
        stream,
        cold_start,
        tiers,
        probes,
        slow_service,
        tunnel,
        workers,
        faults,
        protocols
    );
    Ok(())
}
