//! N overlay nodes in one process join one bootstrap at once; one advertises a namespace and
//! every other looks it up. Real TCP sockets on loopback.

use std::time::{Duration, Instant};

use control::overlay::{BootstrapAddr, Node, NodeConfig, Timing};
use futures::{StreamExt, future::join_all};
use libp2p::identity::Keypair;

use crate::{
    report::{Report, outln},
    stats::print_percentiles,
};

#[derive(clap::Args)]
pub struct Args {
    /// Nodes joining the bootstrap.
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Repetitions with a fresh network each.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

impl Default for Args {
    fn default() -> Self {
        Self { nodes: 50, runs: 3 }
    }
}

impl Args {
    pub fn quick() -> Self {
        Self { nodes: 10, runs: 1 }
    }
}

fn config(bootstraps: Vec<BootstrapAddr>) -> NodeConfig {
    let mut config = NodeConfig::new("bench", Keypair::generate_ed25519());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")];
    config.bootstraps = bootstraps;
    config.timing = Timing::default();
    config
}

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("overlay");
    let mut joins = Vec::new();
    let mut all_joined = Vec::new();
    let mut lookups = Vec::new();
    let mut warm_lookups = Vec::new();
    for _ in 0..args.runs {
        let bootstrap = Node::start(config(vec![])).await?;
        let addr: BootstrapAddr = bootstrap.listen_addrs().await[0]
            .to_string()
            .parse()
            .map_err(anyhow::Error::msg)?;

        let started = Instant::now();
        let nodes = join_all((0..args.nodes).map(|_| {
            let addr = addr.clone();
            async move {
                let begin = Instant::now();
                let node = Node::start(config(vec![addr])).await;
                (node, begin.elapsed())
            }
        }))
        .await;
        all_joined.push(started.elapsed());
        let mut members = Vec::new();
        for (node, took) in nodes {
            members.push(node?);
            joins.push(took);
        }

        let provider = &members[0];
        provider.advertise("bench-namespace").await;
        // Untimed: let the announcement reach the DHT before lookups are measured.
        find(&bootstrap, provider.peer_id(), Duration::from_secs(30)).await?;
        for seeker in &members[1..] {
            lookups.push(find(seeker, provider.peer_id(), Duration::from_secs(30)).await?);
        }
        // Again, now that each seeker holds connections to the peers its lookup visited.
        for seeker in &members[1..] {
            warm_lookups.push(find(seeker, provider.peer_id(), Duration::from_secs(30)).await?);
        }
        for node in members.iter().chain(std::iter::once(&bootstrap)) {
            node.shutdown().await;
        }
    }

    outln!(
        out,
        "## Overlay: {} nodes join one bootstrap at once ({} runs)\n\n`{command}`\n\n\
         The nodes start together in this process and join a bootstrap node (TCP + noise + \
         yamux on loopback); then one advertises a namespace and each of the others looks it \
         up, twice. A cold lookup dials most of the peers its Kademlia query visits; the \
         proxy keeps lookups off the request path (cached, refreshed in the background).\n",
        args.nodes,
        args.runs
    );
    print_percentiles(
        out,
        "measure",
        &[50.0, 90.0, 99.0, 100.0],
        &mut [
            (
                "one node's join (start to first bootstrap connection)",
                &mut joins,
            ),
            ("all nodes joined", &mut all_joined),
            ("provider lookup, first answer", &mut lookups),
            ("same lookup again, connections warm", &mut warm_lookups),
        ],
    );
    Ok(())
}

/// Searches from `seeker` until `provider` is found; returns how long that took.
async fn find(
    seeker: &Node,
    provider: libp2p::PeerId,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let begin = Instant::now();
    while begin.elapsed() < limit {
        let mut found = seeker.find_providers("bench-namespace").await;
        while let Some(peer) = found.next().await {
            if peer == provider {
                return Ok(begin.elapsed());
            }
        }
    }
    anyhow::bail!("provider not found within {limit:?}")
}
