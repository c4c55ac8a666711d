//! The ingress's own HTTP/1.1 front: one task per client connection reads request heads,
//! hands each to [`Ingress::request`] as the `HEAD` frame [`crate::http1::front`] made of it (parsed
//! once, no `HeaderMap`), and writes the instance's answer back as it streams in. A
//! connection that opens with HTTP/2's preface goes to hyper's HTTP/2 server instead
//! ([`super::serve_h2`]).
//!
//! # The path of one connection
//! 1. A head is read (within `--head-timeout` of waiting for it, at most `--max-head-bytes`);
//!    a malformed one is answered with its status ([`FrontError::status`]) and the connection
//!    closed, as is one that cannot be framed.
//! 2. A request body is read from the connection by the [`ClientBody`] the exchange sends on
//!    (by `Content-Length` or chunked, its bytes handed on as they arrive, never buffered
//!    whole); `Expect: 100-continue` is answered at once. Once the body ended, the body
//!    gives the connection's read half back for the next request; if the answer came before
//!    the body was read to its end, the connection closes after the answer.
//! 3. The answer's head is written from its frame ([`write_response_head`]), then its body:
//!    as it is (with a length), chunked (trailers if the client takes them), or until close;
//!    the first data goes out in the same write as the head when it is already there. An
//!    answer that breaks mid-body closes the connection without ending the message, so the
//!    client sees it incomplete. A request that fails is answered with its error's status
//!    ([`super::RequestError::status`]) and reason.
//! 4. An upgrade request (WebSocket, ...: [`crate::upgrade`]) goes by [`Ingress::upgrade`]
//!    instead, its stream left open; answered `101`, the head is written and the connection
//!    and the stream carry the upgraded protocol both ways until both end; answered
//!    otherwise, as in step 3.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::oneshot,
};
use tokio_util::io::poll_read_buf;

use super::{Ingress, RequestError, Resolved, limits::Limit, tunnel::Upgraded};
use crate::transport::{RecvStream, SendStream};
use crate::{
    forward::{Answer, HEAD_CAPACITY},
    framing::{Decoder, FrameError, MAX_DATA_BYTES, decode_trailers},
    http1::{
        ChunkedDecoder, Http1Error, Piece, RequestBody, chunk_size_line,
        front::{
            FrontError, ParsedRequest, ResponseContext, ResponseFraming, parse_request_head,
            write_local_response_head, write_response_head,
        },
    },
    l4::carry::{CarryError, Sink, Source},
    metrics::UNKNOWN_SERVICE,
    retry::idempotent,
    upgrade::{self, Ends, IDLE_TIMEOUT, Outcome as UpgradeOutcome, Role},
};

/// What is read from a client at a time: a head, and a body's first read.
const READ_CHUNK: usize = 8 * 1024;
/// The largest read of a body: reads double from [`READ_CHUNK`] while a body goes on, so a
/// small body costs one small buffer and a large upload crosses in few, large `DATA` frames
/// (as the sidecar reads a service's response).
const MAX_BODY_READ: usize = 64 * 1024;

/// Serves HTTP/1.1 requests on `stream` from `client` until it closes; `buffer` holds what
/// was read before (the start of the first request).
pub(super) async fn serve(
    ingress: Arc<Ingress>,
    stream: TcpStream,
    client: SocketAddr,
    buffer: BytesMut,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = Some(Reader { read, buffer });
    let mut out = BytesMut::with_capacity(HEAD_CAPACITY);
    // The requests' HEAD frames are split off this one buffer, whose memory comes back once
    // the frame sent before is dropped: no allocation per request.
    let mut frames = BytesMut::new();
    while let Some(current) = reader.take() {
        let request = one_request(&ingress, current, &mut write, &mut out, &mut frames, client);
        reader = match request.await {
            Ok(Next::Same(same)) => Some(same),
            Ok(Next::After(back)) => back.await.ok(),
            Ok(Next::Upgraded(reader, stream)) => {
                // The connection is the upgraded protocol's from now on, until it ends.
                if let Err(error) = carry_upgraded(&ingress, reader, write, stream).await {
                    tracing::debug!(%error, "upgraded stream broke");
                }
                return;
            }
            Ok(Next::Close) | Err(_) => None,
        };
    }
    let _ = write.shutdown().await;
}

/// Carries an upgraded connection and its stream both ways until both ended
/// ([`crate::upgrade`]); what the client sent after its request head goes first.
async fn carry_upgraded(
    ingress: &Ingress,
    reader: Reader,
    write: OwnedWriteHalf,
    stream: UpgradedStream,
) -> Result<(), CarryError> {
    let UpgradedStream { send, recv, rest } = stream;
    let ends = Ends {
        from_client: Source::Tcp(reader.read),
        early_to_service: reader.buffer.freeze(),
        to_service: Sink::Stream(send, None),
        from_service: Source::Stream(recv, rest, None),
        early_to_client: Bytes::new(),
        to_client: Sink::Tcp(write),
    };
    upgrade::carry(ends, &ingress.metrics.upgrades, Role::Ingress, IDLE_TIMEOUT).await
}

/// The read half of a client connection and what was read from it but not yet used.
struct Reader {
    read: OwnedReadHalf,
    buffer: BytesMut,
}

/// What becomes of a connection after a request.
enum Next {
    /// The next request is read with this (the request had no body).
    Same(Reader),
    /// The next request is read with what the request's body gives back once it ended (if it
    /// is dropped before, the connection closes).
    After(oneshot::Receiver<Reader>),
    /// The service switched protocols: the connection and this stream carry its bytes.
    Upgraded(Reader, UpgradedStream),
    Close,
}

/// The QUIC stream of an upgraded exchange, at the ingress.
struct UpgradedStream {
    send: SendStream,
    recv: RecvStream,
    rest: Decoder,
}

/// Reads, sends and answers one request.
async fn one_request(
    ingress: &Arc<Ingress>,
    mut reader: Reader,
    write: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    frame: &mut BytesMut,
    client: SocketAddr,
) -> std::io::Result<Next> {
    let settings = &ingress.settings;
    let deadline = tokio::time::Instant::now() + settings.head_timeout;
    frame.reserve(HEAD_CAPACITY);
    // 1. The head: parsed in place and its frame made; then split off the buffer.
    let (head_len, body_framing, expect_continue, context, service_at, replayable) = loop {
        match parse_request_head(&reader.buffer, settings.max_head_bytes, client.ip(), frame) {
            Ok(ParsedRequest::Request(start)) => {
                let at = start.service.as_ptr() as usize - reader.buffer.as_ptr() as usize;
                let replayable =
                    idempotent(start.method) && matches!(start.body, RequestBody::None);
                break (
                    start.head_len,
                    start.body,
                    start.expect_continue,
                    start.response_context(),
                    at..at + start.service.len(),
                    replayable,
                );
            }
            Ok(ParsedRequest::Partial) => {}
            Err(error) => {
                if matches!(error, FrontError::HeadTooLarge(_)) {
                    ingress.metrics.limit_hit(Limit::HeadBytes);
                }
                return refuse(ingress, write, out, &error).await;
            }
        }
        reader.buffer.reserve(READ_CHUNK);
        match tokio::time::timeout_at(deadline, reader.read.read_buf(&mut reader.buffer)).await {
            Ok(Ok(0) | Err(_)) => return Ok(Next::Close),
            Err(_) => {
                ingress.metrics.limit_hit(Limit::HeadTime);
                return Ok(Next::Close);
            }
            Ok(Ok(_)) => {}
        }
    };
    let begin = Instant::now();
    let head = reader.buffer.split_to(head_len).freeze();
    let name = std::str::from_utf8(&head[service_at]).unwrap_or_default();
    if context.upgrade {
        return upgrade_request(ingress, reader, write, out, frame, name, &context, begin).await;
    }

    // 2. The body, read by the exchange; the reader comes back when it ended.
    let (body, mut next) = match body_framing {
        RequestBody::None => (ClientBody::none(), Next::Same(reader)),
        framing => {
            if expect_continue {
                write.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
            }
            let (sender, back) = oneshot::channel();
            (ClientBody::new(reader, framing, sender), Next::After(back))
        }
    };
    if !context.keep_alive {
        next = Next::Close;
    }

    // 3. The answer.
    let serving = ingress.activity.serve();
    ingress.retries.deposit();
    let (service, result) = ingress
        .request(name, frame.split().freeze(), replayable, body)
        .await;
    let answer = match result {
        Ok(answer) => answer,
        Err(error) => {
            tracing::debug!(%error, "request failed");
            ingress.answered(service.as_deref(), error.status(), begin.elapsed());
            // A body the exchange did not read to its end leaves the connection unusable.
            let next = match next {
                Next::After(mut back) => match back.try_recv() {
                    Ok(reader) => Next::Same(reader),
                    Err(_) => Next::Close,
                },
                other => other,
            };
            let keep_alive = !matches!(next, Next::Close);
            write_local(write, out, error.status(), &error.to_string(), keep_alive).await?;
            return Ok(next);
        }
    };
    drop(serving);
    let whole = write_answer(
        ingress,
        write,
        out,
        service.as_deref(),
        answer,
        &context,
        begin,
    );
    Ok(if whole.await? { next } else { Next::Close })
}

/// Writes an instance's answer to the client, counted; whether the connection can carry
/// another request after it.
async fn write_answer(
    ingress: &Ingress,
    write: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    service: Option<&Resolved>,
    answer: Answer,
    context: &ResponseContext,
    begin: Instant,
) -> std::io::Result<bool> {
    out.clear();
    let (framing, keep_alive) = match write_response_head(&answer.head, context, out) {
        Ok(written) => written,
        Err(error) => {
            unframable(ingress, write, out, service, error, begin).await?;
            return Ok(false);
        }
    };
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    ingress.answered(service, status, begin.elapsed());
    Ok(write_body(write, out, answer, framing).await? && keep_alive)
}

/// Answers a request whose answer's head cannot be written as HTTP/1.1 (502), counted.
async fn unframable(
    ingress: &Ingress,
    write: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    service: Option<&Resolved>,
    error: FrameError,
    begin: Instant,
) -> std::io::Result<()> {
    let error = RequestError::Answer {
        service: service
            .map_or(UNKNOWN_SERVICE, |s| &s.record.name)
            .to_owned(),
        error,
    };
    ingress.answered(service, error.status(), begin.elapsed());
    write_local(write, out, error.status(), &error.to_string(), false).await
}

/// Sends an upgrade request (no body; its frame in `frame`) and answers it: a `101` written
/// and the connection handed on upgraded ([`Next::Upgraded`]), or an ordinary answer.
#[allow(clippy::too_many_arguments)]
async fn upgrade_request(
    ingress: &Arc<Ingress>,
    reader: Reader,
    write: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    frame: &mut BytesMut,
    name: &str,
    context: &ResponseContext,
    begin: Instant,
) -> std::io::Result<Next> {
    ingress.retries.deposit();
    let (service, result) = ingress.upgrade(name, frame.split().freeze()).await;
    let upgrades = &ingress.metrics.upgrades;
    let answer = match result {
        Ok(Upgraded::Switched {
            head,
            send,
            recv,
            rest,
        }) => {
            upgrades.outcome(Role::Ingress, UpgradeOutcome::Switched);
            out.clear();
            if let Err(error) = write_response_head(&head, context, out) {
                unframable(ingress, write, out, service.as_deref(), error, begin).await?;
                return Ok(Next::Close);
            }
            let status = StatusCode::SWITCHING_PROTOCOLS;
            ingress.answered(service.as_deref(), status, begin.elapsed());
            write.write_all(out).await?;
            out.clear();
            return Ok(Next::Upgraded(reader, UpgradedStream { send, recv, rest }));
        }
        Ok(Upgraded::Refused(answer)) => {
            upgrades.outcome(Role::Ingress, UpgradeOutcome::Refused);
            answer
        }
        Err(error) => {
            upgrades.outcome(Role::Ingress, UpgradeOutcome::Failed);
            tracing::debug!(%error, "upgrade request failed");
            ingress.answered(service.as_deref(), error.status(), begin.elapsed());
            write_local(write, out, error.status(), &error.to_string(), false).await?;
            return Ok(Next::Close);
        }
    };
    let whole = write_answer(
        ingress,
        write,
        out,
        service.as_deref(),
        answer,
        context,
        begin,
    );
    Ok(if whole.await? {
        Next::Same(reader)
    } else {
        Next::Close
    })
}

/// Answers a head that cannot be served with its status, and closes.
async fn refuse(
    ingress: &Ingress,
    write: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    error: &FrontError,
) -> std::io::Result<Next> {
    tracing::debug!(%error, "request head refused");
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
    ingress.answered(None, status, std::time::Duration::ZERO);
    write_local(write, out, status, &error.to_string(), false).await?;
    Ok(Next::Close)
}

/// Writes a response of the ingress's own: `status` and `text` as plain text.
async fn write_local(
    write: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    status: StatusCode,
    text: &str,
    keep_alive: bool,
) -> std::io::Result<()> {
    out.clear();
    write_local_response_head(status.as_u16(), text.len() + 1, keep_alive, out);
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\n");
    write.write_all(out).await
}

/// Writes the head in `out` and the answer's body framed as `framing`; false if the
/// connection cannot carry another request (the body broke, or had the wrong length).
async fn write_body(
    write: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    answer: Answer,
    framing: ResponseFraming,
) -> std::io::Result<bool> {
    let mut body = answer.body;
    if framing == ResponseFraming::None {
        write.write_all(out).await?;
        return Ok(true);
    }
    let mut written = 0u64;
    // The first data goes with the head when it is already here.
    let mut pending = body.frame().now_or_never();
    if pending.is_none() {
        write.write_all(out).await?;
        out.clear();
    }
    loop {
        let frame = match pending.take() {
            Some(frame) => frame,
            None => body.frame().await,
        };
        match frame {
            None => break,
            Some(Err(error)) => {
                tracing::debug!(%error, "the answer broke mid-body");
                write.write_all(out).await?;
                return Ok(false);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    written += data.len() as u64;
                    if let ResponseFraming::Length(length) = framing
                        && written > length
                    {
                        write.write_all(out).await?;
                        return Ok(false);
                    }
                    write_data(write, out, data, framing).await?;
                }
                Err(frame) => {
                    if let (ResponseFraming::Chunked { trailers: true }, Ok(trailers)) =
                        (framing, frame.into_trailers())
                    {
                        out.extend_from_slice(b"0\r\n");
                        put_trailers(out, &trailers);
                        out.extend_from_slice(b"\r\n");
                        write.write_all(out).await?;
                        out.clear();
                        return Ok(true);
                    }
                }
            },
        }
    }
    match framing {
        ResponseFraming::Chunked { .. } => out.extend_from_slice(b"0\r\n\r\n"),
        ResponseFraming::Length(length) if written != length => {
            write.write_all(out).await?;
            return Ok(false);
        }
        _ => {}
    }
    write.write_all(out).await?;
    out.clear();
    Ok(framing != ResponseFraming::UntilClose)
}

/// Writes `data` (after what `out` holds) framed as `framing`, in one vectored write.
async fn write_data(
    write: &mut OwnedWriteHalf,
    out: &mut BytesMut,
    data: Bytes,
    framing: ResponseFraming,
) -> std::io::Result<()> {
    if matches!(framing, ResponseFraming::Chunked { .. }) {
        let (line, len) = chunk_size_line(data.len());
        out.extend_from_slice(&line[..len]);
        let mut all = Buf::chain(Buf::chain(&out[..], data), &b"\r\n"[..]);
        write.write_all_buf(&mut all).await?;
    } else {
        let mut all = Buf::chain(&out[..], data);
        write.write_all_buf(&mut all).await?;
    }
    out.clear();
    Ok(())
}

fn put_trailers(out: &mut BytesMut, trailers: &HeaderMap) {
    for (name, value) in trailers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Why a client's request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// The connection ended before the body did (fewer bytes than `Content-Length`, or no
    /// last chunk).
    #[error("the client closed the connection before the end of its body")]
    Closed,
    /// Reading from the client's connection failed.
    #[error("reading the body: {0}")]
    Io(#[from] std::io::Error),
    /// The chunked coding of the body is malformed.
    #[error(transparent)]
    Chunked(#[from] Http1Error),
    /// The body's trailers cannot be decoded into header fields.
    #[error("the body's trailers: {0}")]
    Trailers(#[from] crate::framing::FrameError),
}

/// How much of a body is left.
enum Left {
    Length(u64),
    Chunked(ChunkedDecoder),
}

/// A client's request body, read from its connection as the exchange asks for it; the
/// connection's read half goes back to its front once the body ended.
pub struct ClientBody {
    reader: Option<Reader>,
    left: Left,
    back: Option<oneshot::Sender<Reader>>,
    /// What the next read asks for at most.
    read_size: usize,
}

impl ClientBody {
    fn none() -> Self {
        Self {
            reader: None,
            left: Left::Length(0),
            back: None,
            read_size: READ_CHUNK,
        }
    }

    fn new(reader: Reader, framing: RequestBody, back: oneshot::Sender<Reader>) -> Self {
        let left = match framing {
            RequestBody::Chunked => Left::Chunked(ChunkedDecoder::default()),
            RequestBody::Length(length) => Left::Length(length),
            RequestBody::None => Left::Length(0),
        };
        Self {
            reader: Some(reader),
            left,
            back: Some(back),
            read_size: READ_CHUNK,
        }
    }

    /// The body ended: the reader goes back for the next request.
    fn ended(&mut self) {
        if let (Some(reader), Some(back)) = (self.reader.take(), self.back.take()) {
            let _ = back.send(reader);
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        loop {
            let Some(reader) = this.reader.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.left {
                Left::Length(0) => {
                    this.ended();
                    return Poll::Ready(None);
                }
                Left::Length(left) if !reader.buffer.is_empty() => {
                    let n = reader.buffer.len().min(*left as usize).min(MAX_DATA_BYTES);
                    *left -= n as u64;
                    let data = reader.buffer.split_to(n).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Left::Length(_) => {}
                Left::Chunked(decoder) => {
                    match decoder.decode(&mut reader.buffer, MAX_DATA_BYTES) {
                        Ok(Some(Piece::Data(data))) => {
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(Some(Piece::Trailers(frame))) => {
                            // The decoder made a TRAILERS frame: its payload follows the header.
                            let trailers =
                                decode_trailers(&frame[crate::framing::FRAME_HEADER_BYTES..]);
                            return Poll::Ready(Some(
                                trailers.map(Frame::trailers).map_err(Into::into),
                            ));
                        }
                        Ok(Some(Piece::End)) => {
                            this.ended();
                            return Poll::Ready(None);
                        }
                        Ok(None) => {}
                        Err(error) => return Poll::Ready(Some(Err(error.into()))),
                    }
                }
            }
            let wanted = match this.left {
                Left::Length(left) => {
                    usize::try_from(left).map_or(this.read_size, |left| left.min(this.read_size))
                }
                Left::Chunked(_) => this.read_size,
            };
            reader.buffer.reserve(wanted);
            this.read_size = (this.read_size * 2).min(MAX_BODY_READ);
            match ready!(poll_read_buf(
                Pin::new(&mut reader.read),
                cx,
                &mut reader.buffer
            )) {
                Ok(0) => return Poll::Ready(Some(Err(ClientBodyError::Closed))),
                Ok(_) => {}
                Err(error) => return Poll::Ready(Some(Err(error.into()))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_none() || matches!(self.left, Left::Length(0))
    }
}
