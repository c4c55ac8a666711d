//! Typed request-response over overlay streams: the control protocols (lookup, allocator, node
//! info) are each one [`Protocol`] with a versioned ID and size limits.
//!
//! Wire format, one request per stream: the client writes one frame and closes its write side;
//! the server answers with one frame and closes. A frame is a 4-byte big-endian length followed
//! by that many bytes of CBOR. A length over the protocol's limit is refused before anything
//! is allocated, so a peer cannot make another buffer more than the limit.
//!
//! A stream can be dropped unread: libp2p-stream drops an inbound stream when the server's
//! acceptor has not yet taken the one before (its guard against floods, rust-libp2p#5651), so
//! a burst of requests to one node loses some. The opener sees its stream end before the first
//! byte of an answer. Our servers answer every request they have read (the one exception, a
//! malformed request, fails the same way again), so such a stream was never read and is
//! opened again after a short randomised pause: [`Node::open_and_ask`], which every client of
//! a stream protocol here (this module's requests, blob transfers) goes through.

use std::{future::Future, sync::Arc, time::Duration};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::Semaphore;

use crate::overlay::{Backoff, Node};

/// One control protocol: its ID (the version is part of it) and message types.
pub trait Protocol: Send + Sync + 'static {
    /// Versioned stream protocol ID, e.g. `/mtc/node-info/1`. An incompatible change gets a
    /// new ID; a compatible one (new optional fields) keeps it.
    const ID: StreamProtocol;
    /// Largest encoded request a server accepts.
    const MAX_REQUEST_BYTES: u32;
    /// Largest encoded response a client accepts.
    const MAX_RESPONSE_BYTES: u32;
    /// What a client sends, encoded as CBOR.
    type Request: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What a server answers, encoded as CBOR.
    type Response: Serialize + DeserializeOwned + Send + Sync + 'static;
}

/// Why a request or a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// No stream of the protocol could be opened to the peer (it is unreachable, or does
    /// not serve the protocol). `target` reads `"<protocol> to <peer>"`.
    #[error("cannot open {target}: {reason}")]
    Open {
        /// The protocol and peer, as `"<protocol> to <peer>"`.
        target: String,
        /// Why the stream could not be opened.
        reason: String,
    },
    /// The whole exchange (open, send, answer) took longer than the node's request timeout.
    #[error("no answer to {target} within {timeout:?}")]
    Timeout {
        /// The protocol and peer, as `"<protocol> to <peer>"`.
        target: String,
        /// The timeout that passed: the node's
        /// [`Timing::request_timeout`](crate::overlay::Timing::request_timeout).
        timeout: Duration,
    },
    /// A frame's body is longer than the protocol allows; refused before it is read or sent.
    #[error("message of {len} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The body's length, in bytes.
        len: u64,
        /// The largest body allowed, in bytes.
        limit: u32,
    },
    /// A message could not be encoded as CBOR, or a received body does not decode as the
    /// expected type; the text says what is wrong.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Reading or writing the stream failed, including a stream that ended in the middle of
    /// a frame.
    #[error("stream failed: {0}")]
    Io(#[from] std::io::Error),
    /// Every stream opened to the peer ended before the first byte of an answer: it dropped
    /// them unread, being flooded (see the module documentation).
    #[error("{target} dropped unread {attempts} times: the peer is overloaded")]
    Dropped {
        /// The protocol and peer, as `"<protocol> to <peer>"`.
        target: String,
        /// How many streams were opened.
        attempts: u32,
    },
}

/// Encodes `message` as one frame, refusing it if it exceeds `limit`.
pub fn encode_frame<T: Serialize>(message: &T, limit: u32) -> Result<Vec<u8>, RpcError> {
    let mut frame = vec![0; 4];
    ciborium::into_writer(message, &mut frame).map_err(|e| RpcError::Malformed(e.to_string()))?;
    let len = (frame.len() - 4) as u64;
    if len > u64::from(limit) {
        return Err(RpcError::TooLarge { len, limit });
    }
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Decodes the body of a frame (without its length prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    ciborium::from_reader(body).map_err(|e| RpcError::Malformed(e.to_string()))
}

/// Reads one frame, refusing lengths over `limit` before reading the body.
pub async fn read_frame<T, R>(io: &mut R, limit: u32) -> Result<T, RpcError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut len = [0; 4];
    io.read_exact(&mut len).await?;
    read_body(io, u32::from_be_bytes(len), limit).await
}

/// Reads one frame like [`read_frame`], or `None` if the stream ends, or is reset, before its
/// first byte.
async fn read_frame_or_nothing<T, R>(io: &mut R, limit: u32) -> Result<Option<T>, RpcError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut len = [0; 4];
    let got = match io.read(&mut len).await {
        Ok(got) => got,
        Err(error) if ended(&error) => 0,
        Err(error) => return Err(error.into()),
    };
    if got == 0 {
        return Ok(None);
    }
    io.read_exact(&mut len[got..]).await?;
    read_body(io, u32::from_be_bytes(len), limit)
        .await
        .map(Some)
}

/// Whether `error` is how a stream reports that the other side dropped or reset it (yamux
/// fails writes with `WriteZero`; reads end early).
fn ended(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        WriteZero | BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof
    )
}

/// Reads the `len`-byte body of a frame whose length prefix has been read.
async fn read_body<T, R>(io: &mut R, len: u32, limit: u32) -> Result<T, RpcError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    if len > limit {
        return Err(RpcError::TooLarge {
            len: len.into(),
            limit,
        });
    }
    let mut body = vec![0; len as usize];
    io.read_exact(&mut body).await?;
    decode_body(&body)
}

/// Writes one frame and flushes it.
pub async fn write_frame<T, W>(io: &mut W, message: &T, limit: u32) -> Result<(), RpcError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    io.write_all(&encode_frame(message, limit)?).await?;
    io.flush().await?;
    Ok(())
}

/// How many requests of one protocol a node serves at once; more wait for a slot.
const MAX_CONCURRENT_REQUESTS: usize = 256;

/// Streams [`Node::open_and_ask`] opens for one exchange before it gives up on a peer that
/// drops them all unread.
pub const OPEN_ATTEMPTS: u32 = 8;

/// The pauses between attempts of [`Node::open_and_ask`] are drawn at random below a ceiling
/// that starts here and doubles ([`Backoff`]), so that the streams of one burst, dropped
/// together, do not come back together...
const FIRST_RETRY_CEILING: Duration = Duration::from_millis(8);
/// ...up to this (about 1 s at most in all, over [`OPEN_ATTEMPTS`]).
const LAST_RETRY_CEILING: Duration = Duration::from_millis(512);

/// A random pause shorter than `ceiling`.
fn jittered(ceiling: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_micros(random % (ceiling.as_micros() as u64).max(1))
}

impl Node {
    /// Sends `request` to `peer` over protocol `P` and waits for the answer, within the node's
    /// request timeout. Dials the peer if it is not connected.
    pub async fn request<P: Protocol>(
        &self,
        peer: PeerId,
        request: &P::Request,
    ) -> Result<P::Response, RpcError> {
        let timeout = self.timing().request_timeout;
        let frame = encode_frame(request, P::MAX_REQUEST_BYTES)?;
        let exchange = self.open_and_ask(peer, P::ID, &frame, true, P::MAX_RESPONSE_BYTES);
        let (answer, _) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| RpcError::Timeout {
                target: format!("{} to {peer}", P::ID),
                timeout,
            })??;
        Ok(answer)
    }

    /// Opens a stream of `protocol` to `peer` (dialing it if need be), writes `frame` (an
    /// encoded request), closes the writing side if `close`, and reads the first frame of the
    /// answer, of at most `limit` bytes; returns it with the stream, for exchanges that go on.
    /// A stream dropped unread is opened again, at most [`OPEN_ATTEMPTS`] times in all (see
    /// the module documentation). No timeout of its own: callers bound the whole exchange.
    pub async fn open_and_ask<T: DeserializeOwned>(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        frame: &[u8],
        close: bool,
        limit: u32,
    ) -> Result<(T, libp2p::Stream), RpcError> {
        let target = || format!("{protocol} to {peer}");
        let mut control = self.streams();
        let mut ceilings = Backoff::new(FIRST_RETRY_CEILING, LAST_RETRY_CEILING);
        for attempt in 0..OPEN_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(jittered(ceilings.next_delay())).await;
            }
            let mut stream = control
                .open_stream(peer, protocol.clone())
                .await
                .map_err(|e| RpcError::Open {
                    target: target(),
                    reason: e.to_string(),
                })?;
            let sent = async {
                stream.write_all(frame).await?;
                if close {
                    stream.close().await
                } else {
                    stream.flush().await
                }
            };
            match sent.await {
                Ok(()) => {}
                Err(error) if ended(&error) => continue,
                Err(error) => return Err(error.into()),
            }
            if let Some(answer) = read_frame_or_nothing(&mut stream, limit).await? {
                return Ok((answer, stream));
            }
        }
        Err(RpcError::Dropped {
            target: target(),
            attempts: OPEN_ATTEMPTS,
        })
    }

    /// Serves protocol `P` with `handler` until the node stops. Each request runs in its own
    /// task, at most `MAX_CONCURRENT_REQUESTS` at once; a peer that sends a malformed or
    /// oversized request, or stalls, loses its stream and nothing else.
    ///
    /// # Panics
    /// If `P` is already served by this node: a program wiring a protocol twice is a bug.
    pub fn serve<P, H, F>(&self, handler: H)
    where
        P: Protocol,
        H: Fn(PeerId, P::Request) -> F + Send + Sync + 'static,
        F: Future<Output = P::Response> + Send + 'static,
    {
        let mut incoming = self
            .streams()
            .accept(P::ID)
            .unwrap_or_else(|_| panic!("protocol {} is served twice", P::ID));
        let timeout = self.timing().request_timeout;
        let handler = Arc::new(handler);
        let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
        let stopped = self.stopped();
        tokio::spawn(async move {
            loop {
                let (peer, mut stream) = tokio::select! {
                    next = incoming.next() => match next {
                        Some(next) => next,
                        None => return,
                    },
                    () = stopped.cancelled() => return,
                };
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    let _slot = slot;
                    let exchange = async {
                        let request = read_frame(&mut stream, P::MAX_REQUEST_BYTES).await?;
                        let response = handler(peer, request).await;
                        write_frame(&mut stream, &response, P::MAX_RESPONSE_BYTES).await?;
                        stream.close().await?;
                        Ok::<_, RpcError>(())
                    };
                    match tokio::time::timeout(timeout, exchange).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, protocol = %P::ID, %error, "request failed")
                        }
                        Err(_) => tracing::debug!(%peer, protocol = %P::ID, "request timed out"),
                    }
                });
            }
        });
    }
}

/// Every node answers this: what it is and what it provides. Used by `check` and by tests.
pub struct NodeInfoProtocol;

/// The answer to a node-info request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct NodeInfo {
    /// The program: "ping-monitor", "proxy", ...
    pub role: String,
    /// The program's version.
    pub version: String,
    /// The namespaces the node advertises.
    pub advertised: Vec<String>,
    /// Where its data plane (a proxy's QUIC endpoint) listens. An unspecified IP (0.0.0.0)
    /// means "the address you reach me at on the overlay".
    #[serde(default)]
    pub data_plane: Option<std::net::SocketAddr>,
}

impl Protocol for NodeInfoProtocol {
    const ID: StreamProtocol = StreamProtocol::new("/mtc/node-info/1");
    const MAX_REQUEST_BYTES: u32 = 64;
    const MAX_RESPONSE_BYTES: u32 = 64 * 1024;
    type Request = ();
    type Response = NodeInfo;
}

/// Serves [`NodeInfoProtocol`] on `node`.
pub fn serve_node_info(node: &Node) {
    // Weak: serving must not keep the node alive once its program dropped it.
    let weak = node.downgrade();
    let role = node.role().to_owned();
    let data_plane = node.data_plane();
    node.serve::<NodeInfoProtocol, _, _>(move |_peer, ()| {
        let node = weak.upgrade();
        let role = role.clone();
        async move {
            let advertised = match node {
                Some(node) => node.advertised().await,
                None => Vec::new(),
            };
            NodeInfo {
                role,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                advertised,
                data_plane,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let info = NodeInfo {
            role: "proxy".into(),
            version: "1".into(),
            advertised: vec!["a".into()],
            data_plane: Some("127.0.0.1:4433".parse().unwrap()),
        };
        let frame = encode_frame(&info, 1024).unwrap();
        assert_eq!(
            u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
            frame.len() - 4
        );
        let back: NodeInfo = decode_body(&frame[4..]).unwrap();
        assert_eq!(back, info);
    }

    #[test]
    fn oversized_messages_are_refused_both_ways() {
        let big = vec![7u8; 100];
        assert!(matches!(
            encode_frame(&big, 50),
            Err(RpcError::TooLarge { limit: 50, .. })
        ));
        let frame = encode_frame(&big, 1000).unwrap();
        let result = futures::executor::block_on(read_frame::<Vec<u8>, _>(
            &mut futures::io::Cursor::new(frame),
            50,
        ));
        assert!(
            matches!(result, Err(RpcError::TooLarge { limit: 50, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn malformed_and_truncated_frames_are_errors() {
        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        let result = futures::executor::block_on(read_frame::<NodeInfo, _>(
            &mut futures::io::Cursor::new(garbage),
            100,
        ));
        assert!(matches!(result, Err(RpcError::Malformed(_))), "{result:?}");
        let truncated = [0, 0, 0, 9, 1];
        let result = futures::executor::block_on(read_frame::<NodeInfo, _>(
            &mut futures::io::Cursor::new(truncated),
            100,
        ));
        assert!(matches!(result, Err(RpcError::Io(_))), "{result:?}");
    }
}
