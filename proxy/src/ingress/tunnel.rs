//! Opening a layer-4 tunnel to an instance of a service ([`crate::l4`]): the instance chosen
//! as for a request, the chain sent in a `CHAIN` frame, and the stream returned once the
//! instance's sidecar answered `READY` (after its own set-up of the rest of the chain).

use std::{pin::pin, sync::Arc, time::Duration};

use bytes::Bytes;
use libp2p::PeerId;
use quinn::{Connection, RecvStream, SendStream};

use super::{Attempt, Ingress, RequestError, routing::Outcome, watched};
use crate::{
    forward::{AttemptError, open_stream},
    framing::{Decoder, Kind, frame_header},
    l4::carry::RESET_TUNNEL,
    stream::{Opening, StreamError, read_opening},
};

/// An open tunnel to an instance: the stream, and what its sidecar answered.
pub struct Tunnel {
    /// The sending half of the tunnel's QUIC stream, toward the instance.
    pub send: SendStream,
    /// The receiving half of the tunnel's QUIC stream, from the instance.
    pub recv: RecvStream,
    /// Holds whatever arrived after `READY`.
    pub rest: Decoder,
    /// The reverse chain, as the hop answered it.
    pub ready: String,
    /// The instance's proxy at the other end, by overlay peer id.
    pub peer: PeerId,
    /// The connection the stream is on (its QUIC datagrams carry the tunnel's too).
    pub connection: Connection,
}

impl Ingress {
    /// Whether the lookup knows `name` (a layer-4 chain is checked before it listens).
    pub async fn resolve(&self, name: &str) -> Result<(), RequestError> {
        self.resolved(name).await.map(drop)
    }

    /// Opens a tunnel to an instance of `service` for the encoded `chain`: chosen, waited
    /// for or allocated as a request's instance is, and tried again on another instance
    /// whatever went wrong with it (within the retry budget), since nothing of the client's
    /// crossed; not when it answered that the rest of the chain failed. A hop's answer may
    /// take a while: it sets up the rest of the chain first.
    pub async fn open_tunnel(
        self: &Arc<Self>,
        name: &str,
        chain: &Bytes,
    ) -> Result<Tunnel, RequestError> {
        let service = self.resolved(name).await?;
        self.retries.deposit();
        let arrived = std::time::Instant::now();
        // Every later hop may wait for an instance in turn.
        let timeout = self.settings.instance_wait + Duration::from_secs(10);
        let mut avoid = None;
        let mut attempts = 0u32;
        loop {
            let (peer, addr, try_timeout) = self.pick(&service, arrived, avoid).await?;
            attempts += 1;
            let mut attempt = Attempt::begin(&self.services, &service, peer);
            let error = match self.connection(peer, addr).await {
                Err(reason) => {
                    attempt.end(Outcome::Failed);
                    AttemptError::from(reason)
                }
                // Past the per-try timeout the core hears of it, as of an overdue request: a
                // hop that is only slow (setting up the rest of the chain) answers its probes,
                // a dead or frozen one is found silent and its connection closed, which ends
                // this set-up at once rather than at `timeout`.
                Ok(connection) => match watched(
                    pin!(set_up(&connection, chain, timeout, || {
                        self.services.stream_limit_hit()
                    })),
                    try_timeout,
                    attempt.overdue_handle(),
                )
                .await
                {
                    Ok((send, recv, rest, ready)) => {
                        attempt.end(Outcome::answered(
                            connection.rtt(),
                            attempt.started.elapsed(),
                        ));
                        return Ok(Tunnel {
                            send,
                            recv,
                            rest,
                            ready,
                            peer,
                            connection: connection.clone(),
                        });
                    }
                    Err(error) => {
                        attempt.end(match error {
                            AttemptError::Refused(_) => Outcome::Refused,
                            // The hop answered: it is alive.
                            AttemptError::Broken(StreamError::ServiceFailed(_)) => {
                                Outcome::answered(connection.rtt(), attempt.started.elapsed())
                            }
                            _ => Outcome::Failed,
                        });
                        error
                    }
                },
            };
            // A hop that answered that the rest of the chain failed has tried every instance
            // of its next hop it could within its own retry budget: trying again here would
            // repeat that, on the same hop when it is the only one.
            let next_hop_failed =
                matches!(error, AttemptError::Broken(StreamError::ServiceFailed(_)));
            let retry = !next_hop_failed && self.may_try_again(&service, attempts);
            tracing::debug!(service = %name, %peer, %error, retry, "tunnel set-up failed");
            if !retry {
                return Err(RequestError::Attempt {
                    service: name.to_owned(),
                    peer,
                    error,
                });
            }
            avoid = Some(peer);
        }
    }
}

/// Sends the set-up on a new stream of `connection` and reads the answer.
async fn set_up(
    connection: &Connection,
    chain: &Bytes,
    timeout: Duration,
    blocked: impl FnOnce(),
) -> Result<(SendStream, RecvStream, Decoder, String), AttemptError> {
    let (mut send, mut recv) = open_stream(connection, blocked).await?;
    let header = Bytes::copy_from_slice(&frame_header(Kind::Chain, chain.len()));
    let answer = async {
        send.write_all_chunks(&mut [header, chain.clone()])
            .await
            .map_err(|e| AttemptError::Broken(StreamError::Quic(e.to_string())))?;
        match tokio::time::timeout(timeout, read_opening(&mut recv)).await {
            Err(_) => Err(AttemptError::Broken(StreamError::TimedOut(
                "answer to the tunnel's set-up",
                timeout,
            ))),
            Ok(Err(error)) => Err(AttemptError::Broken(error)),
            Ok(Ok(Opening::Ready(text, rest))) => {
                Ok((rest, String::from_utf8_lossy(&text).into_owned()))
            }
            Ok(Ok(Opening::Refused(reason))) => Err(AttemptError::Refused(reason)),
            Ok(Ok(Opening::Failed(reason))) => {
                Err(AttemptError::Broken(StreamError::ServiceFailed(reason)))
            }
            Ok(Ok(other)) => Err(AttemptError::Broken(StreamError::Unexpected(other.kind()))),
        }
    }
    .await;
    match answer {
        Ok((rest, ready)) => Ok((send, recv, rest, ready)),
        Err(error) => {
            // Dropped, the stream would be finished as if the set-up were whole.
            let _ = send.reset(RESET_TUNNEL.into());
            Err(error)
        }
    }
}
