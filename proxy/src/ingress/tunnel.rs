//! Streams that outlive a request: a layer-4 tunnel to an instance of a service
//! ([`crate::l4`]: the chain sent in a `CHAIN` frame, the stream returned once the instance's
//! sidecar answered `READY`, after its own set-up of the rest of the chain) and an upgrade
//! ([`crate::upgrade`]: the request's `HEAD` frame, the stream returned upgraded on a `101`).
//! Both choose their instance as a request does and share one set-up loop.

use std::{pin::pin, sync::Arc, time::Duration};

use bytes::Bytes;
use libp2p::PeerId;

use super::{Attempt, Ingress, RequestError, Resolved, routing::Outcome, watched};
use crate::transport::{Connection, RecvStream, SendStream};
use crate::{
    forward::{Answer, AttemptError, open_stream},
    framing::{Decoder, Kind, frame_header, view_response_head},
    l4::carry::RESET_TUNNEL,
    stream::{FramedBody, Opening, StreamError, read_opening},
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

/// What an upgrade request came to ([`crate::upgrade`], rules 2 and 3).
pub enum Upgraded {
    /// Answered `101`: the response head's payload, and the stream, now the upgraded
    /// protocol's both ways.
    Switched {
        /// The `101` response's `HEAD` frame payload.
        head: Bytes,
        /// The sending half of the stream, toward the service.
        send: SendStream,
        /// The receiving half, from the service.
        recv: RecvStream,
        /// Whatever arrived after the `101` head.
        rest: Decoder,
    },
    /// Answered otherwise: an ordinary answer; the stream's sending half has ended.
    Refused(Answer),
}

/// A stream to an instance whose first answer was the one asked for.
struct Opened {
    send: SendStream,
    recv: RecvStream,
    /// The answer's opening frame.
    opening: Opening,
    peer: PeerId,
    connection: Connection,
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
        let header = Bytes::copy_from_slice(&frame_header(Kind::Chain, chain.len()));
        // A hop that answered that the rest of the chain failed has tried every instance
        // of its next hop it could within its own retry budget: trying again here would
        // repeat that, on the same hop when it is the only one.
        let next_hop_failed = |error: &AttemptError| {
            matches!(error, AttemptError::Broken(StreamError::ServiceFailed(_)))
        };
        let opened = self
            .open_stream_to(&service, &[header, chain.clone()], Kind::Ready, |error| {
                !next_hop_failed(error)
            })
            .await?;
        let Opening::Ready(text, rest) = opened.opening else {
            unreachable!("open_stream_to returns the opening asked for");
        };
        Ok(Tunnel {
            send: opened.send,
            recv: opened.recv,
            rest,
            ready: String::from_utf8_lossy(&text).into_owned(),
            peer: opened.peer,
            connection: opened.connection,
        })
    }

    /// Sends an upgrade request (its `HEAD` frame `head`, header included) to an instance of
    /// service `name` and returns the answer: the upgraded stream, or an ordinary answer. Sent
    /// to another instance only while the service cannot have seen it (rule 6).
    pub(super) async fn upgrade(
        self: &Arc<Self>,
        name: &str,
        head: Bytes,
    ) -> (Option<Arc<Resolved>>, Result<Upgraded, RequestError>) {
        let service = match self.resolved(name).await {
            Ok(service) => service,
            Err(error) => return (None, Err(error)),
        };
        let unseen = |error: &AttemptError| {
            matches!(
                error,
                AttemptError::Unreachable(_) | AttemptError::NotSent(_) | AttemptError::Refused(_)
            )
        };
        let opened = match self
            .open_stream_to(&service, &[head], Kind::Head, unseen)
            .await
        {
            Ok(opened) => opened,
            Err(error) => return (Some(service), Err(error)),
        };
        let Opening::Head(payload, rest) = opened.opening else {
            unreachable!("open_stream_to returns the opening asked for");
        };
        let status = match view_response_head(&payload) {
            Ok((status, _)) => status,
            Err(error) => {
                let service_name = name.to_owned();
                let error = RequestError::Answer {
                    service: service_name,
                    error,
                };
                return (Some(service), Err(error));
            }
        };
        let mut send = opened.send;
        if status == 101 {
            let switched = Upgraded::Switched {
                head: payload,
                send,
                recv: opened.recv,
                rest,
            };
            return (Some(service), Ok(switched));
        }
        // An ordinary answer: the request had no body.
        let _ = send.finish();
        let answer = Answer {
            status,
            head: payload,
            body: FramedBody::new(opened.recv, rest),
        };
        (Some(service), Ok(Upgraded::Refused(answer)))
    }

    /// Opens a stream to an instance of `service`, chosen, waited for or allocated as a
    /// request's instance is, sends `frame` on it and waits for an answer opening with
    /// `expected`; tried again on another instance (within the retry budget and perf.conf's
    /// `max-attempts`) when an attempt fails in a way `retriable` accepts. An answer may take a
    /// while (a hop sets up the rest of its chain first): past the per-try timeout the routing
    /// core hears of it, as of an overdue request, and a frozen instance is found out by its
    /// probes, which ends the attempt.
    async fn open_stream_to(
        self: &Arc<Self>,
        service: &Arc<Resolved>,
        frame: &[Bytes],
        expected: Kind,
        retriable: impl Fn(&AttemptError) -> bool,
    ) -> Result<Opened, RequestError> {
        self.retries.deposit();
        let arrived = std::time::Instant::now();
        // Every later hop may wait for an instance in turn.
        let timeout = self.settings.instance_wait + Duration::from_secs(10);
        let mut avoid = None;
        let mut attempts = 0u32;
        loop {
            let (peer, addr, try_timeout) = self.pick(service, arrived, avoid).await?;
            attempts += 1;
            let mut attempt = Attempt::begin(&self.services, service, peer);
            let error = match self.connection(peer, addr).await {
                Err(reason) => {
                    attempt.end(Outcome::Failed);
                    AttemptError::from(reason)
                }
                Ok(connection) => match watched(
                    pin!(set_up(&connection, frame, expected, timeout, || {
                        self.services.stream_limit_hit()
                    })),
                    try_timeout,
                    attempt.overdue_handle(),
                )
                .await
                {
                    Ok((send, recv, opening)) => {
                        attempt.end(Outcome::answered(
                            connection.rtt(),
                            attempt.started.elapsed(),
                        ));
                        return Ok(Opened {
                            send,
                            recv,
                            opening,
                            peer,
                            connection: connection.clone(),
                        });
                    }
                    Err(error) => {
                        attempt.end(match error {
                            AttemptError::Refused(_) => Outcome::Refused,
                            // The instance answered: it is alive.
                            AttemptError::Broken(StreamError::ServiceFailed(_)) => {
                                Outcome::answered(connection.rtt(), attempt.started.elapsed())
                            }
                            _ => Outcome::Failed,
                        });
                        error
                    }
                },
            };
            let retry = retriable(&error) && self.may_try_again(service, attempts);
            let name = &service.record.name;
            tracing::debug!(service = %name, %peer, %error, retry, "stream set-up failed");
            if !retry {
                return Err(RequestError::Attempt {
                    service: name.clone(),
                    peer,
                    error,
                });
            }
            avoid = Some(peer);
        }
    }
}

/// Sends `frame` on a new stream of `connection` and reads the answer's opening, which must
/// be `expected` (`REFUSED` and `FAILED` are errors of their kinds).
async fn set_up(
    connection: &Connection,
    frame: &[Bytes],
    expected: Kind,
    timeout: Duration,
    blocked: impl FnOnce(),
) -> Result<(SendStream, RecvStream, Opening), AttemptError> {
    let (mut send, mut recv) = open_stream(connection, blocked).await?;
    let answer = async {
        send.write_all_chunks(&mut frame.to_vec())
            .await
            .map_err(|e| AttemptError::Broken(StreamError::Quic(e.to_string())))?;
        match tokio::time::timeout(timeout, read_opening(&mut recv)).await {
            Err(_) => Err(AttemptError::Broken(StreamError::TimedOut(
                "the answer's head",
                timeout,
            ))),
            Ok(Err(error)) => Err(AttemptError::Broken(error)),
            Ok(Ok(Opening::Refused(reason))) => Err(AttemptError::Refused(reason)),
            Ok(Ok(Opening::Failed(reason))) => {
                Err(AttemptError::Broken(StreamError::ServiceFailed(reason)))
            }
            Ok(Ok(opening)) if opening.kind() == expected => Ok(opening),
            Ok(Ok(other)) => Err(AttemptError::Broken(StreamError::Unexpected(other.kind()))),
        }
    }
    .await;
    match answer {
        Ok(opening) => Ok((send, recv, opening)),
        Err(error) => {
            // Dropped, the stream would be finished as if what was sent were whole.
            let _ = send.reset(RESET_TUNNEL.into());
            Err(error)
        }
    }
}
