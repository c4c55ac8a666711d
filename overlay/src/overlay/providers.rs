//! Every provider of a namespace, not the 20 a Kademlia node answers with.
//!
//! A node answers a `GET_PROVIDERS` request with at most 20 of the provider records it holds of
//! the key (kad's replication factor; `provider_peers` in libp2p-kad 0.49), the oldest first,
//! and the holders near a key hold much the same records. So with more than 20 instances of a
//! service alive, a lookup missed the newest ones: in the 500-node churn run
//! (bench/RESULTS.md) a new instance was first listed 2.6 s after it started (p50), once
//! older ones had withdrawn and made room in the answers.
//!
//! A lookup that cannot have been cut short found fewer than 20 providers in all (an answer
//! holds at most what the whole lookup found). One that found 20 or more asks the closest
//! holders its query reached ([`HOLDERS_ASKED`] of them, closest first, at once) for every
//! provider they hold, over protocol `/mtc/providers/1`, and waits for their answers at most
//! [`ASK_TIMEOUT`], and at most [`STRAGGLERS`] after the first one that lists any (a holder in
//! a busy process held a lookup for the whole timeout, once a minute in the churn run): the
//! request is the namespace, the answer every unexpired provider record the holder stores of
//! it, with the addresses its provider announced (an ingress has no other way to reach a
//! sidecar that is a DHT client), at most [`MAX_PROVIDERS_PER_KEY`]. The driver dials every
//! provider they list at those addresses and records it with the query's finds
//! ([`super::found`] rule 1), less those that withdrew at this node lately
//! ([`super::tombstones`]: a holder may answer just before it is told); the lookup's stream
//! gives the ones it has not given yet, after what the query found. The providers a lookup gives are unchanged
//! otherwise: a holder that cannot be asked (gone, or an older version) costs nothing but
//! its share of the list.
//!
//! Threat model: as kad's own answer, a holder can list providers that are not; an ingress
//! probes every instance before routing to it. The request and answer are bounded
//! ([`ProvidersProtocol`]), and a node answers only from its own store.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use futures::{
    Stream, StreamExt,
    channel::mpsc::UnboundedReceiver,
    stream::{self, FuturesUnordered},
};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use super::{Node, behaviour::MAX_PROVIDERS_PER_KEY, driver::Command};
use crate::rpc::Protocol;

/// How many of the closest holders a lookup that may have been cut short asks.
pub const HOLDERS_ASKED: usize = 3;
/// How long a lookup waits for the holders' full lists: the holders answered the query a
/// moment before, so an answer takes a round trip.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a lookup waits for the other holders once one has answered: each holds much the
/// same records, and the next lookup asks again.
pub const STRAGGLERS: Duration = Duration::from_millis(50);
/// A lookup that found this many providers may not have found them all (kad's answer size).
pub const ANSWER_LIMIT: usize = libp2p::kad::K_VALUE.get();

/// "Every provider you hold of this namespace."
pub struct ProvidersProtocol;

/// One provider record, as a holder stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    /// The provider's peer ID (base58).
    pub peer: String,
    /// The addresses it announced with its record.
    pub addrs: Vec<String>,
}

impl Protocol for ProvidersProtocol {
    const ID: StreamProtocol = StreamProtocol::new("/mtc/providers/1");
    /// A namespace (a blob's is 76 bytes).
    const MAX_REQUEST_BYTES: u32 = 1024;
    /// Every record a holder keeps of a key, each with a few addresses.
    const MAX_RESPONSE_BYTES: u32 = MAX_PROVIDERS_PER_KEY as u32 * 512;
    type Request = String;
    type Response = Vec<Listed>;
}

/// What the driver sends a lookup.
pub(crate) enum Finding {
    /// A provider, each once.
    Provider(PeerId),
    /// The query ended having found [`ANSWER_LIMIT`] providers or more: these holders, closest
    /// first, may hold more. Sent last.
    MayHaveMore(Vec<PeerId>),
}

/// The providers of `namespace`, as the driver's `findings` give them and then as the holders
/// it names add to them.
pub(super) fn complete(
    node: Node,
    namespace: String,
    findings: UnboundedReceiver<Finding>,
) -> impl Stream<Item = PeerId> + Send + 'static {
    struct State {
        node: Node,
        namespace: String,
        findings: UnboundedReceiver<Finding>,
        given: HashSet<PeerId>,
        more: Vec<PeerId>,
    }
    let state = State {
        node,
        namespace,
        findings,
        given: HashSet::new(),
        more: Vec::new(),
    };
    stream::unfold(state, |mut state| async move {
        loop {
            if let Some(peer) = state.more.pop() {
                return Some((peer, state));
            }
            match state.findings.next().await? {
                Finding::Provider(peer) => {
                    state.given.insert(peer);
                    return Some((peer, state));
                }
                Finding::MayHaveMore(holders) => {
                    let local = state.node.peer_id();
                    let mut listed = ask(&state.node, &state.namespace, &holders).await;
                    listed.retain(|(peer, _)| *peer != local);
                    if listed.is_empty() {
                        continue;
                    }
                    // Every one listed goes to the driver, given already or not, to be dialled
                    // at the addresses the holders gave (perhaps the only ones there are) and
                    // recorded; it keeps those that have not withdrawn. The stream then gives
                    // the ones it has not given.
                    let namespace = state.namespace.clone();
                    let kept = (state.node)
                        .command(|kept| Command::FoundMore(namespace, listed, kept))
                        .await
                        .unwrap_or_default();
                    let new: Vec<PeerId> = (kept.into_iter())
                        .filter(|peer| state.given.insert(*peer))
                        .collect();
                    state.more = new.into_iter().rev().collect();
                }
            }
        }
    })
}

/// Every provider of `namespace` that `holders` list, each once with the addresses any of them
/// gave, in the order of the answers (within the deadlines of the module documentation).
async fn ask(node: &Node, namespace: &str, holders: &[PeerId]) -> Vec<(PeerId, Vec<Multiaddr>)> {
    let request = namespace.to_owned();
    let mut asks: FuturesUnordered<_> = (holders.iter())
        .map(|holder| async {
            let answer = node.request::<ProvidersProtocol>(*holder, &request).await;
            (*holder, answer)
        })
        .collect();
    let mut deadline = Box::pin(tokio::time::sleep(ASK_TIMEOUT));
    let (mut listed, mut answered) = (Vec::new(), false);
    while !asks.is_empty() {
        tokio::select! {
            Some((holder, answer)) = asks.next() => match answer {
                Ok(answer) => {
                    // The first list with anything in it starts the stragglers' time (a
                    // holder new near the key may hold nothing yet).
                    if !answered && !answer.is_empty() {
                        answered = true;
                        let stragglers = tokio::time::Instant::now() + STRAGGLERS;
                        let until = deadline.deadline().min(stragglers);
                        deadline.as_mut().reset(until);
                    }
                    listed.extend(answer);
                }
                Err(error) => {
                    tracing::debug!(%holder, %error, "could not ask a holder for every provider")
                }
            },
            () = &mut deadline => {
                tracing::debug!(unanswered = asks.len(), "holders' lists not all in within the deadline");
                break;
            }
        }
    }
    merge(listed)
}

/// The providers `listed`, each once with every address given for it; entries that do not
/// parse are skipped (a holder's fault, not the lookup's).
fn merge(listed: impl IntoIterator<Item = Listed>) -> Vec<(PeerId, Vec<Multiaddr>)> {
    let mut merged: Vec<(PeerId, Vec<Multiaddr>)> = Vec::new();
    let mut index: HashMap<PeerId, usize> = HashMap::new();
    for Listed { peer, addrs } in listed {
        let Ok(peer) = peer.parse::<PeerId>() else {
            tracing::debug!(%peer, "a holder listed a provider whose peer ID does not parse");
            continue;
        };
        let addrs = addrs
            .iter()
            .filter_map(|addr| addr.parse::<Multiaddr>().ok());
        let at = *index.entry(peer).or_insert_with(|| {
            merged.push((peer, Vec::new()));
            merged.len() - 1
        });
        for addr in addrs {
            if !merged[at].1.contains(&addr) {
                merged[at].1.push(addr);
            }
        }
    }
    merged
}

/// Serves [`ProvidersProtocol`] on `node` from its own store: every node does, from its start.
pub(super) fn serve(node: &Node) {
    // Weak: serving must not keep the node alive.
    let weak = node.downgrade();
    node.serve::<ProvidersProtocol, _, _>(move |_peer: PeerId, namespace: String| {
        let node = weak.upgrade();
        async move {
            let Some(node) = node else {
                return Vec::new();
            };
            let records = node.local_provider_records(&namespace).await;
            records
                .into_iter()
                .map(|record| Listed {
                    peer: record.provider.to_string(),
                    addrs: record.addresses.iter().map(ToString::to_string).collect(),
                })
                .collect()
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::encode_frame;

    #[test]
    fn merged_lists_hold_each_provider_once_with_every_address() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let listed = |peer: PeerId, addrs: &[&str]| Listed {
            peer: peer.to_string(),
            addrs: addrs.iter().map(|a| (*a).to_owned()).collect(),
        };
        let merged = merge([
            listed(a, &["/ip4/10.0.0.1/tcp/1"]),
            listed(b, &[]),
            Listed {
                peer: "not a peer".into(),
                addrs: vec![],
            },
            listed(
                a,
                &["/ip4/10.0.0.1/tcp/1", "/ip4/10.0.0.2/tcp/1", "garbage"],
            ),
        ]);
        let addr = |s: &str| s.parse::<Multiaddr>().unwrap();
        assert_eq!(
            merged,
            vec![
                (
                    a,
                    vec![addr("/ip4/10.0.0.1/tcp/1"), addr("/ip4/10.0.0.2/tcp/1")]
                ),
                (b, vec![]),
            ]
        );
    }

    #[test]
    fn a_full_store_fits_an_answer() {
        let full: Vec<Listed> = (0..MAX_PROVIDERS_PER_KEY)
            .map(|_| Listed {
                peer: PeerId::random().to_string(),
                addrs: vec![
                    "/ip4/255.255.255.255/tcp/65535".into(),
                    "/ip6/ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/tcp/65535".into(),
                    "/dns4/a-rather-long-host-name.example.com/tcp/65535".into(),
                ],
            })
            .collect();
        encode_frame(&full, ProvidersProtocol::MAX_RESPONSE_BYTES).unwrap();
    }
}
