//! The `check` program: is the overlay reachable, what does it hold (peers, lookup services,
//! allocators, with their RTT), does a service resolve and how many instances has it. Each
//! failure says what to do; the exit code is non-zero if any check failed.

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::PeerId;
use serde::Serialize;

use crate::{
    allocator::protocol::NAMESPACE as ALLOCATORS,
    common::program::{CommonArgs, Program},
    lookup::{client, protocol::NAMESPACE as LOOKUPS},
    overlay::{BootstrapPolicy, Node, Timing},
    rpc::NodeInfoProtocol,
};

/// Checks a multi-tier-cloud network from this machine: overlay, lookup services, allocators
/// and, with --service, one service and its instances.
#[derive(clap::Parser, Debug)]
#[command(name = "check", version)]
pub struct Cli {
    /// A service to resolve and count the instances of.
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,

    /// Print JSON instead of text, for scripts.
    #[arg(long)]
    pub json: bool,

    /// How long joining the overlay may take.
    #[arg(long, default_value = "5s", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// The flags every program takes: overlay (bootstraps, network key), logs, config file.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Program for Cli {
    const NAME: &'static str = "check";
    const CONFIG_ENV: &'static str = "CHECK_CONFIG";

    fn common(&self) -> &CommonArgs {
        &self.common
    }
}

/// The outcome of one check.
#[derive(Debug, Serialize)]
pub struct Verdict {
    /// Which check: `overlay`, `lookup`, `allocators` or `service`.
    pub check: &'static str,
    /// Whether the check passed.
    pub ok: bool,
    /// What was found (peers and their RTT, instance counts), or what went wrong.
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Verdict {
    fn ok(check: &'static str, detail: String) -> Self {
        Self {
            check,
            ok: true,
            detail,
            fix: None,
        }
    }

    fn failed(check: &'static str, detail: String, fix: &str) -> Self {
        Self {
            check,
            ok: false,
            detail,
            fix: Some(fix.to_owned()),
        }
    }
}

/// A peer and the time a node-info round trip to it took.
struct Found {
    peer: PeerId,
    rtt: Option<Duration>,
}

fn describe(found: &[Found]) -> String {
    found
        .iter()
        .map(|f| match f.rtt {
            Some(rtt) => format!("{} ({:.1} ms)", f.peer, rtt.as_secs_f64() * 1e3),
            None => format!("{} (no answer)", f.peer),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

async fn providers(node: &Node, namespace: &str) -> Vec<Found> {
    let peers: Vec<PeerId> = node.find_providers(namespace).await.collect().await;
    let mut found = Vec::with_capacity(peers.len());
    for peer in peers {
        let begin = Instant::now();
        let answered = node.request::<NodeInfoProtocol>(peer, &()).await.is_ok();
        found.push(Found {
            peer,
            rtt: answered.then(|| begin.elapsed()),
        });
    }
    found
}

/// Runs every check; the verdicts in order.
pub async fn verdicts(cli: &Cli) -> Vec<Verdict> {
    let mut verdicts = Vec::new();
    let bootstraps = match cli.common.overlay.bootstrap_addrs() {
        Ok(list) if !list.is_empty() => list,
        Ok(_) => {
            verdicts.push(Verdict::failed(
                "overlay",
                "no bootstrap given".into(),
                "pass --bootstrap <multiaddr ending in /p2p/<peer id>> (what ping-monitor \
                 prints) or set P2P_BOOTSTRAPS",
            ));
            return verdicts;
        }
        Err(error) => {
            verdicts.push(Verdict::failed(
                "overlay",
                error,
                "a bootstrap is a multiaddr ending in /p2p/<peer id>",
            ));
            return verdicts;
        }
    };
    let mut config =
        crate::overlay::NodeConfig::new("check", libp2p::identity::Keypair::generate_ed25519());
    config.bootstraps = bootstraps.clone();
    config.network_key = match cli.common.overlay.network_key() {
        Ok(key) => key,
        Err(error) => {
            verdicts.push(Verdict::failed(
                "overlay",
                error.to_string(),
                "check /dev/urandom, or pass a --psk passphrase",
            ));
            return verdicts;
        }
    };
    config.dht_server = false;
    config.timing = Timing {
        handshake_timeout: cli.timeout,
        bootstrap: BootstrapPolicy {
            join_attempts: 2,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(1),
        },
        ..Timing::default()
    };
    let node = match Node::start(config).await {
        Ok(node) => node,
        Err(error) => {
            verdicts.push(Verdict::failed(
                "overlay",
                format!("cannot join: {error}"),
                "check that the bootstrap (ping-monitor) runs and its address is right; a \
                 bootstrap that does not answer the handshake usually means another --psk \
                 (or P2P_PSK) than the network's",
            ));
            return verdicts;
        }
    };
    let peers = node.connected_peers().await.len();
    verdicts.push(Verdict::ok(
        "overlay",
        format!(
            "joined through {} bootstrap(s); {peers} peer(s) connected",
            bootstraps.len()
        ),
    ));

    let lookups = providers(&node, LOOKUPS).await;
    verdicts.push(if lookups.is_empty() {
        Verdict::failed(
            "lookup",
            "no lookup service found".into(),
            "start hl-service on some machine of the network (with the same --psk)",
        )
    } else {
        Verdict::ok(
            "lookup",
            format!("{}: {}", lookups.len(), describe(&lookups)),
        )
    });
    let allocators = providers(&node, ALLOCATORS).await;
    let have_allocators = !allocators.is_empty();
    verdicts.push(if have_allocators {
        Verdict::ok(
            "allocators",
            format!("{}: {}", allocators.len(), describe(&allocators)),
        )
    } else {
        Verdict::failed(
            "allocators",
            "no allocator found: a service with no instance cannot be started".into(),
            "start an allocator on the machines that should run instances",
        )
    });

    if let Some(service) = &cli.service {
        verdicts.push(match client::get(&node, service).await {
            Ok(Some(record)) => {
                let digest = record.digest.to_string();
                let instances = node
                    .find_providers(&record.instance_key())
                    .await
                    .count()
                    .await;
                if instances > 0 || have_allocators {
                    Verdict::ok(
                        "service",
                        format!(
                            "'{service}' is {digest}; {instances} instance(s) running{}",
                            if instances == 0 {
                                " (an allocator starts one on the first request)"
                            } else {
                                ""
                            }
                        ),
                    )
                } else {
                    Verdict::failed(
                        "service",
                        format!("'{service}' is {digest}, with no instance and no allocator"),
                        "start an allocator, or an instance with its proxy in service mode",
                    )
                }
            }
            Ok(None) => Verdict::failed(
                "service",
                format!("no service named '{service}'"),
                "register it: hl-cli add --file IMAGE.tar NAME (or --exec FILE NAME)",
            ),
            Err(error) => Verdict::failed(
                "service",
                format!("cannot resolve '{service}': {error}"),
                "a lookup service must answer: see the lookup check",
            ),
        });
    }
    node.shutdown().await;
    verdicts
}

/// The `check` program: runs every check and prints the verdicts, as text or (with --json)
/// one JSON object. Fails, naming the failed checks, if any check failed.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let verdicts = verdicts(&cli).await;
    let ok = verdicts.iter().all(|v| v.ok);
    if cli.json {
        println!("{}", serde_json::json!({ "ok": ok, "checks": verdicts }));
    } else {
        for verdict in &verdicts {
            let mark = if verdict.ok { "ok  " } else { "FAIL" };
            println!("{mark} {:<11} {}", verdict.check, verdict.detail);
            if let Some(fix) = &verdict.fix {
                println!("     {:<11} -> {fix}", "");
            }
        }
    }
    if ok {
        Ok(())
    } else {
        let failed: Vec<_> = verdicts.iter().filter(|v| !v.ok).map(|v| v.check).collect();
        anyhow::bail!("failed: {}", failed.join(", "))
    }
}
