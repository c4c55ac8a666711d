//! No single copy: every artifact a record names is kept on several lookup services.
//!
//! `hl-cli add` uploads the artifact to the `--copies` nearest lookup services (3 by default)
//! before it writes the record; afterwards every hl-service keeps the copies up, once per
//! `--replication-interval`, for each record in its store:
//!
//! - **Census.** Every lookup service found on the overlay is asked `Has` (the blob protocol's
//!   cheap question, see [`transfer`]); one that answers with the record's size holds a copy,
//!   one that answers otherwise lacks one, one that does not answer within [`ASK_TIMEOUT`] is
//!   gone (a killed one's provider record outlives it by up to the record lifetime; it is not counted).
//! - **Target.** `copies`, or every live lookup service if there are fewer.
//! - **Who acts.** One node per artifact, so that lookup services sharing an etcd cluster (all
//!   seeing the same records) do not all push at once: the holder ranked first by rendezvous
//!   hashing ([`rank`]: SHA-256 of the digest and the peer ID). It pushes its copy, verified
//!   as it is read, to the live non-holders in rank order until the target is met, passing
//!   over any that refuses (a full disk, say). Two nodes that see the network differently may
//!   both push: the second push is answered `AlreadyStored`, so it costs a question.
//! - **All copies lost.** If no live lookup service holds it, the live lookup service ranked
//!   first fetches it from whoever advertises it (allocators keep the artifacts they started,
//!   verified by digest), and pushes it on in the next round.
//!
//! [`plan`] is the pure rule: the census in, what this node does out. [`run`] does the I/O.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use libp2p::PeerId;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use sha2::{Digest as _, Sha256};
use tokio_util::compat::TokioAsyncReadCompatExt;

use super::{ServiceRecord, protocol::NAMESPACE, store::Store};
use crate::{
    blob::{BlobStore, Digest, transfer},
    overlay::Node,
};

/// Copies of an artifact kept by default: `hl-cli add --copies` and `hl-service --copies`.
pub const DEFAULT_COPIES: std::num::NonZeroUsize =
    std::num::NonZeroUsize::new(3).expect("3 is not zero");
/// How long a lookup service has to answer `Has` before it counts as gone.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// What one lookup service said about its copy of an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// It holds a copy of the record's size.
    Held,
    /// It answered, holding none (or one of another size).
    Lacking,
    /// It did not answer in time: not counted, not pushed to.
    Gone,
}

/// What this node does for one artifact, by [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Enough copies, or another node's turn.
    Nothing,
    /// Push this node's copy to these lookup services, in this order, until `needed` of them
    /// took it.
    Push {
        /// Candidates, best ranked first.
        to: Vec<PeerId>,
        /// Copies still missing.
        needed: usize,
    },
    /// No live lookup service holds it: fetch it from any holder on the overlay.
    Fetch,
}

/// The rendezvous rank of `peer` for `digest`: the first 8 bytes of SHA-256(digest ‖ peer ID).
/// Every node computes the same ranking, so they agree on who acts without talking.
pub fn rank(digest: &Digest, peer: &PeerId) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(digest.as_bytes());
    hasher.update(peer.to_bytes());
    let hash = hasher.finalize();
    u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// What node `me` does for artifact `digest`, given the `census` of lookup services (`me`
/// among them) and the number of `copies` wanted. The rules are in the module documentation.
pub fn plan(me: PeerId, digest: &Digest, census: &[(PeerId, Holding)], copies: usize) -> Action {
    let mut live: Vec<(u64, PeerId, Holding)> = census
        .iter()
        .filter(|(_, copy)| *copy != Holding::Gone)
        .map(|(peer, copy)| (rank(digest, peer), *peer, *copy))
        .collect();
    live.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let target = copies.min(live.len());
    let held = live
        .iter()
        .filter(|(_, _, copy)| *copy == Holding::Held)
        .count();
    if held >= target {
        return Action::Nothing;
    }
    if held == 0 {
        return match live.first() {
            Some((_, first, _)) if *first == me => Action::Fetch,
            _ => Action::Nothing,
        };
    }
    let actor = live
        .iter()
        .find(|(_, _, copy)| *copy == Holding::Held)
        .map(|(_, peer, _)| *peer);
    if actor != Some(me) {
        return Action::Nothing;
    }
    Action::Push {
        to: live
            .iter()
            .filter(|(_, _, copy)| *copy == Holding::Lacking)
            .map(|(_, peer, _)| *peer)
            .collect(),
        needed: target - held,
    }
}

/// Asks every one of `services` whether it holds artifact `digest` of `size` bytes, all at
/// once, each for at most [`ASK_TIMEOUT`]. This node, if among them, answers from `own`
/// without asking.
pub async fn census(
    node: &Node,
    own: Option<&BlobStore>,
    services: &[PeerId],
    digest: Digest,
    size: u64,
) -> Vec<(PeerId, Holding)> {
    let asks = services.iter().map(|&peer| async move {
        let held = if peer == node.peer_id()
            && let Some(own) = own
        {
            Ok(own.size_of(&digest))
        } else {
            match tokio::time::timeout(ASK_TIMEOUT, transfer::holds(node, peer, digest)).await {
                Ok(answer) => answer.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
            }
        };
        let copy = match held {
            Ok(Some(held)) if held == size => Holding::Held,
            Ok(_) => Holding::Lacking,
            Err(error) => {
                tracing::debug!(%peer, %digest, %error, "lookup service did not answer");
                Holding::Gone
            }
        };
        (peer, copy)
    });
    futures::future::join_all(asks).await
}

/// The lookup services advertising on the overlay (one search), with `me` among them.
pub async fn lookup_services(node: &Node) -> Vec<PeerId> {
    let mut found: Vec<PeerId> = node.find_providers(NAMESPACE).await.collect().await;
    if !found.contains(&node.peer_id()) {
        found.push(node.peer_id());
    }
    found
}

/// Counters of the replication rounds, exported by hl-service.
#[derive(Clone)]
pub struct ReplicationMetrics {
    copies: IntCounterVec,
    short: IntGauge,
}

impl ReplicationMetrics {
    /// Registers `blob_replications_total` (by `outcome`: `pushed`, `fetched`, `failed`) and
    /// `blob_artifacts_under_replicated` (artifacts short of their copies at the last round).
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let copies = IntCounterVec::new(
            Opts::new(
                "blob_replications_total",
                "Artifact copies made by this lookup service, by outcome.",
            ),
            &["outcome"],
        )?;
        let short = IntGauge::new(
            "blob_artifacts_under_replicated",
            "Artifacts held by fewer live lookup services than wanted, at the last round.",
        )?;
        registry.register(Box::new(copies.clone()))?;
        registry.register(Box::new(short.clone()))?;
        for outcome in ["pushed", "fetched", "failed"] {
            copies.with_label_values(&[outcome]);
        }
        Ok(Self { copies, short })
    }
}

/// The replication loop's settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Copies wanted of each artifact.
    pub copies: usize,
    /// Time between rounds.
    pub interval: Duration,
}

/// Runs a replication round every `settings.interval` until the node stops.
pub async fn run(
    node: Node,
    records: Store,
    blobs: Arc<BlobStore>,
    settings: Settings,
    metrics: ReplicationMetrics,
) {
    let stopped = node.stopped();
    let mut ticks = tokio::time::interval(settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stopped.cancelled() => return,
        }
        tokio::select! {
            () = round(&node, &records, &blobs, settings, &metrics) => {}
            () = stopped.cancelled() => return,
        }
    }
}

/// One round over every artifact the store's records name.
async fn round(
    node: &Node,
    records: &Store,
    blobs: &BlobStore,
    settings: Settings,
    metrics: &ReplicationMetrics,
) {
    let entries = match records.list().await {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(%error, "replication: cannot list the records");
            return;
        }
    };
    let mut artifacts: Vec<(Digest, u64)> = entries
        .iter()
        .filter_map(|(_, json)| ServiceRecord::from_json(json).ok())
        .map(|record| (record.digest, record.size))
        .collect();
    artifacts.sort();
    artifacts.dedup();
    if artifacts.is_empty() {
        return;
    }
    let services = lookup_services(node).await;
    let mut short = 0;
    for (digest, size) in artifacts {
        let census = census(node, Some(blobs), &services, digest, size).await;
        let action = plan(node.peer_id(), &digest, &census, settings.copies);
        let held = census.iter().filter(|(_, c)| *c == Holding::Held).count();
        let live = census.iter().filter(|(_, c)| *c != Holding::Gone).count();
        if held < settings.copies.min(live) {
            short += 1;
        }
        match action {
            Action::Nothing => {}
            Action::Fetch => match transfer::fetch(node, digest, blobs).await {
                Ok(from) => {
                    tracing::info!(%digest, %from, "replication: fetched an artifact no lookup service held");
                    metrics.copies.with_label_values(&["fetched"]).inc();
                }
                Err(error) => {
                    tracing::warn!(%digest, %error, "replication: no copy of an artifact could be fetched");
                    metrics.copies.with_label_values(&["failed"]).inc();
                }
            },
            Action::Push { to, needed } => {
                let made = push(node, blobs, digest, &to, needed).await;
                metrics
                    .copies
                    .with_label_values(&["pushed"])
                    .inc_by(made.pushed);
                metrics
                    .copies
                    .with_label_values(&["failed"])
                    .inc_by(made.failed);
            }
        }
    }
    metrics.short.set(short);
}

/// What a push made.
struct Pushed {
    pushed: u64,
    failed: u64,
}

/// Pushes this node's copy of `digest` to `to` in order until `needed` took it.
async fn push(
    node: &Node,
    blobs: &BlobStore,
    digest: Digest,
    to: &[PeerId],
    needed: usize,
) -> Pushed {
    let mut made = Pushed {
        pushed: 0,
        failed: 0,
    };
    for &peer in to {
        if made.pushed as usize >= needed {
            break;
        }
        let (file, size) = match blobs.open_verified(digest).await {
            Ok(opened) => opened,
            Err(error) => {
                // Damaged or gone here: the next round's census counts it so.
                tracing::warn!(%digest, %error, "replication: own copy unusable");
                made.failed += 1;
                return made;
            }
        };
        match transfer::upload(node, peer, digest, size, &mut file.compat(), |_| {}).await {
            Ok(()) => {
                tracing::info!(%digest, %peer, "replication: copy made");
                made.pushed += 1;
            }
            Err(error) => {
                tracing::warn!(%digest, %peer, %error, "replication: push refused, trying the next");
                made.failed += 1;
            }
        }
    }
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` fixed peer IDs (from fixed keys), so every run ranks them alike.
    fn peers(n: usize) -> Vec<PeerId> {
        (0..n as u8)
            .map(|i| {
                libp2p::identity::Keypair::ed25519_from_bytes([i + 1; 32])
                    .expect("a valid key")
                    .public()
                    .to_peer_id()
            })
            .collect()
    }

    /// `peers` in rendezvous order for `digest`, best first.
    fn ranked(digest: &Digest, mut peers: Vec<PeerId>) -> Vec<PeerId> {
        peers.sort_by_key(|p| std::cmp::Reverse(rank(digest, p)));
        peers
    }

    #[test]
    fn enough_copies_means_nothing_to_do_for_anyone() {
        let digest = Digest::of(b"a");
        let all = peers(4);
        let census: Vec<_> = all
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    *p,
                    if i < 3 {
                        Holding::Held
                    } else {
                        Holding::Lacking
                    },
                )
            })
            .collect();
        for me in &all {
            assert_eq!(plan(*me, &digest, &census, 3), Action::Nothing);
        }
    }

    #[test]
    fn only_the_first_ranked_holder_pushes_and_to_the_best_ranked_non_holders() {
        let digest = Digest::of(b"b");
        let order = ranked(&digest, peers(5));
        // The two best ranked lack it; the third and fifth hold it.
        let census: Vec<_> = order
            .iter()
            .enumerate()
            .map(|(i, p)| {
                (
                    *p,
                    if i == 2 || i == 4 {
                        Holding::Held
                    } else {
                        Holding::Lacking
                    },
                )
            })
            .collect();
        let actions: Vec<_> = order
            .iter()
            .map(|me| plan(*me, &digest, &census, 3))
            .collect();
        assert_eq!(
            actions[2],
            Action::Push {
                to: vec![order[0], order[1], order[3]],
                needed: 1
            }
        );
        for (i, action) in actions.iter().enumerate() {
            if i != 2 {
                assert_eq!(*action, Action::Nothing, "node {i}");
            }
        }
    }

    #[test]
    fn gone_services_are_neither_counted_nor_pushed_to() {
        let digest = Digest::of(b"c");
        let order = ranked(&digest, peers(4));
        let census = vec![
            (order[0], Holding::Gone),
            (order[1], Holding::Held),
            (order[2], Holding::Gone),
            (order[3], Holding::Lacking),
        ];
        // Two live: the target is two copies, one is missing; order[1] pushes to order[3].
        assert_eq!(
            plan(order[1], &digest, &census, 3),
            Action::Push {
                to: vec![order[3]],
                needed: 1
            }
        );
        assert_eq!(plan(order[3], &digest, &census, 3), Action::Nothing);
    }

    #[test]
    fn with_every_copy_lost_the_first_ranked_live_service_fetches() {
        let digest = Digest::of(b"d");
        let order = ranked(&digest, peers(3));
        let census = vec![
            (order[0], Holding::Gone),
            (order[1], Holding::Lacking),
            (order[2], Holding::Lacking),
        ];
        assert_eq!(plan(order[1], &digest, &census, 3), Action::Fetch);
        assert_eq!(plan(order[2], &digest, &census, 3), Action::Nothing);
    }

    #[test]
    fn one_copy_wanted_and_held_is_enough() {
        let digest = Digest::of(b"e");
        let all = peers(3);
        let census = vec![
            (all[0], Holding::Lacking),
            (all[1], Holding::Held),
            (all[2], Holding::Lacking),
        ];
        for me in &all {
            assert_eq!(plan(*me, &digest, &census, 1), Action::Nothing);
        }
    }

    #[test]
    fn the_ranking_is_the_same_everywhere_and_differs_by_artifact() {
        let all = peers(8);
        let (a, b) = (Digest::of(b"x"), Digest::of(b"y"));
        assert_eq!(
            ranked(&a, all.clone()),
            ranked(&a, all.iter().rev().copied().collect())
        );
        assert_ne!(ranked(&a, all.clone()), ranked(&b, all));
    }
}
