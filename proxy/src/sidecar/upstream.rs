//! The sidecar's side of its service: HTTP/1.1 on pooled keep-alive TCP connections, driven
//! from the request stream's own task. There is no connection task and no channel between the
//! stream and the socket (hyper's client has both: a hand-off and a wake-up each way per
//! request), and no `HeaderMap`: heads pass through [`crate::http1`] as bytes.
//!
//! One exchange ([`Upstream::exchange`]):
//! 1. the request head is written from the `HEAD` frame as it arrived;
//! 2. an idle connection is taken from the pool (one the service closed meanwhile is seen
//!    and dropped, without a system call when the socket is quiet), or a new one made within
//!    the connect timeout; failing that, the service never saw the request
//!    ([`ExchangeError::Connect`]);
//! 3. in the one task, the request body streams to the service while the response streams
//!    back: its head as a `HEAD` frame, its body as `DATA` frames that share the receive
//!    buffer's memory, its trailers as a `TRAILERS` frame. QUIC flow control and the TCP
//!    socket's buffers are the only buffering: a slow reader at either end slows the other;
//! 4. the connection goes back to the pool if both directions ended cleanly and the response
//!    allows it (keep-alive, a body whose end was known). An exchange the ingress gives up on
//!    (it stops reading the response) is dropped with its connection at once, however long
//!    the service would have taken.
//!
//! An upgrade request ([`crate::upgrade`]) goes the same way; a `101` answer to it goes to the
//! ingress as its head, the stream left open, and the connection is handed back to the
//! sidecar to carry the upgraded protocol ([`Exchanged::Switched`]), never to the pool.
//!
//! A pooled connection the service closed just as a request was written (the keep-alive race)
//! fails with nothing read back; such a request is written again on a new connection if
//! nothing of its body was taken yet and it either never left or is idempotent.

use std::{
    future::poll_fn,
    io,
    net::SocketAddr,
    pin::pin,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use crate::transport::{RecvStream, SendStream};
use crate::{
    framing::{self, Kind, RequestHeadView, frame_header},
    http1::{
        ChunkedDecoder, Http1Error, Parsed, Piece, RequestBody, ResponseBody, asks_upgrade,
        chunk_size_line, parse_response_head, write_request_head,
    },
    retry::idempotent,
    stream::{FramedBody, StreamError},
};

/// Idle connections kept per service; more are closed when released.
const MAX_IDLE: usize = 64;
/// Room for a request head, so that writing it does not grow the buffer.
const HEAD_CAPACITY: usize = 512;
/// The first read of a response; a body read to its end grows reads up to [`MAX_READ`].
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;

/// Why an exchange with the service failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The request's head from the ingress cannot be written as HTTP/1.1.
    #[error("the request head is invalid: {0}")]
    Request(Http1Error),
    /// No connection to the service: it never saw the request.
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    /// The request body from the ingress broke (the ingress reset its side, or sent bad
    /// frames); the service is not to blame.
    #[error("the request body from the ingress broke: {0}")]
    IngressBody(StreamError),
    /// The service broke the exchange before its response head (closed, reset, or answered
    /// something that is not HTTP/1.1).
    #[error("{0}")]
    Service(String),
    /// The exchange broke after the response head went to the ingress (the service or the
    /// QUIC stream, mid-body), or the ingress stopped reading. The stream must be reset, so
    /// that the ingress does not take a truncated body for a whole one.
    #[error("the response broke after its head, or the ingress stopped reading it: {0}")]
    AfterHead(String),
}

/// How an exchange ended well.
pub enum Exchanged {
    /// The response went to the ingress whole.
    Done,
    /// The service answered an upgrade request `101 Switching Protocols`: the head went to the
    /// ingress (the stream left open) and the connection now carries the upgraded protocol.
    Switched(Switched),
}

/// An upgraded exchange's two ends, for [`crate::l4::carry`]: the connection to the service
/// (what it sent after its `101` head in `early`) and the ingress's side of the stream.
pub struct Switched {
    /// The connection to the service, now the upgraded protocol's.
    pub connection: TcpStream,
    /// Bytes the service sent after its `101` head, read with it.
    pub early: Bytes,
    /// The receiving half of the request's stream, from the ingress.
    pub recv: RecvStream,
    /// What arrived on `recv` after the request head.
    pub rest: crate::framing::Decoder,
}

/// How one try on one connection ended well.
enum Tried {
    /// The response went whole; whether the connection may carry another request.
    Whole { reusable: bool },
    /// A `101` to an upgrade request went to the ingress; what the service sent after it.
    Switched(BytesMut),
}

/// The connections of a sidecar to its service.
pub struct Upstream {
    addr: SocketAddr,
    /// `addr` as a `Host` value, for requests that came without one.
    host: Bytes,
    connect_timeout: Duration,
    idle: Mutex<Vec<TcpStream>>,
}

/// What an exchange did so far, for deciding whether a failure may be retried. Shared by the
/// two directions of one task (atomics only because a task must be `Send`).
#[derive(Default)]
struct Progress {
    /// Some of the request body was taken from the ingress.
    body_taken: Flag,
    /// Some bytes of a response arrived.
    answered: Flag,
    /// The response head went to the ingress.
    head_sent: Flag,
    /// Writing the request to the socket failed.
    write_failed: Flag,
}

#[derive(Default)]
struct Flag(AtomicBool);

impl Flag {
    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, value: bool) {
        self.0.store(value, Ordering::Relaxed);
    }
}

/// How one try on one connection ended.
enum Failure {
    Ingress(StreamError),
    Service(String),
    /// The QUIC stream to the ingress failed (the ingress went away or stopped reading).
    Quic(String),
}

impl Upstream {
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self {
            addr,
            host: Bytes::from(addr.to_string()),
            connect_timeout,
            idle: Mutex::default(),
        }
    }

    /// Sends the request whose head is `head` and whose body follows on `recv` (`rest` is
    /// what arrived after the head) to the service, and streams its response on `send`.
    /// `answered` is called once the service's response head is read. An upgrade request
    /// (its head carries `Upgrade`) that the service switches is handed back
    /// ([`Exchanged::Switched`]) on its own connection, never pooled again.
    pub async fn exchange(
        &self,
        head: &RequestHeadView<'_>,
        recv: RecvStream,
        rest: crate::framing::Decoder,
        send: &mut SendStream,
        answered: impl Fn(),
    ) -> Result<Exchanged, ExchangeError> {
        let mut request = BytesMut::with_capacity(HEAD_CAPACITY);
        let kind =
            write_request_head(head, &self.host, &mut request).map_err(ExchangeError::Request)?;
        let request = request.freeze();
        let after_head_request = head.method == b"HEAD";
        let upgrade = asks_upgrade(head.fields);
        let idempotent = idempotent(head.method);
        let mut body = FramedBody::new(recv, rest);
        loop {
            let (mut connection, reused) = match self.checkout() {
                Some(connection) => (connection, true),
                None => (self.connect().await?, false),
            };
            let progress = Progress::default();
            let tried = self
                .run(
                    &mut connection,
                    &request,
                    kind,
                    &mut body,
                    (after_head_request, upgrade),
                    send,
                    &progress,
                    &answered,
                )
                .await;
            match tried {
                Ok(Tried::Whole { reusable: true }) => {
                    self.release(connection);
                    return Ok(Exchanged::Done);
                }
                Ok(Tried::Whole { reusable: false }) => return Ok(Exchanged::Done),
                Ok(Tried::Switched(early)) => {
                    let (recv, rest) = body.into_parts();
                    return Ok(Exchanged::Switched(Switched {
                        connection,
                        early: early.freeze(),
                        recv,
                        rest,
                    }));
                }
                Err(Failure::Service(reason)) => {
                    let stale = reused
                        && !progress.answered.get()
                        && !progress.body_taken.get()
                        && (progress.write_failed.get() || idempotent);
                    if stale {
                        tracing::debug!(%reason, "a pooled connection was closed; trying a new one");
                        continue;
                    }
                    return Err(if progress.head_sent.get() {
                        ExchangeError::AfterHead(reason)
                    } else {
                        ExchangeError::Service(reason)
                    });
                }
                Err(Failure::Ingress(error)) if !progress.head_sent.get() => {
                    return Err(ExchangeError::IngressBody(error));
                }
                Err(Failure::Ingress(error)) => {
                    return Err(ExchangeError::AfterHead(error.to_string()));
                }
                Err(Failure::Quic(reason)) => return Err(ExchangeError::AfterHead(reason)),
            }
        }
    }

    /// One try on `connection`: the request out and the response back, concurrently.
    /// `request_is` says whether the request was `HEAD`, and whether it asks for an upgrade.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        connection: &mut TcpStream,
        request: &Bytes,
        kind: RequestBody,
        body: &mut FramedBody,
        request_is: (bool, bool),
        send: &mut SendStream,
        progress: &Progress,
        answered: &impl Fn(),
    ) -> Result<Tried, Failure> {
        let (mut read, mut write) = connection.split();
        // Resolves when the ingress stops reading the response (it gave up on the request:
        // its client left, another instance answered a hedge): the exchange is then
        // abandoned, so a service that never answers holds no task and no connection here.
        let mut abandoned = pin!(send.stopped());
        let mut upload = pin!(upload(&mut write, request, kind, body, progress));
        let mut download = pin!(download(&mut read, send, request_is, progress, answered));
        // Whether the request went out whole; until then the connection cannot be reused.
        let mut uploaded: Option<bool> = None;
        poll_fn(|cx| {
            if uploaded.is_none() {
                match upload.as_mut().poll(cx) {
                    Poll::Ready(Ok(())) => uploaded = Some(true),
                    // The ingress's body broke: the service has a partial request, and the
                    // exchange is over.
                    Poll::Ready(Err(Failure::Ingress(error))) => {
                        return Poll::Ready(Err(Failure::Ingress(error)));
                    }
                    // The service stopped reading (it may have answered early, as a 413
                    // does): its response decides.
                    Poll::Ready(Err(_)) => uploaded = Some(false),
                    Poll::Pending => {}
                }
            }
            if let Poll::Ready(done) = download.as_mut().poll(cx) {
                return Poll::Ready(Ok(match done? {
                    Downloaded::Whole { keep_alive } => Tried::Whole {
                        reusable: keep_alive && uploaded == Some(true),
                    },
                    // An upgrade request has no body: its head went out before any answer.
                    Downloaded::Switched(early) => Tried::Switched(early),
                }));
            }
            if abandoned.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Failure::Quic(
                    "the ingress stopped reading the response".into(),
                )));
            }
            Poll::Pending
        })
        .await
    }

    /// An idle connection the service has not closed, if the pool has one.
    fn checkout(&self) -> Option<TcpStream> {
        loop {
            let connection = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            if quiet_and_open(&connection) {
                return Some(connection);
            }
        }
    }

    fn release(&self, connection: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_IDLE {
            // The oldest has waited longest and is likeliest to be closed by the service.
            idle.remove(0);
        }
        idle.push(connection);
    }

    async fn connect(&self) -> Result<TcpStream, ExchangeError> {
        connect(self.addr, self.connect_timeout)
            .await
            .map_err(ExchangeError::Connect)
    }
}

/// A new connection to the service at `addr`, within `timeout` (past it, an error of kind
/// `TimedOut`), with NODELAY: a head and its body, or a tunnel's small writes, may be separate
/// writes, and without it the second would wait for the service's delayed ACK of the first.
pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let connection = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            )
        })??;
    connection.set_nodelay(true)?;
    Ok(connection)
}

/// Whether an idle connection is still open with nothing to read: a quiet socket is known
/// from the reactor's readiness without a system call; one marked readable is read once
/// (a closed one reads 0 bytes; one with unasked-for bytes is not safe to reuse either).
fn quiet_and_open(connection: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match connection.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => matches!(
            connection.try_read(&mut [0u8; 1]),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock
        ),
    }
}

/// Writes the request head, then the body from the ingress as `kind` says.
async fn upload(
    write: &mut WriteHalf<'_>,
    head: &Bytes,
    kind: RequestBody,
    body: &mut FramedBody,
    progress: &Progress,
) -> Result<(), Failure> {
    let service = |error: io::Error| {
        progress.write_failed.set(true);
        Failure::Service(format!("writing the request: {error}"))
    };
    write.write_all(head).await.map_err(service)?;
    let mut left = match kind {
        RequestBody::None => return Ok(()),
        RequestBody::Length(length) => Some(length),
        RequestBody::Chunked => None,
    };
    let mut trailers_sent = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Failure::Ingress)?;
        progress.body_taken.set(true);
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let (Ok(trailers), None) = (frame.into_trailers(), left) {
                    let mut last = BytesMut::from(&b"0\r\n"[..]);
                    for (name, value) in &trailers {
                        last.extend_from_slice(name.as_str().as_bytes());
                        last.extend_from_slice(b": ");
                        last.extend_from_slice(value.as_bytes());
                        last.extend_from_slice(b"\r\n");
                    }
                    last.extend_from_slice(b"\r\n");
                    write.write_all(&last).await.map_err(service)?;
                    trailers_sent = true;
                }
                continue;
            }
        };
        match &mut left {
            Some(left) => {
                *left = left.checked_sub(data.len() as u64).ok_or_else(|| {
                    Failure::Ingress(StreamError::Body(
                        "the body is longer than its Content-Length".into(),
                    ))
                })?;
                write.write_all(&data).await.map_err(service)?;
            }
            None if data.is_empty() => {}
            None => {
                let (line, len) = chunk_size_line(data.len());
                let mut chunk = Buf::chain(Buf::chain(&line[..len], &data[..]), &b"\r\n"[..]);
                write.write_all_buf(&mut chunk).await.map_err(service)?;
            }
        }
    }
    match left {
        Some(0) => Ok(()),
        Some(_) => Err(Failure::Ingress(StreamError::Body(
            "the body is shorter than its Content-Length".into(),
        ))),
        None if trailers_sent => Ok(()),
        None => write.write_all(b"0\r\n\r\n").await.map_err(service),
    }
}

/// How a response went to the ingress.
enum Downloaded {
    /// Whole; whether the connection may carry another request.
    Whole { keep_alive: bool },
    /// Its `101` head, to an upgrade request; what the service sent after it.
    Switched(BytesMut),
}

/// Reads the response from the service and sends it to the ingress as frames, until it was
/// sent whole, or until a `101` answer to an upgrade request (`request_is`: whether the
/// request was `HEAD`, whether it asks for an upgrade) went, the stream left open.
async fn download(
    read: &mut ReadHalf<'_>,
    send: &mut SendStream,
    (after_head_request, upgrade): (bool, bool),
    progress: &Progress,
    answered: &impl Fn(),
) -> Result<Downloaded, Failure> {
    let service = |error: io::Error| Failure::Service(format!("reading the response: {error}"));
    let malformed = |error: Http1Error| Failure::Service(error.to_string());
    let quic = |error: quinn::WriteError| Failure::Quic(error.to_string());
    let mut buffer = BytesMut::with_capacity(FIRST_READ);
    let mut frames = BytesMut::with_capacity(HEAD_CAPACITY);
    let start = loop {
        match parse_response_head(&buffer, after_head_request, &mut frames).map_err(malformed)? {
            Parsed::Response(start) => break start,
            Parsed::Interim(len) => buffer.advance(len),
            Parsed::Partial => {
                buffer.reserve(FIRST_READ);
                if read.read_buf(&mut buffer).await.map_err(service)? == 0 {
                    return Err(Failure::Service(if progress.answered.get() {
                        "the service closed the connection in the middle of its response head"
                            .into()
                    } else {
                        "the service closed the connection without answering".into()
                    }));
                }
                progress.answered.set(true);
            }
        }
    };
    buffer.advance(start.head_len);
    answered();
    progress.head_sent.set(true);
    if upgrade && start.status == 101 {
        send.write_chunk(frames.freeze()).await.map_err(quic)?;
        return Ok(Downloaded::Switched(buffer));
    }
    let mut body = Body::new(start.body);
    let mut head = Some(frames);
    let mut read_size = FIRST_READ;
    loop {
        match body.next(&mut buffer).map_err(malformed)? {
            Some(Piece::Data(data)) => {
                // The head (if not yet sent) and the frame header go out with the data, in
                // one write.
                let mut out = head.take().unwrap_or_default();
                out.extend_from_slice(&frame_header(Kind::Data, data.len()));
                send.write_all_chunks(&mut [out.freeze(), data])
                    .await
                    .map_err(quic)?;
            }
            Some(Piece::Trailers(trailers)) => {
                let mut out = head.take().unwrap_or_default();
                out.extend_from_slice(&trailers);
                send.write_chunk(out.freeze()).await.map_err(quic)?;
            }
            Some(Piece::End) => {
                if let Some(head) = head.take() {
                    send.write_chunk(head.freeze()).await.map_err(quic)?;
                }
                send.finish().map_err(|e| Failure::Quic(e.to_string()))?;
                // Bytes past the body's end were never asked for: the connection is not
                // safe to reuse.
                return Ok(Downloaded::Whole {
                    keep_alive: start.keep_alive && buffer.is_empty(),
                });
            }
            None => {
                // Reads grow while the body goes on, up to MAX_READ.
                buffer.reserve(body.wanted(read_size));
                read_size = (read_size * 2).min(MAX_READ);
                if read.read_buf(&mut buffer).await.map_err(service)? == 0 {
                    if body.ends_at_close() {
                        body.closed();
                        continue;
                    }
                    return Err(Failure::Service(
                        "the service closed the connection in the middle of its response body"
                            .into(),
                    ));
                }
            }
        }
    }
}

/// A response body as its framing says it comes.
enum Body {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose { closed: bool },
}

impl Body {
    fn new(kind: ResponseBody) -> Self {
        match kind {
            ResponseBody::None => Self::Length(0),
            ResponseBody::Length(length) => Self::Length(length),
            ResponseBody::Chunked => Self::Chunked(ChunkedDecoder::default()),
            ResponseBody::UntilClose => Self::UntilClose { closed: false },
        }
    }

    /// The next piece of the body in `buffer`, `None` if more must be read.
    fn next(&mut self, buffer: &mut BytesMut) -> Result<Option<Piece>, Http1Error> {
        match self {
            Self::Length(0) => Ok(Some(Piece::End)),
            Self::Length(left) => {
                if buffer.is_empty() {
                    return Ok(None);
                }
                let take = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(buffer.len())
                    .min(framing::MAX_DATA_BYTES);
                *left -= take as u64;
                Ok(Some(Piece::Data(buffer.split_to(take).freeze())))
            }
            Self::Chunked(decoder) => decoder.decode(buffer, framing::MAX_DATA_BYTES),
            Self::UntilClose { closed } => {
                if !buffer.is_empty() {
                    let take = buffer.len().min(framing::MAX_DATA_BYTES);
                    return Ok(Some(Piece::Data(buffer.split_to(take).freeze())));
                }
                Ok(closed.then_some(Piece::End))
            }
        }
    }

    /// How much to read next, given the read size so far.
    fn wanted(&self, read_size: usize) -> usize {
        match self {
            Self::Length(left) => usize::try_from(*left).unwrap_or(usize::MAX).min(read_size),
            _ => read_size,
        }
    }

    fn ends_at_close(&self) -> bool {
        matches!(self, Self::UntilClose { .. })
    }

    fn closed(&mut self) {
        if let Self::UntilClose { closed } = self {
            *closed = true;
        }
    }
}
