//! Footprint of an idle ping-monitor: the release binary as a separate process, N overlay
//! nodes (in this process) joined to it, every peer pinged every second; then resident memory
//! and CPU time over an idle minute are read from /proc.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use control::overlay::{BootstrapAddr, Node, NodeConfig};
use futures::future::join_all;
use libp2p::identity::Keypair;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
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

/// The ping-monitor built beside this benchmark (same profile).
fn ping_monitor_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("ping-monitor");
    if !path.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release --workspace`",
            path.display()
        );
    }
    Ok(path)
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM).
fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// User plus system CPU time of a process, from /proc/PID/stat (clock ticks of 10 ms).
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut monitor = Command::new(ping_monitor_binary()?)
        .args([
            "--ephemeral",
            "--p2p-listen-addr",
            "127.0.0.1:0",
            "--prom-listen-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = monitor.id().context("monitor exited")?;
    let mut lines = BufReader::new(monitor.stdout.take().context("stdout")?).lines();
    let addr: BootstrapAddr = loop {
        let line = lines
            .next_line()
            .await?
            .context("monitor exited before printing its address")?;
        if line.contains("/p2p/") {
            break line.parse().map_err(anyhow::Error::msg)?;
        }
    };
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

    println!(
        "### Idle ping-monitor with {} peers (pinged every 1 s)\n",
        args.peers
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| RSS before any peer | {:.1} MiB |",
        rss_alone as f64 / 1024.0
    );
    println!(
        "| RSS with {} peers, after {:.0} s idle | {:.1} MiB |",
        args.peers,
        idle.as_secs_f64(),
        rss as f64 / 1024.0
    );
    println!("| peak RSS (VmHWM) | {:.1} MiB |", peak as f64 / 1024.0);
    println!(
        "| CPU while idle | {:.2} % of one core |",
        100.0 * cpu.as_secs_f64() / idle.as_secs_f64()
    );
    println!();
    Ok(())
}
