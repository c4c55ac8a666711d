//! The overlay as it grows. For each network size: a real `ping-monitor` as the bootstrap, N
//! overlay nodes spread over P worker processes of this binary (`bench overlay-nodes`, so one
//! process's scheduler is not the bottleneck), and K real idle ingress proxies, each its own
//! process. Once the network has fallen quiet after the joins, one node advertises a
//! namespace; a sample of the others looks it up, cold and then warm. Then the network idles
//! past the connection idle timeout and each part's idle cost is read: connections of every
//! node (the workers' nodes from their swarms, the proxies' and the monitor's established TCP
//! sockets from /proc), RSS and CPU of the proxies and the monitor, CPU of the workers per
//! node. Real TCP sockets on loopback throughout.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use control::overlay::{BootstrapAddr, Node, NodeConfig, record_key};
use futures::{StreamExt, future::join_all, stream};
use libp2p::{PeerId, identity::Keypair, kad};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};

use crate::{
    procs::{cpu_time, established_tcp, sibling_binary, start_daemon, status_kb},
    proxy_path::start_proxy_with,
    report::{Report, outln},
    stats::{ms, percentile},
};

const NAMESPACE: &str = "bench-namespace";

#[derive(clap::Args)]
pub struct Args {
    /// Network sizes (overlay nodes besides the monitor and the proxies), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [50, 200, 500, 1000])]
    nodes: Vec<usize>,
    /// Worker processes the nodes are spread over.
    #[arg(long, default_value_t = 4)]
    processes: usize,
    /// Idle ingress proxies (real `proxy` processes) measured in each network.
    #[arg(long, default_value_t = 3)]
    proxies: usize,
    /// Nodes that look the namespace up (cold, then warm).
    #[arg(long, default_value_t = 40)]
    seekers: usize,
    /// How long the network idles before it is measured (longer than the connection idle
    /// timeout, so that what is left is what a node keeps).
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// The window idle CPU is measured over.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    window: Duration,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            nodes: vec![50, 200, 500, 1000],
            processes: 4,
            proxies: 3,
            seekers: 40,
            settle: Duration::from_secs(40),
            window: Duration::from_secs(20),
        }
    }
}

impl Args {
    pub fn quick() -> Self {
        Self {
            nodes: vec![20],
            processes: 2,
            proxies: 1,
            seekers: 6,
            settle: Duration::from_secs(1),
            window: Duration::from_secs(2),
        }
    }
}

/// What one network size measured.
struct Measured {
    nodes: usize,
    joins: Vec<Duration>,
    all_joined: Duration,
    /// When the network's processes fell quiet after the joins ([`quiet`]).
    formed: Duration,
    cold: Vec<Duration>,
    warm: Vec<Duration>,
    failed: usize,
    /// Connections of each worker node after the settle.
    node_connections: Vec<usize>,
    /// Per proxy: established TCP connections, RSS (KiB), CPU share of one core.
    proxies: Vec<(usize, u64, f64)>,
    /// Worker processes' CPU per node, share of one core.
    worker_cpu_per_node: f64,
    /// Monitor: established TCP connections, RSS (KiB), CPU share of one core.
    monitor: (usize, u64, f64),
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("overlay");
    let baseline = two_node_proxy(&args).await?;
    outln!(
        out,
        "## Overlay: cost per node and discovery as the network grows\n\n`{command}`\n\n\
         A `ping-monitor` bootstrap, N overlay nodes in {} worker processes joining it {} at \
         a time per process, and {} idle ingress `proxy` processes. Once the network's \
         processes together use under {:.2} % of a core per member, at least {:.0} % in all \
         (quiet after: seconds from the first join), one node advertises a namespace and {} \
         others look it up (cold: their first lookup; warm: again at once). \
         Then the network idles {:.0} s (past the connection idle timeout) and CPU is read \
         over {:.0} s. Connections: established TCP sockets of a process (proxies, monitor) \
         or the node's swarm (workers). An idle proxy in a 2-node network (monitor and \
         itself): {} connections, RSS {:.1} MiB, CPU {:.3} % of a core.\n",
        args.processes,
        JOIN_CONCURRENCY,
        args.proxies,
        QUIET_PER_MEMBER * 100.0,
        QUIET_FLOOR * 100.0,
        args.seekers,
        args.settle.as_secs_f64(),
        args.window.as_secs_f64(),
        baseline.0,
        baseline.1 as f64 / 1024.0,
        baseline.2 * 100.0,
    );
    outln!(
        out,
        "| nodes | join p50 / p99 / max (ms) | all joined (s) | quiet after (s) | cold lookup \
         p50 / p99 / max (ms) | warm lookup p50 / p99 / max (ms) | lookups failed | connections per node \
         p50 / max | idle proxy: connections, RSS (MiB), CPU (% core) | node CPU, workers \
         (% core) | monitor: connections, RSS (MiB), CPU (% core) |"
    );
    outln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    // A row per size as soon as it is measured, so a run that fails at some size still
    // leaves the figures of the sizes before it, and the failure itself.
    for &nodes in &args.nodes {
        let mut m = match measure(&args, nodes).await {
            Ok(measured) => measured,
            Err(error) => {
                outln!(out, "| {nodes} | failed: {error:#} |");
                outln!(out);
                return Err(error.context(format!("a network of {nodes} nodes")));
            }
        };
        let triple = |samples: &mut Vec<Duration>| {
            format!(
                "{} / {} / {}",
                ms(percentile(samples, 50.0)),
                ms(percentile(samples, 99.0)),
                ms(percentile(samples, 100.0))
            )
        };
        let mut connections = std::mem::take(&mut m.node_connections);
        connections.sort_unstable();
        let median = connections.get(connections.len() / 2).copied().unwrap_or(0);
        let most = connections.last().copied().unwrap_or(0);
        let proxies: Vec<String> = m
            .proxies
            .iter()
            .map(|(c, rss, cpu)| format!("{c}, {:.1}, {:.3}", *rss as f64 / 1024.0, cpu * 100.0))
            .collect();
        outln!(
            out,
            "| {} | {} | {:.1} | {:.0} | {} | {} | {} | {median} / {most} | {} | {:.3} | {}, {:.1}, {:.2} |",
            m.nodes,
            triple(&mut m.joins),
            m.all_joined.as_secs_f64(),
            m.formed.as_secs_f64(),
            triple(&mut m.cold),
            triple(&mut m.warm),
            m.failed,
            proxies.join("; "),
            m.worker_cpu_per_node * 100.0,
            m.monitor.0,
            m.monitor.1 as f64 / 1024.0,
            m.monitor.2 * 100.0,
        );
    }
    outln!(out);
    Ok(())
}

/// How many nodes a worker starts at once: a thousand TCP + noise handshakes and Kademlia
/// bootstraps in the same instant would measure the burst, not the overlay.
const JOIN_CONCURRENCY: usize = 16;

/// An idle proxy with only the monitor for company: (connections, RSS KiB, CPU share).
async fn two_node_proxy(args: &Args) -> anyhow::Result<(usize, u64, f64)> {
    let monitor = start_daemon("ping-monitor", &[]).await?;
    let bootstrap = monitor.bootstrap.to_string();
    let proxy = start_proxy_with(&bootstrap, &[], &[], Default::default()).await?;
    tokio::time::sleep(args.settle).await; // the idle period itself
    let cpu = cpu_share(&[proxy.process.pid], args.window).await?;
    let pid = proxy.process.pid;
    Ok((established_tcp(pid)?, status_kb(pid, "VmRSS")?, cpu))
}

async fn measure(args: &Args, nodes: usize) -> anyhow::Result<Measured> {
    let monitor = start_daemon("ping-monitor", &[]).await?;
    let bootstrap = monitor.bootstrap.to_string();
    let started = Instant::now();
    let processes = args.processes.clamp(1, nodes.max(1));
    let per_worker = nodes.div_ceil(processes);
    let mut workers = join_all((0..processes).map(|i| {
        let count = per_worker.min(nodes.saturating_sub(i * per_worker));
        Worker::start(count, &bootstrap)
    }))
    .await
    .into_iter()
    .collect::<anyhow::Result<Vec<_>>>()?;
    let all_joined = started.elapsed();
    let joins: Vec<Duration> = workers.iter().flat_map(|w| w.joins.clone()).collect();
    let mut proxies = Vec::new();
    for _ in 0..args.proxies {
        proxies.push(start_proxy_with(&bootstrap, &[], &[], Default::default()).await?);
    }

    // Joining returns once a node reached its bootstrap; filling the routing tables (kad's
    // queries, each a connection to a peer met for the first time) goes on after. Lookups
    // are measured in the network that results, not in its joining.
    // Every process of the network: the proxies, the workers, the monitor last.
    let proxy_pids: Vec<u32> = proxies.iter().map(|p| p.process.pid).collect();
    let worker_pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
    let mut all = proxy_pids.clone();
    all.extend(&worker_pids);
    all.push(monitor.pid);
    let formed = quiet(&all, nodes + args.proxies + 1).await?;
    eprintln!(
        "bench: {nodes} nodes quiet {:.1} s after the first join",
        (formed - started).as_secs_f64()
    );
    let provider = workers[0].advertise().await?;
    // Untimed: the record is in the DHT (a node that is not a seeker finds it) before lookups.
    let last = workers.len() - 1;
    if workers[last].ask(&format!("wait {provider}")).await? != "found" {
        // Where the record went, against where a lookup looks: the nodes nearest its key.
        let mut holders = Vec::new();
        for worker in &mut workers {
            holders.extend(worker.holders().await?);
        }
        anyhow::bail!(
            "the provider was not found within {WAIT_LIMIT:?}; {}",
            placement(&holders)
        );
    }
    let (mut cold, mut warm, mut failed) = (Vec::new(), Vec::new(), 0);
    let share = args.seekers.div_ceil(workers.len());
    for worker in &mut workers {
        let (c, w, f) = worker.lookups(provider, share).await?;
        cold.extend(c);
        warm.extend(w);
        failed += f;
    }

    tokio::time::sleep(args.settle).await; // the idle period itself
    let mut node_connections = Vec::new();
    for worker in &mut workers {
        node_connections.extend(worker.connections().await?);
    }
    let before: Vec<Duration> = all.iter().map(|&p| cpu_time(p)).collect::<Result<_, _>>()?;
    let begin = Instant::now();
    tokio::time::sleep(args.window).await; // the measured window itself
    let took = begin.elapsed().as_secs_f64();
    let share_of = |i: usize| -> anyhow::Result<f64> {
        Ok((cpu_time(all[i])? - before[i]).as_secs_f64() / took)
    };
    let mut proxy_figures = Vec::new();
    for (i, &pid) in proxy_pids.iter().enumerate() {
        proxy_figures.push((
            established_tcp(pid)?,
            status_kb(pid, "VmRSS")?,
            share_of(i)?,
        ));
    }
    let mut worker_cpu = 0.0;
    for i in proxy_pids.len()..proxy_pids.len() + worker_pids.len() {
        worker_cpu += share_of(i)?;
    }
    let monitor_figures = (
        established_tcp(monitor.pid)?,
        status_kb(monitor.pid, "VmRSS")?,
        share_of(all.len() - 1)?,
    );
    for worker in workers {
        worker.quit().await;
    }
    Ok(Measured {
        nodes,
        joins,
        all_joined,
        formed: formed - started,
        cold,
        warm,
        failed,
        node_connections,
        proxies: proxy_figures,
        worker_cpu_per_node: worker_cpu / nodes.max(1) as f64,
        monitor: monitor_figures,
    })
}

/// How long the record may take to be found once, before the timed lookups.
const WAIT_LIMIT: Duration = Duration::from_secs(120);

/// How busy a network may be and count as quiet: a share of one core per member (nodes,
/// proxies, the monitor), at least [`QUIET_FLOOR`] for all of it. An idle network is not
/// silent: the monitor pings every member every 5 s (a thousand members, idle: a fifth of a
/// core in all).
const QUIET_PER_MEMBER: f64 = 0.0005;
const QUIET_FLOOR: f64 = 0.1;
/// The longest a network may take to fall quiet.
const FORMING_LIMIT: Duration = Duration::from_secs(1200);

/// Waits until `pids`, the processes of a network of `members`, together use less than
/// [`quiet_limit`] of a core over a second; when that was.
async fn quiet(pids: &[u32], members: usize) -> anyhow::Result<Instant> {
    let limit = quiet_limit(members);
    let begin = Instant::now();
    while begin.elapsed() < FORMING_LIMIT {
        if cpu_share(pids, Duration::from_secs(1)).await? < limit {
            return Ok(Instant::now());
        }
    }
    anyhow::bail!("still busy after {FORMING_LIMIT:?}")
}

/// The share of one core a network of `members` may use and count as quiet.
fn quiet_limit(members: usize) -> f64 {
    (members as f64 * QUIET_PER_MEMBER).max(QUIET_FLOOR)
}

/// CPU used by `pids` over `window`, as a share of one core.
async fn cpu_share(pids: &[u32], window: Duration) -> anyhow::Result<f64> {
    let total = |pids: &[u32]| -> anyhow::Result<Duration> {
        pids.iter()
            .map(|&p| cpu_time(p))
            .sum::<anyhow::Result<Duration>>()
    };
    let before = total(pids)?;
    let begin = Instant::now();
    tokio::time::sleep(window).await; // the measured window itself
    Ok((total(pids)? - before).as_secs_f64() / begin.elapsed().as_secs_f64())
}

/// A worker process hosting overlay nodes, driven over its standard input and output.
struct Worker {
    _child: Child,
    pid: u32,
    input: ChildStdin,
    output: Lines<BufReader<ChildStdout>>,
    joins: Vec<Duration>,
}

impl Worker {
    async fn start(nodes: usize, bootstrap: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(sibling_binary("bench")?)
            .args(["overlay-nodes", "--nodes", &nodes.to_string()])
            .args(["--bootstrap", bootstrap])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start an overlay worker")?;
        let pid = child.id().context("the worker exited at once")?;
        let input = child.stdin.take().context("stdin")?;
        let output = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut worker = Self {
            _child: child,
            pid,
            input,
            output,
            joins: Vec::new(),
        };
        let joined = worker.answer().await?;
        worker.joins = durations(&joined).with_context(|| format!("join times, not {joined:?}"))?;
        Ok(worker)
    }

    /// The next line it prints; an error if it printed one starting with `error`.
    async fn answer(&mut self) -> anyhow::Result<String> {
        let line = (self.output.next_line().await?).context("the worker exited")?;
        match line.strip_prefix("error ") {
            Some(error) => anyhow::bail!("worker {}: {error}", self.pid),
            None => Ok(line),
        }
    }

    async fn ask(&mut self, line: &str) -> anyhow::Result<String> {
        self.input.write_all(format!("{line}\n").as_bytes()).await?;
        self.answer().await
    }

    async fn advertise(&mut self) -> anyhow::Result<PeerId> {
        let line = self.ask("advertise").await?;
        line.parse()
            .with_context(|| format!("a peer ID, not {line:?}"))
    }

    /// Cold then warm lookups from `count` of its nodes: (cold, warm, failed).
    async fn lookups(
        &mut self,
        provider: PeerId,
        count: usize,
    ) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, usize)> {
        let cold = self.ask(&format!("find {provider} {count}")).await?;
        let warm = self.ask(&format!("find {provider} {count}")).await?;
        let failed = |line: &str| line.split_whitespace().filter(|w| *w == "failed").count();
        let parse = |line: &str| durations(line).with_context(|| format!("lookup times: {line:?}"));
        Ok((parse(&cold)?, parse(&warm)?, failed(&cold) + failed(&warm)))
    }

    /// Each of its nodes and whether it holds the namespace's provider record.
    async fn holders(&mut self) -> anyhow::Result<Vec<(PeerId, bool)>> {
        let line = self.ask("holders").await?;
        let parse = |word: &str| -> anyhow::Result<(PeerId, bool)> {
            let (peer, held) = word.split_once(':').context("PEER:0|1")?;
            Ok((peer.parse()?, held == "1"))
        };
        let holders: anyhow::Result<Vec<_>> = line.split_whitespace().map(parse).collect();
        holders.with_context(|| format!("holders, not {line:?}"))
    }

    async fn connections(&mut self) -> anyhow::Result<Vec<usize>> {
        let line = self.ask("connections").await?;
        let counts: Result<Vec<usize>, _> = line.split_whitespace().map(str::parse).collect();
        counts.with_context(|| format!("connection counts, not {line:?}"))
    }

    async fn quit(mut self) {
        let _ = self.ask("quit").await;
    }
}

/// Which of the nodes nearest the namespace's key (by Kademlia's XOR distance, ranked from 1)
/// hold its provider record, in words.
fn placement(holders: &[(PeerId, bool)]) -> String {
    let key = kad::KBucketKey::new(record_key(NAMESPACE));
    let mut ranked: Vec<_> = holders
        .iter()
        .map(|(peer, held)| (kad::KBucketKey::from(*peer).distance(&key), *held))
        .collect();
    ranked.sort_unstable_by_key(|(distance, _)| *distance);
    let ranks: Vec<String> = (ranked.iter().enumerate())
        .filter(|(_, (_, held))| *held)
        .map(|(i, _)| (i + 1).to_string())
        .collect();
    format!(
        "the record is held by {} of the {} worker nodes, ranked by distance to its key: {}",
        ranks.len(),
        ranked.len(),
        ranks.join(" ")
    )
}

/// Milliseconds separated by spaces (`failed` entries skipped).
fn durations(line: &str) -> anyhow::Result<Vec<Duration>> {
    line.split_whitespace()
        .filter(|w| *w != "failed")
        .map(|w| Ok(Duration::from_secs_f64(w.parse::<f64>()? / 1e3)))
        .collect()
}

#[derive(clap::Args)]
pub struct NodesArgs {
    /// Nodes this process hosts.
    #[arg(long)]
    nodes: usize,
    /// The network's bootstrap.
    #[arg(long)]
    bootstrap: BootstrapAddr,
}

/// A worker: starts its nodes, prints each one's join time (ms) on one line, then answers
/// one line per command read: `advertise` (the first node advertises the namespace; prints
/// its peer ID), `find PEER N` (N of its nodes, from the second on and never the last, look
/// the namespace up until PEER is among the providers; prints each lookup's ms or `failed`),
/// `wait PEER` (the last node looks until it finds PEER, up to [`WAIT_LIMIT`]; prints `found`
/// or `missing`), `holders` (each node's peer ID and whether it holds the namespace's record:
/// `PEER:1` or `PEER:0`), `connections` (each node's connection count), `quit`.
pub async fn serve_nodes(args: NodesArgs) -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        // The nodes' logs, on the bench's standard error, when asked for.
        control::common::telemetry::init_logs(false, Default::default());
    }
    let started: Vec<(anyhow::Result<Node>, Duration)> = stream::iter(0..args.nodes)
        .map(|_| {
            let bootstrap = args.bootstrap.clone();
            async move {
                let begin = Instant::now();
                let mut config = NodeConfig::new("bench", Keypair::generate_ed25519());
                config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")];
                config.bootstraps = vec![bootstrap];
                (
                    Node::start(config).await.map_err(Into::into),
                    begin.elapsed(),
                )
            }
        })
        .buffer_unordered(JOIN_CONCURRENCY)
        .collect()
        .await;
    let mut nodes = Vec::new();
    let mut joins = Vec::new();
    for (node, took) in started {
        match node {
            Ok(node) => {
                nodes.push(node);
                joins.push(format!("{:.1}", took.as_secs_f64() * 1e3));
            }
            Err(error) => {
                println!("error a node could not join: {error:#}");
                return Ok(());
            }
        }
    }
    println!("{}", joins.join(" "));
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = commands.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["advertise"] => {
                nodes[0].advertise(NAMESPACE).await;
                println!("{}", nodes[0].peer_id());
            }
            ["find", peer, count] => {
                let peer: PeerId = peer.parse()?;
                let mut took = Vec::new();
                let seekers = &nodes[1.min(nodes.len())..nodes.len().saturating_sub(1)];
                for seeker in seekers.iter().take(count.parse()?) {
                    took.push(match find(seeker, peer, Duration::from_secs(30)).await {
                        Some(d) => format!("{:.1}", d.as_secs_f64() * 1e3),
                        None => "failed".to_owned(),
                    });
                }
                println!("{}", took.join(" "));
            }
            ["wait", peer] => {
                let peer: PeerId = peer.parse()?;
                let last = nodes.last().context("no nodes")?;
                match find(last, peer, WAIT_LIMIT).await {
                    Some(_) => println!("found"),
                    None => println!("missing"),
                }
            }
            ["holders"] => {
                let held = join_all(nodes.iter().map(|n| n.local_providers(NAMESPACE))).await;
                let words: Vec<String> = (nodes.iter().zip(held))
                    .map(|(node, held)| {
                        format!("{}:{}", node.peer_id(), u8::from(!held.is_empty()))
                    })
                    .collect();
                println!("{}", words.join(" "));
            }
            ["connections"] => {
                let counts = join_all(nodes.iter().map(Node::connected_peers)).await;
                let counts: Vec<String> = counts.iter().map(|c| c.len().to_string()).collect();
                println!("{}", counts.join(" "));
            }
            ["quit"] => break,
            _ => println!("error unknown command {line:?}"),
        }
    }
    join_all(nodes.iter().map(Node::shutdown)).await;
    println!("bye");
    Ok(())
}

/// Searches from `seeker` until `provider` is found; how long that took, None if not within
/// `limit`.
async fn find(seeker: &Node, provider: PeerId, limit: Duration) -> Option<Duration> {
    let begin = Instant::now();
    while begin.elapsed() < limit {
        let mut found = seeker.find_providers(NAMESPACE).await;
        while let Some(peer) = found.next().await {
            if peer == provider {
                return Some(begin.elapsed());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_network_may_be_busier_and_count_as_quiet() {
        assert_eq!(quiet_limit(24), QUIET_FLOOR);
        assert_eq!(quiet_limit(150), QUIET_FLOOR);
        assert!((quiet_limit(1004) - 0.502).abs() < 1e-9);
    }

    #[test]
    fn placement_ranks_the_holders_by_distance_to_the_key() {
        let key = kad::KBucketKey::new(record_key(NAMESPACE));
        let mut peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        peers.sort_by_key(|peer| kad::KBucketKey::from(*peer).distance(&key));
        let holders = [
            (peers[3], true),
            (peers[0], false),
            (peers[1], true),
            (peers[4], false),
            (peers[2], false),
        ];
        assert_eq!(
            placement(&holders),
            "the record is held by 2 of the 5 worker nodes, ranked by distance to its key: 2 4"
        );
    }
}
