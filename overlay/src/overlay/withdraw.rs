//! Withdrawing provider records. Kademlia has no message that removes a provider record: a
//! node that stops advertising a namespace, or stops altogether, would still be found by
//! others until its records expire ([`Timing::provider_ttl`](super::Timing::provider_ttl), two
//! minutes by default), and every ingress would keep asking a stopped allocator or routing to
//! a drained instance that long. So a node that stops advertising says so.
//!
//! Protocol `/mtc/withdraw/1`, one [`rpc`](crate::rpc) request per peer: the namespaces the
//! sender no longer provides; the answer is empty, sent once the peer's store no longer holds
//! them. The peers asked are those that may hold the sender's records: every connected peer
//! and, for each namespace, the closest peers to its key in the sender's routing table (where
//! its announcements went). It is best effort within [`WITHDRAW_DEADLINE`]: a peer not reached
//! forgets the record when it expires, as after a crash.
//!
//! Threat model: a peer can withdraw only its own records. The provider removed is the peer
//! the authenticated connection comes from (noise proves its peer ID), never a peer the
//! message names; a request is at most [`WithdrawProtocol::MAX_REQUEST_BYTES`], so serving one
//! costs a bounded amount of work.

use std::time::Duration;

use libp2p::{PeerId, StreamProtocol};

use super::{Node, driver::Command};
use crate::rpc::Protocol;

/// How long a node spends telling others that it withdrew, in all.
pub const WITHDRAW_DEADLINE: Duration = Duration::from_secs(2);

/// "I no longer provide these namespaces."
pub struct WithdrawProtocol;

impl Protocol for WithdrawProtocol {
    const ID: StreamProtocol = StreamProtocol::new("/mtc/withdraw/1");
    /// A few dozen namespaces (a service digest is 71 bytes).
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
    let Some(holders) = node
        .command(|reply| Command::StopAdvertising(namespaces.clone(), reply))
        .await
    else {
        return; // the node has stopped: nothing left to tell anyone
    };
    let asks = holders.into_iter().map(|peer| {
        let namespaces = &namespaces;
        async move {
            if let Err(error) = node.request::<WithdrawProtocol>(peer, namespaces).await {
                tracing::debug!(%peer, %error, "could not withdraw provider records");
            }
        }
    });
    if tokio::time::timeout(WITHDRAW_DEADLINE, futures::future::join_all(asks))
        .await
        .is_err()
    {
        tracing::debug!("some peers were not told of withdrawn records within the deadline");
    }
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
