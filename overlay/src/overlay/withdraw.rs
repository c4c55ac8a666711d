//! Withdrawing provider records. Kademlia has no message that removes a provider record: a
//! node that stops advertising a namespace, or stops altogether, would still be found by
//! others until its records expire ([`Timing::provider_ttl`](super::Timing::provider_ttl), two
//! minutes by default), and every ingress would keep asking a stopped allocator or routing to
//! a drained instance that long. So a node that stops advertising says so.
//!
//! Protocol `/mtc/withdraw/1`, one [`rpc`](crate::rpc) request per peer: the namespaces the
//! sender no longer provides; the answer is empty, sent once the peer's store no longer holds
//! them. The peers asked are those that may hold the sender's records, each as soon as it is
//! known: every peer connected or being dialled (kad sends an announcement to a peer it is not
//! connected to once the dial succeeds), the closest peers to each key in the sender's routing
//! table, and the closest peers to each key the network knows, found by a query as kad's
//! announcement found them (where they went; also where lookups look). The caller waits at
//! most [`WITHDRAW_DEADLINE`]; the peers not told by then are told in the background while
//! the node runs (the query can take longer: 4 withdrawals in 100 of the 200-node churn run,
//! whose records stayed listed until they expired). A peer never reached (the node stopped
//! first) forgets the record when it expires, as after a crash.
//!
//! Only namespaces the node advertises are withdrawn (asking to stop one it does not provide
//! sends nothing), in as many requests as fit them ([`batches`]). An announcement still under
//! way (kad's own query: find the closest peers, then send them `ADD_PROVIDER`, started by an
//! advertisement or a republication just before) would put the record back at a peer after
//! the withdrawal, until it expires. The withdrawal waits until kad counts those as sent (at
//! most [`WITHDRAW_DEADLINE`]); kad counts a message sent once it is queued, and may send it
//! on another connection than ours, so it can still arrive after the withdrawal: the peers
//! told drop such announcements for a while ([`super::tombstones`]).
//!
//! Threat model: a peer can withdraw only its own records. The provider removed is the peer
//! the authenticated connection comes from (noise proves its peer ID), never a peer the
//! message names; a request is at most [`WithdrawProtocol::MAX_REQUEST_BYTES`], so serving one
//! costs a bounded amount of work.

use std::{collections::HashSet, time::Duration};

use futures::{StreamExt, channel::mpsc::UnboundedReceiver, stream::FuturesUnordered};
use libp2p::{PeerId, StreamProtocol};

use super::{Node, driver::Command};
use crate::rpc::Protocol;

/// How long a node waits for its announcements under way to go out, and then how long it
/// spends telling others that it withdrew: a round trip to a peer takes milliseconds, and a
/// stopping sidecar has a few seconds before it is killed.
pub const WITHDRAW_DEADLINE: Duration = Duration::from_secs(1);

/// "I no longer provide these namespaces."
pub struct WithdrawProtocol;

impl Protocol for WithdrawProtocol {
    const ID: StreamProtocol = StreamProtocol::new("/mtc/withdraw/1");
    /// About a hundred namespaces (a blob's is 76 bytes); more go in several requests.
    const MAX_REQUEST_BYTES: u32 = 8 * 1024;
    const MAX_RESPONSE_BYTES: u32 = 16;
    type Request = Vec<String>;
    type Response = ();
}

/// Stops advertising `namespaces` here and tells the peers that may hold their records.
pub(super) async fn withdraw(node: &Node, namespaces: Vec<String>) {
    if namespaces.is_empty() {
        return;
    }
    let Some(withdrawal) = node
        .command(|reply| Command::StopAdvertising(namespaces, reply))
        .await
    else {
        return; // the node has stopped: nothing left to tell anyone
    };
    // Announcements already under way go first (the peers drop any that arrive after all).
    if let Some(announced) = withdrawal.under_way
        && tokio::time::timeout(WITHDRAW_DEADLINE, announced)
            .await
            .is_err()
    {
        tracing::debug!("withdrawing before earlier announcements went out");
    }
    let requests: Vec<Vec<String>> = (batches(&withdrawal.namespaces).into_iter())
        .map(<[_]>::to_vec)
        .collect();
    let holders = node
        .command_stream(|found| Command::FindHolders(withdrawal.namespaces, found))
        .await;
    let mut telling = tokio::spawn(tell(node.clone(), holders, requests));
    if tokio::time::timeout(WITHDRAW_DEADLINE, &mut telling)
        .await
        .is_err()
    {
        tracing::debug!("some peers are told of withdrawn records after the deadline");
    }
}

/// Sends every request to each holder as it is found, once, and waits for their answers (each
/// within the node's request timeout; the holders' query ends within kad's).
async fn tell(node: Node, mut holders: UnboundedReceiver<PeerId>, requests: Vec<Vec<String>>) {
    let (node, requests) = (&node, &requests);
    let mut told = HashSet::new();
    let mut asks = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(peer) = holders.next() => {
                if told.insert(peer) {
                    asks.extend(requests.iter().map(|request| async move {
                        if let Err(error) = node.request::<WithdrawProtocol>(peer, request).await {
                            tracing::debug!(%peer, %error, "could not withdraw provider records");
                        }
                    }));
                }
            }
            Some(()) = asks.next() => {}
            else => break,
        }
    }
}

/// Splits `namespaces` into runs whose requests each fit [`WithdrawProtocol::MAX_REQUEST_BYTES`]
/// (an hl-service withdraws a namespace per blob it holds). A namespace too long to fit at all
/// is a run of its own, and its request is refused as too large.
fn batches(namespaces: &[String]) -> Vec<&[String]> {
    // CBOR: an array header and, per string, a header of at most 9 bytes and its bytes.
    let budget = WithdrawProtocol::MAX_REQUEST_BYTES as usize - 9;
    let mut runs = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, namespace) in namespaces.iter().enumerate() {
        let cost = namespace.len() + 9;
        if i > start && size + cost > budget {
            runs.push(&namespaces[start..i]);
            (start, size) = (i, 0);
        }
        size += cost;
    }
    if start < namespaces.len() {
        runs.push(&namespaces[start..]);
    }
    runs
}

/// Serves [`WithdrawProtocol`] on `node`: every node does, from its start.
pub(super) fn serve(node: &Node) {
    // Weak: serving must not keep the node alive.
    let weak = node.downgrade();
    node.serve::<WithdrawProtocol, _, _>(move |peer: PeerId, namespaces: Vec<String>| {
        let node = weak.upgrade();
        async move {
            if let Some(node) = node {
                node.command(|done| Command::Withdrawn(peer, namespaces, done))
                    .await;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::encode_frame;

    #[test]
    fn every_batch_fits_a_request_and_together_they_hold_every_namespace() {
        let names: Vec<String> = (0..300)
            .map(|i| format!("{i:03}{}", "x".repeat(i % 200)))
            .collect();
        let runs = batches(&names);
        assert!(runs.len() > 1);
        for run in &runs {
            encode_frame(&run.to_vec(), WithdrawProtocol::MAX_REQUEST_BYTES).unwrap();
        }
        assert_eq!(runs.concat(), names);
        assert!(batches(&[]).is_empty());
        // One too long to fit is alone (its request is refused; the others still go).
        let long = vec!["a".into(), "x".repeat(9000), "b".into()];
        assert_eq!(batches(&long).len(), 3);
    }
}
