//! The overlay as it grows. For each network size: a real `ping-monitor` as the bootstrap, N
//! overlay nodes spread over P worker processes of this binary (`bench overlay-nodes`, so one
//! process's scheduler is not the bottleneck), and K real idle ingress proxies, each its own
//! process. Once the network has fallen quiet after the joins, one node advertises a
//! namespace; a sample of the others looks it up, cold and then warm. Then the network idles
//! past the connection idle timeout and each part's idle cost is read: connections of every
//! node (the workers' nodes from their swarms, the proxies' and the monitor's established TCP
//! sockets from /proc), RSS and CPU of the proxies and the monitor, CPU of the workers per
//! node. At one size (`--churn-nodes`) instances of a service then come and go while an
//! observer node looks it up as an ingress does, and how soon it lists each new instance and
//! stops listing each stopped one is read. Real TCP sockets on loopback throughout.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use control::{
    overlay::{BootstrapAddr, Node, NodeConfig, Timing, record_key},
    rpc::{NodeInfoProtocol, serve_node_info},
};
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
/// The service whose instances come and go in the churn run.
const CHURN_NAMESPACE: &str = "bench-churn";

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
    /// The network size (one of --nodes) that also gets the churn run: instances of a service
    /// advertised and withdrawn while an observer looks the service up as an ingress does.
    #[arg(long, default_value_t = 500)]
    churn_nodes: usize,
    /// Instances started (advertised) in the churn run, evenly over --churn-over.
    #[arg(long, default_value_t = 100)]
    churn_instances: usize,
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    churn_over: Duration,
    /// How long each instance lives before it stops (withdraws).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    churn_life: Duration,
    /// How often the observer looks the service up (an ingress's `discover-interval`).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    churn_poll: Duration,
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
            churn_nodes: 500,
            churn_instances: 100,
            churn_over: Duration::from_secs(60),
            churn_life: Duration::from_secs(15),
            churn_poll: Duration::from_secs(1),
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
            churn_nodes: 20,
            churn_instances: 6,
            churn_over: Duration::from_secs(3),
            churn_life: Duration::from_secs(2),
            churn_poll: Duration::from_millis(500),
        }
    }
}

/// Provider lookups: until the provider was seen, and until the lookup's stream ended.
#[derive(Default)]
struct Lookups {
    cold: Vec<Duration>,
    warm: Vec<Duration>,
    cold_end: Vec<Duration>,
    warm_end: Vec<Duration>,
    failed: usize,
}

/// What one network size measured.
struct Measured {
    nodes: usize,
    joins: Vec<Duration>,
    all_joined: Duration,
    /// When the network's processes fell quiet after the joins ([`quiet`]).
    formed: Duration,
    lookups: Lookups,
    /// Connections of each worker node after the settle.
    node_connections: Vec<usize>,
    /// Per proxy: established TCP connections, RSS (KiB), CPU share of one core.
    proxies: Vec<(usize, u64, f64)>,
    /// Worker processes' CPU per node, share of one core.
    worker_cpu_per_node: f64,
    /// Monitor: established TCP connections, RSS (KiB), CPU share of one core.
    monitor: (usize, u64, f64),
    /// The churn run, at [`Args::churn_nodes`].
    churn: Option<Churn>,
}

/// What the churn run measured, per instance.
struct Churn {
    /// From the first advertisement to the last (the schedule, as it was kept).
    spread: Duration,
    /// From an instance's advertisement to the observer's first sight of it.
    seen: Vec<Duration>,
    /// From an instance's advertisement to the end of the first lookup that listed it and had
    /// its node-info answer: when an ingress hands it to its routing core (its `discover`:
    /// the lookup read to its end, each new instance asked where its data plane is, at once).
    ready: Vec<Duration>,
    /// Instances seen whose node-info request never succeeded.
    never_ready: usize,
    /// Instances the observer never saw.
    unseen: usize,
    /// From an instance's withdrawal to the observer's last sight of it (zero if not seen
    /// after it).
    listed_after_stop: Vec<Duration>,
    /// Instances still listed when the observer stopped looking.
    still_listed: usize,
    /// How long each of the observer's lookups took, to the end of its stream (what an
    /// ingress waits for before it tells its routing core).
    lookups: Vec<Duration>,
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
         others look it up (cold: their first lookup; warm: again at once; each timed until \
         the provider is listed, and until the lookup's stream ends with its query). \
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
         p50 / p99 / max (ms) | warm lookup p50 / p99 / max (ms) | to the query's end, cold / \
         warm p50 / p99 (ms) | lookups failed | connections per node p50 / max | idle proxy: connections, RSS (MiB), CPU (% core) | node CPU, workers \
         (% core) | monitor: connections, RSS (MiB), CPU (% core) |"
    );
    outln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    // A row per size as soon as it is measured, so a run that fails at some size still
    // leaves the figures of the sizes before it, and the failure itself.
    let mut churns = Vec::new();
    if !args.nodes.contains(&args.churn_nodes) {
        eprintln!(
            "bench: no churn run: --churn-nodes {} is not one of --nodes",
            args.churn_nodes
        );
    }
    for &nodes in &args.nodes {
        let mut m = match measure(&args, nodes).await {
            Ok(measured) => measured,
            Err(error) => {
                outln!(out, "| {nodes} | failed: {error:#} |");
                outln!(out);
                return Err(error.context(format!("a network of {nodes} nodes")));
            }
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
            "| {} | {} | {:.1} | {:.0} | {} | {} | {} / {} | {} | {median} / {most} | {} | {:.3} | {}, {:.1}, {:.2} |",
            m.nodes,
            triple(&mut m.joins),
            m.all_joined.as_secs_f64(),
            m.formed.as_secs_f64(),
            triple(&mut m.lookups.cold),
            triple(&mut m.lookups.warm),
            pair(&mut m.lookups.cold_end),
            pair(&mut m.lookups.warm_end),
            m.lookups.failed,
            proxies.join("; "),
            m.worker_cpu_per_node * 100.0,
            m.monitor.0,
            m.monitor.1 as f64 / 1024.0,
            m.monitor.2 * 100.0,
        );
        if let Some(churn) = m.churn.take() {
            churns.push((m.nodes, churn));
        }
    }
    outln!(out);
    for (nodes, mut churn) in churns {
        outln!(
            out,
            "Churn in the network of {nodes} nodes: {} instances of one service advertised \
             evenly over {:.0} s (kept: first to last {:.1} s), each withdrawn (stopped) {:.0} s after it started, while an \
             observer node looks the service up every {:.1} s as an ingress does (its \
             `discover-interval`). Seen: from an instance's advertisement to its first listing; \
             ready: to the end of that lookup and of the node-info request the observer sends \
             each new instance at once, as an ingress does before it routes to it; listed after stop: from its withdrawal to its last listing (the records' lifetime \
             is {:.0} s).\n",
            args.churn_instances,
            args.churn_over.as_secs_f64(),
            churn.spread.as_secs_f64(),
            args.churn_life.as_secs_f64(),
            args.churn_poll.as_secs_f64(),
            Timing::default().provider_ttl.as_secs_f64(),
        );
        outln!(
            out,
            "| seen after p50 / p99 / max (ms) | ready after p50 / p99 / max (ms) | never seen | \
             listed after stop p50 / p99 / max (ms) | still listed at the end | observer's \
             lookups: count, to the end p50 / p99 / max (ms) |\n|---|---|---|---|---|---|\n\
             | {} | {} | {} | {} | {} | {}: {} |\n",
            triple(&mut churn.seen),
            ready_figures(&mut churn),
            churn.unseen,
            triple(&mut churn.listed_after_stop),
            churn.still_listed,
            churn.lookups.len(),
            triple(&mut churn.lookups),
        );
    }
    Ok(())
}

fn pair(samples: &mut [Duration]) -> String {
    format!(
        "{} / {}",
        ms(percentile(samples, 50.0)),
        ms(percentile(samples, 99.0))
    )
}

/// The churn run's ready column: the triple, and how many were never ready if any.
fn ready_figures(churn: &mut Churn) -> String {
    let triple = triple(&mut churn.ready);
    match churn.never_ready {
        0 => triple,
        never => format!("{triple}; {never} never"),
    }
}

fn triple(samples: &mut [Duration]) -> String {
    format!(
        "{} / {} / {}",
        ms(percentile(samples, 50.0)),
        ms(percentile(samples, 99.0)),
        ms(percentile(samples, 100.0))
    )
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
    let mut lookups = Lookups::default();
    let share = args.seekers.div_ceil(workers.len());
    for worker in &mut workers {
        let some = worker.lookups(provider, share).await?;
        lookups.cold.extend(some.cold);
        lookups.warm.extend(some.warm);
        lookups.cold_end.extend(some.cold_end);
        lookups.warm_end.extend(some.warm_end);
        lookups.failed += some.failed;
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
    let churn = if nodes == args.churn_nodes {
        Some(churn(args, &mut workers).await?)
    } else {
        None
    };
    for worker in workers {
        worker.quit().await;
    }
    Ok(Measured {
        nodes,
        joins,
        all_joined,
        formed: formed - started,
        lookups,
        node_connections,
        proxies: proxy_figures,
        worker_cpu_per_node: worker_cpu / nodes.max(1) as f64,
        monitor: monitor_figures,
        churn,
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

    /// Cold then warm lookups from `count` of its nodes.
    async fn lookups(&mut self, provider: PeerId, count: usize) -> anyhow::Result<Lookups> {
        let cold = self.ask(&format!("find {provider} {count}")).await?;
        let warm = self.ask(&format!("find {provider} {count}")).await?;
        let failed = |line: &str| line.split_whitespace().filter(|w| *w == "failed").count();
        let parse = |line: &str, n| {
            nth_durations(line, n).with_context(|| format!("lookup times: {line:?}"))
        };
        Ok(Lookups {
            cold: parse(&cold, 0)?,
            warm: parse(&warm, 0)?,
            cold_end: parse(&cold, 1)?,
            warm_end: parse(&warm, 1)?,
            failed: failed(&cold) + failed(&warm),
        })
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

    /// Its node `index` advertises the churn service: (its peer ID, when, Unix ms).
    async fn provide(&mut self, index: usize) -> anyhow::Result<(PeerId, u64)> {
        let line = self.ask(&format!("provide {index}")).await?;
        let parsed = line
            .split_once(' ')
            .and_then(|(peer, at)| Some((peer.parse().ok()?, at.parse().ok()?)));
        parsed.with_context(|| format!("PEER MS, not {line:?}"))
    }

    /// Its node `index` withdraws the churn service: when, Unix ms.
    async fn withdraw(&mut self, index: usize) -> anyhow::Result<u64> {
        let line = self.ask(&format!("withdraw {index}")).await?;
        line.parse().with_context(|| format!("MS, not {line:?}"))
    }

    /// How long each of its observer's lookups took, to the end of its stream.
    async fn watch_lookups(&mut self) -> anyhow::Result<Vec<Duration>> {
        let line = self.ask("lookups").await?;
        let took: Result<Vec<u64>, _> = line.split_whitespace().map(str::parse).collect();
        let took = took.with_context(|| format!("durations in ms, not {line:?}"))?;
        Ok(took.into_iter().map(Duration::from_millis).collect())
    }

    /// What its observer has seen of the churn service, per peer.
    async fn seen(&mut self) -> anyhow::Result<Vec<(PeerId, Sighting)>> {
        let line = self.ask("seen").await?;
        let parse = |word: &str| -> Option<(PeerId, Sighting)> {
            let mut parts = word.split(':');
            let peer = parts.next()?.parse().ok()?;
            let mut ms = || parts.next()?.parse().ok();
            let (first, last, ready) = (ms()?, ms()?, ms()?);
            let ready = (ready > 0).then_some(ready);
            Some((peer, Sighting { first, last, ready }))
        };
        let seen: Option<Vec<_>> = line.split_whitespace().map(parse).collect();
        seen.with_context(|| format!("PEER:FIRST:LAST:READY words, not {line:?}"))
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

/// Milliseconds separated by spaces (`failed` entries skipped); of `FIRST:END` pairs, the
/// first.
fn durations(line: &str) -> anyhow::Result<Vec<Duration>> {
    nth_durations(line, 0)
}

/// The `n`th of each word's `:`-separated milliseconds (`failed` entries skipped).
fn nth_durations(line: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    line.split_whitespace()
        .filter(|w| *w != "failed")
        .map(|w| {
            let ms = w.split(':').nth(n).context("too few values")?;
            Ok(Duration::from_secs_f64(ms.parse::<f64>()? / 1e3))
        })
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
/// `PEER:1` or `PEER:0`), `provide I` / `withdraw I` (node I advertises or withdraws the
/// churn service; prints its peer ID and the Unix ms, or the ms), `watch MS` (the last node
/// looks the churn service up every MS ms until `unwatch`), `seen` (what it listed:
/// `PEER:FIRST:LAST` in Unix ms), `connections` (each node's connection count), `quit`.
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
                serve_node_info(&node);
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
    let seen = Sightings::default();
    let mut watcher = None;
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
                        Some((first, end)) => format!(
                            "{:.1}:{:.1}",
                            first.as_secs_f64() * 1e3,
                            end.as_secs_f64() * 1e3
                        ),
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
            ["provide", index] => {
                let node = nodes.get(index.parse::<usize>()?).context("no such node")?;
                let at = unix_ms();
                node.advertise(CHURN_NAMESPACE).await;
                println!("{} {at}", node.peer_id());
            }
            ["withdraw", index] => {
                let node = nodes.get(index.parse::<usize>()?).context("no such node")?;
                let at = unix_ms();
                node.stop_advertising(CHURN_NAMESPACE).await;
                println!("{at}");
            }
            ["watch", poll_ms] => {
                let node = nodes.last().context("no nodes")?.clone();
                let poll = Duration::from_millis(poll_ms.parse()?);
                if let Some(old) = watcher.replace(tokio::spawn(watch(node, poll, seen.clone()))) {
                    old.abort();
                }
                println!("watching");
            }
            ["seen"] => {
                let seen = seen.providers.lock().unwrap_or_else(|p| p.into_inner());
                let words: Vec<String> = (seen.iter())
                    .map(|(peer, sight)| {
                        let ready = sight.ready.unwrap_or(0);
                        format!("{peer}:{}:{}:{ready}", sight.first, sight.last)
                    })
                    .collect();
                println!("{}", words.join(" "));
            }
            ["lookups"] => {
                let took = seen.lookups.lock().unwrap_or_else(|p| p.into_inner());
                let words: Vec<String> = took.iter().map(u64::to_string).collect();
                println!("{}", words.join(" "));
            }
            ["unwatch"] => {
                if let Some(watcher) = watcher.take() {
                    watcher.abort();
                }
                println!("stopped");
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

/// What the observer saw of one provider, in Unix ms.
#[derive(Clone, Copy)]
struct Sighting {
    /// Its first listing.
    first: u64,
    /// Its last listing.
    last: u64,
    /// When an ingress would have handed it to its routing core (see [`Churn::ready`]); None
    /// if its node-info request failed.
    ready: Option<u64>,
}

/// What the observer saw.
#[derive(Clone, Default)]
struct Sightings {
    /// Each provider it listed.
    providers: Arc<Mutex<HashMap<PeerId, Sighting>>>,
    /// How long each lookup took to the end of its stream, in ms.
    lookups: Arc<Mutex<Vec<u64>>>,
}

/// The churn run's observer: looks [`CHURN_NAMESPACE`] up every `poll` from `node`, as an
/// ingress discovers a service's instances, and notes when each provider is listed. Each one
/// listed is asked for its node info at once until it answers, as an ingress asks where a
/// new instance's data plane is, and is ready when both that answer and the lookup's end are
/// in.
async fn watch(node: Node, poll: Duration, seen: Sightings) {
    let mut every = tokio::time::interval(poll);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let begin = Instant::now();
        let mut found = node.find_providers(CHURN_NAMESPACE).await;
        let mut asking = futures::stream::FuturesUnordered::new();
        let (mut answered, mut took) = (Vec::new(), None);
        loop {
            tokio::select! {
                peer = found.next(), if took.is_none() => {
                    let Some(peer) = peer else {
                        took = Some(begin.elapsed().as_millis() as u64);
                        continue;
                    };
                    let now = unix_ms();
                    let mut providers = seen.providers.lock().unwrap_or_else(|p| p.into_inner());
                    let sight = providers.entry(peer).or_insert(Sighting {
                        first: now,
                        last: now,
                        ready: None,
                    });
                    sight.last = now;
                    // Asked until it answers once, as an ingress asks a new instance at each
                    // discovery until it does.
                    let ask = sight.ready.is_none();
                    drop(providers);
                    if ask {
                        let node = &node;
                        asking.push(async move {
                            (peer, node.request::<NodeInfoProtocol>(peer, &()).await.is_ok())
                        });
                    }
                }
                Some((peer, ok)) = asking.next() => if ok { answered.push(peer) },
                else => break,
            }
        }
        let now = unix_ms();
        let mut providers = seen.providers.lock().unwrap_or_else(|p| p.into_inner());
        for peer in answered {
            if let Some(sight) = providers.get_mut(&peer) {
                sight.ready.get_or_insert(now);
            }
        }
        drop(providers);
        seen.lookups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(took.unwrap_or_default());
    }
}

fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| d.as_millis() as u64)
}

/// Starts [`Args::churn_instances`] instances of one service over [`Args::churn_over`] and
/// stops each [`Args::churn_life`] after it started, spread over the workers' nodes, while
/// the first worker's last node watches; then waits until no stopped instance is listed any
/// more (at most the records' lifetime and 10 s).
async fn churn(args: &Args, workers: &mut [Worker]) -> anyhow::Result<Churn> {
    let count = args.churn_instances;
    let processes = workers.len();
    // Instance k is node 1 + k / P of worker k % P: never a worker's node 0 (the namespace's
    // provider) nor the first worker's last node (the observer).
    let slots: Vec<(usize, usize)> = (0..count)
        .map(|k| (k % processes, 1 + k / processes))
        .collect();
    for &(worker, index) in &slots {
        anyhow::ensure!(
            index + 1 < workers[worker].joins.len(),
            "{count} churn instances need more than {} nodes per worker",
            workers[worker].joins.len()
        );
    }
    let poll = args.churn_poll;
    workers[0]
        .ask(&format!("watch {}", poll.as_millis()))
        .await?;
    let step = args.churn_over / count.max(1) as u32;
    let mut events: Vec<(Duration, usize, bool)> = (0..count)
        .flat_map(|k| {
            let at = step * k as u32;
            [(at, k, true), (at + args.churn_life, k, false)]
        })
        .collect();
    events.sort_by_key(|&(at, _, _)| at);
    let mut started: Vec<Option<(PeerId, u64)>> = vec![None; count];
    let mut stopped: HashMap<PeerId, u64> = HashMap::new();
    let begin = tokio::time::Instant::now();
    for (at, k, start) in events {
        tokio::time::sleep_until(begin + at).await; // the schedule itself
        let (worker, index) = slots[k];
        if start {
            started[k] = Some(workers[worker].provide(index).await?);
        } else if let Some((peer, _)) = started[k] {
            stopped.insert(peer, workers[worker].withdraw(index).await?);
        }
    }
    let lingering = |seen: &[(PeerId, Sighting)], now: u64| {
        (seen.iter())
            .filter(|(peer, sight)| {
                stopped.get(peer).is_some_and(|stop| sight.last > *stop)
                    && now.saturating_sub(sight.last) < 3 * poll.as_millis() as u64
            })
            .count()
    };
    // The last instances stopped just now: none has been looked for since. Not before three
    // polls have passed since the last stop does "nothing lingers" mean anything.
    let earliest = Instant::now() + 3 * poll;
    let limit = Instant::now() + Timing::default().provider_ttl + Duration::from_secs(10);
    let (seen, still_listed) = loop {
        let seen = workers[0].seen().await?;
        let still = lingering(&seen, unix_ms());
        if (still == 0 && Instant::now() >= earliest) || Instant::now() > limit {
            break (seen, still);
        }
        tokio::time::sleep(poll).await; // polls a condition, with `limit` as its deadline
    };
    workers[0].ask("unwatch").await?;
    let lookups = workers[0].watch_lookups().await?;
    let sights: HashMap<PeerId, Sighting> = seen.into_iter().collect();
    let advertised: Vec<u64> = started.iter().flatten().map(|&(_, at)| at).collect();
    let first = advertised.iter().min().copied().unwrap_or(0);
    let last = advertised.iter().max().copied().unwrap_or(0);
    let mut churn = Churn {
        spread: Duration::from_millis(last - first),
        seen: Vec::new(),
        ready: Vec::new(),
        never_ready: 0,
        unseen: 0,
        listed_after_stop: Vec::new(),
        still_listed,
        lookups,
    };
    for (peer, advertised) in started.into_iter().flatten() {
        match sights.get(&peer) {
            Some(sight) => {
                let since = |at: u64| Duration::from_millis(at.saturating_sub(advertised));
                churn.seen.push(since(sight.first));
                match sight.ready {
                    Some(ready) => churn.ready.push(since(ready)),
                    None => churn.never_ready += 1,
                }
                let stop = stopped.get(&peer).copied().unwrap_or(u64::MAX);
                churn
                    .listed_after_stop
                    .push(Duration::from_millis(sight.last.saturating_sub(stop)));
            }
            None => churn.unseen += 1,
        }
    }
    Ok(churn)
}

/// Searches from `seeker` until `provider` is found; how long that took, None if not within
/// `limit`, and how long until that lookup's stream ended (its query's end, and its holders'
/// answers where it found 20 or more: what a caller that reads every provider waits for).
async fn find(seeker: &Node, provider: PeerId, limit: Duration) -> Option<(Duration, Duration)> {
    let begin = Instant::now();
    while begin.elapsed() < limit {
        let mut found = seeker.find_providers(NAMESPACE).await;
        while let Some(peer) = found.next().await {
            if peer == provider {
                let first = begin.elapsed();
                while found.next().await.is_some() {}
                return Some((first, begin.elapsed()));
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
