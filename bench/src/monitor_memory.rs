//! Footprint of an idle ping-monitor: the release binary as a separate process, N overlay
//! nodes (in this process) joined to it, every peer pinged every second; then resident memory
//! and CPU time over an idle minute are read from /proc.

use std::time::{Duration, Instant};

use control::overlay::{Node, NodeConfig};
use futures::future::join_all;
use libp2p::identity::Keypair;

use crate::{
    procs::{cpu_time, start_daemon, status_kb},
    report::{Report, outln},
};

#[derive(clap::Args)]
pub struct Args {
    /// Peers joined to the monitor.
    #[arg(long, default_value_t = 50)]
    peers: usize,
    /// How long the monitor idles (pinging its peers) before it is measured.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle: Duration,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            peers: 50,
            idle: Duration::from_secs(60),
        }
    }
}

impl Args {
    pub fn quick() -> Self {
        Self {
            peers: 5,
            idle: Duration::from_secs(2),
        }
    }
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("monitor-memory");
    let monitor = start_daemon("ping-monitor", &[]).await?;
    let (pid, addr) = (monitor.pid, monitor.bootstrap.clone());
    let rss_alone = status_kb(pid, "VmRSS")?;

    let peers = join_all((0..args.peers).map(|_| {
        let mut config = NodeConfig::new("bench", Keypair::generate_ed25519());
        config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")];
        config.bootstraps = vec![addr.clone()];
        Node::start(config)
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;

    let cpu_before = cpu_time(pid)?;
    let idle_start = Instant::now();
    tokio::time::sleep(args.idle).await; // the measured idle period itself
    let idle = idle_start.elapsed();
    let cpu = cpu_time(pid)? - cpu_before;
    let rss = status_kb(pid, "VmRSS")?;
    let peak = status_kb(pid, "VmHWM")?;
    for peer in &peers {
        peer.shutdown().await;
    }
    drop(monitor);

    outln!(
        out,
        "## Idle ping-monitor with {} peers (pinged every 1 s)\n\n`{command}`\n\n\
         The `ping-monitor` as its own process, the peers in this process joined to it; RSS \
         and CPU from `/proc/<pid>/status` and `/proc/<pid>/stat`.\n",
        args.peers
    );
    outln!(out, "| measure | value |");
    outln!(out, "|---|---|");
    outln!(
        out,
        "| RSS before any peer | {:.1} MiB |",
        rss_alone as f64 / 1024.0
    );
    outln!(
        out,
        "| RSS with {} peers, after {:.0} s idle | {:.1} MiB |",
        args.peers,
        idle.as_secs_f64(),
        rss as f64 / 1024.0
    );
    outln!(
        out,
        "| peak RSS (VmHWM) | {:.1} MiB |",
        peak as f64 / 1024.0
    );
    outln!(
        out,
        "| CPU while idle | {:.2} % of one core |",
        100.0 * cpu.as_secs_f64() / idle.as_secs_f64()
    );
    outln!(out);
    Ok(())
}
