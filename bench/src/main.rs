//! Benchmarks of multi-tier-cloud that need whole programs or networks (micro-benchmarks of
//! pure code are criterion benches under `benches/`). Each prints a Markdown table ready for
//! `bench/RESULTS.md`.
//!
//! ```sh
//! cargo build --release --workspace
//! cargo run -p bench --release -- all          # or one: overlay, monitor-memory, lookup, quic,
//!                                              # proxy-latency, proxy-stream, cold-start,
//!                                              # side-by-side
//! ```

mod body;
mod cold_start;
mod load;
mod lookup;
mod monitor_memory;
mod overlay;
mod procs;
mod proxy_path;
mod proxy_stream;
mod quic;
mod serve;
mod side_by_side;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bench", about = "Benchmarks of multi-tier-cloud")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Every scenario, one after the other.
    All,
    /// N nodes in one process join one bootstrap; time to join and to answer provider lookups.
    Overlay(overlay::Args),
    /// Resident memory and CPU of an idle ping-monitor process with N peers.
    MonitorMemory(monitor_memory::Args),
    /// A large image archive through hl-cli, hl-service and a second node; get latency.
    Lookup(lookup::Args),
    /// The data plane's QUIC transport: authenticated handshakes and stream round trips.
    Quic(quic::Args),
    /// Latency at a fixed request rate, direct and through ingress -> QUIC -> sidecar; the
    /// proxies' CPU and memory; closed-loop throughput.
    ProxyLatency(proxy_path::Args),
    /// A large response and a large upload through ingress and sidecar: throughput, memory.
    ProxyStream(proxy_stream::Args),
    /// Request to first byte for a service with no instance: an allocator starts one (process
    /// and Docker runtimes), the first run and the later ones apart, where the time goes.
    ColdStart(cold_start::Args),
    /// The same rates through direct, ours (ingress -> QUIC -> sidecar), two nginx and two
    /// haproxy (Debian's, started here): latency, CPU and memory per hop, maximum throughput.
    SideBySide(side_by_side::Args),
    /// The HTTP service behind the proxies (the data-plane scenarios start it themselves).
    #[command(hide = true)]
    Serve(serve::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::All => {
            overlay::run(overlay::Args::default()).await?;
            monitor_memory::run(monitor_memory::Args::default()).await?;
            lookup::run(lookup::Args::default()).await?;
            quic::run(quic::Args::default()).await?;
            proxy_path::run(proxy_path::Args::default()).await?;
            proxy_stream::run(proxy_stream::Args::default()).await?;
            cold_start::run(cold_start::Args::default()).await?;
            side_by_side::run(side_by_side::Args::default()).await?;
        }
        Scenario::Overlay(args) => overlay::run(args).await?,
        Scenario::MonitorMemory(args) => monitor_memory::run(args).await?,
        Scenario::Lookup(args) => lookup::run(args).await?,
        Scenario::Quic(args) => quic::run(args).await?,
        Scenario::ProxyLatency(args) => proxy_path::run(args).await?,
        Scenario::ProxyStream(args) => proxy_stream::run(args).await?,
        Scenario::ColdStart(args) => cold_start::run(args).await?,
        Scenario::SideBySide(args) => side_by_side::run(args).await?,
        Scenario::Serve(args) => serve::run(args).await?,
    }
    Ok(())
}
