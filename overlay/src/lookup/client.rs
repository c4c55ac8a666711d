//! Talking to lookup services: find them on the overlay (nearest first) and send requests,
//! falling back to the next one if one fails.

use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;

use super::protocol::{LookupProtocol, LookupRequest, LookupResponse, NAMESPACE};
use crate::{
    blob::transfer::nearest_first,
    overlay::{Backoff, Node},
};

/// Why no lookup service gave an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No node advertised the lookup namespace in any of the DHT searches.
    #[error("no lookup service (hl-service) answered on the overlay after {attempts} searches")]
    NoLookupService {
        /// How many searches were made ([`SEARCH_ATTEMPTS`]).
        attempts: u32,
    },
    /// Lookup services were found, but the request to each one failed (unreachable, timed
    /// out, malformed answer); one message per service, nearest first.
    #[error("every lookup service failed: {}", .0.join("; "))]
    AllFailed(Vec<String>),
}

/// How many times to search the DHT for lookup services before giving up.
pub const SEARCH_ATTEMPTS: u32 = 5;

/// Lookup services on the overlay, nearest first; searches again with backoff while none is
/// found, [`SEARCH_ATTEMPTS`] times in all.
pub async fn lookup_services(node: &Node) -> Result<Vec<PeerId>, ClientError> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(4));
    for attempt in 1..=SEARCH_ATTEMPTS {
        let found: Vec<PeerId> = node.find_providers(NAMESPACE).await.collect().await;
        if !found.is_empty() {
            return Ok(nearest_first(node, found));
        }
        if attempt < SEARCH_ATTEMPTS {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
    Err(ClientError::NoLookupService {
        attempts: SEARCH_ATTEMPTS,
    })
}

/// Sends `request` to the nearest lookup service that answers, passing over any whose record
/// store failed ([`LookupResponse::Unavailable`]). Returns the answer and who gave it.
pub async fn call(
    node: &Node,
    request: &LookupRequest,
) -> Result<(PeerId, LookupResponse), ClientError> {
    let mut failures = Vec::new();
    for peer in lookup_services(node).await? {
        match node.request::<LookupProtocol>(peer, request).await {
            Ok(LookupResponse::Unavailable(reason)) => failures.push(format!("{peer}: {reason}")),
            Ok(response) => return Ok((peer, response)),
            Err(error) => failures.push(format!("{peer}: {error}")),
        }
    }
    Err(ClientError::AllFailed(failures))
}

/// The record of `service`: `Some(record)`, `None` if the lookup has no such service, an error
/// saying why if no lookup service could answer.
pub async fn get(node: &Node, service: &str) -> Result<Option<super::ServiceRecord>, String> {
    match call(node, &LookupRequest::Get(service.to_owned())).await {
        Ok((_, LookupResponse::Found(record))) => Ok(Some(record)),
        Ok((_, LookupResponse::NotFound)) => Ok(None),
        Ok((_, LookupResponse::Failed(reason))) => Err(reason),
        Ok((peer, other)) => Err(format!("unexpected answer from {peer}: {other:?}")),
        Err(error) => Err(error.to_string()),
    }
}
