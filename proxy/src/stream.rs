//! HTTP messages on a QUIC stream, in the frames of [`crate::framing`], streamed both ways
//! with back-pressure: a body is never held whole, a DATA frame is a 5-byte header written in
//! front of the chunk it carries (no copy), and a receiver reads frames only as fast as its
//! consumer takes them.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame as BodyFrame};
use http_body_util::BodyExt;
use quinn::{RecvStream, SendStream};

use crate::framing::{
    self, FrameError, Kind, MAX_DATA_BYTES, decode_frame, decode_trailers, frame_header,
};

/// Room reserved in a receive buffer before each read, beyond what the frame being read still
/// needs (`decode_frame` reserves that): small, because every stream in flight has a buffer of
/// its own (64 KiB each put 1-1.6 MiB on each proxy's peak under the 32-worker closed loop).
const READ_CHUNK: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("stream ended before the head")]
    NoHead,
    #[error("unexpected {0:?} frame")]
    Unexpected(Kind),
    #[error("QUIC stream: {0}")]
    Quic(String),
    /// The sidecar did not hand the request to its service (a `REFUSED` frame).
    #[error("the service did not get the request: {0}")]
    Refused(String),
    /// The service got the request and broke the exchange (a `FAILED` frame).
    #[error("the service failed: {0}")]
    ServiceFailed(String),
    #[error("body: {0}")]
    Body(String),
}

fn quic(e: impl std::fmt::Display) -> StreamError {
    StreamError::Quic(e.to_string())
}

/// Reads from `recv` until `buffer` holds a whole frame; `None` at a clean end of stream.
async fn next_frame(
    recv: &mut RecvStream,
    buffer: &mut BytesMut,
) -> Result<Option<framing::Frame>, StreamError> {
    std::future::poll_fn(|cx| poll_next_frame(recv, buffer, cx)).await
}

fn poll_next_frame(
    recv: &mut RecvStream,
    buffer: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<framing::Frame>, StreamError>> {
    loop {
        if let Some(frame) = decode_frame(buffer)? {
            return Poll::Ready(Ok(Some(frame)));
        }
        buffer.reserve(READ_CHUNK);
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *recv),
            cx,
            buffer
        ))
        .map_err(quic)?;
        if read == 0 {
            return Poll::Ready(if buffer.is_empty() {
                Ok(None)
            } else {
                Err(StreamError::Truncated)
            });
        }
    }
}

/// How a stream direction opens: a message head, a probe (or its answer), or a refusal.
pub enum Opening {
    /// The HEAD frame's payload and the buffer holding whatever arrived after it (the start
    /// of the body).
    Head(Bytes, BytesMut),
    /// A PING frame's payload (empty for a probe, the [`framing::Health`] in an answer).
    Ping(Bytes),
    /// A REFUSED frame's reason.
    Refused(String),
    /// A FAILED frame's reason.
    Failed(String),
}

/// Reads the frame that opens a stream direction.
pub async fn read_opening(recv: &mut RecvStream) -> Result<Opening, StreamError> {
    let mut buffer = BytesMut::new();
    match next_frame(recv, &mut buffer).await? {
        Some(frame) if frame.kind == Kind::Head => Ok(Opening::Head(frame.payload, buffer)),
        Some(frame) if frame.kind == Kind::Ping => Ok(Opening::Ping(frame.payload)),
        Some(frame) if frame.kind == Kind::Refused => Ok(Opening::Refused(
            String::from_utf8_lossy(&frame.payload).into_owned(),
        )),
        Some(frame) if frame.kind == Kind::Failed => Ok(Opening::Failed(
            String::from_utf8_lossy(&frame.payload).into_owned(),
        )),
        Some(frame) => Err(StreamError::Unexpected(frame.kind)),
        None => Err(StreamError::NoHead),
    }
}

/// Reads the HEAD frame that opens a stream direction; returns its payload and the buffer
/// holding whatever arrived after it (the start of the body). A REFUSED frame is
/// [`StreamError::Refused`].
pub async fn read_head(recv: &mut RecvStream) -> Result<(Bytes, BytesMut), StreamError> {
    match read_opening(recv).await? {
        Opening::Head(payload, rest) => Ok((payload, rest)),
        Opening::Ping(_) => Err(StreamError::Unexpected(Kind::Ping)),
        Opening::Refused(reason) => Err(StreamError::Refused(reason)),
        Opening::Failed(reason) => Err(StreamError::ServiceFailed(reason)),
    }
}

/// Writes one small frame and ends the stream direction.
async fn send_last(send: &mut SendStream, kind: Kind, payload: &[u8]) -> Result<(), StreamError> {
    let mut frame = BytesMut::with_capacity(framing::FRAME_HEADER_BYTES + payload.len());
    frame.extend_from_slice(&frame_header(kind, payload.len()));
    frame.extend_from_slice(payload);
    send.write_chunk(frame.freeze()).await.map_err(quic)?;
    send.finish().map_err(quic)
}

/// Writes a PING frame with `payload` and ends the stream direction: a probe (empty), or the
/// answer to one (the service's [`framing::Health`]).
pub async fn send_ping(send: &mut SendStream, payload: &[u8]) -> Result<(), StreamError> {
    send_last(send, Kind::Ping, payload).await
}

/// Answers a request with a REFUSED frame: its service never got it, for `reason`.
pub async fn send_refused(send: &mut SendStream, reason: &str) -> Result<(), StreamError> {
    send_reason(send, Kind::Refused, reason).await
}

/// Answers a request with a FAILED frame: its service got it and broke the exchange.
pub async fn send_failed(send: &mut SendStream, reason: &str) -> Result<(), StreamError> {
    send_reason(send, Kind::Failed, reason).await
}

async fn send_reason(send: &mut SendStream, kind: Kind, reason: &str) -> Result<(), StreamError> {
    let reason = &reason.as_bytes()[..reason.len().min(framing::MAX_HEAD_BYTES)];
    send_last(send, kind, reason).await
}

/// Writes an encoded head, then streams `body` as DATA frames and its trailers, then finishes
/// the stream. Waits for the peer to take data (QUIC flow control) before reading more.
pub async fn send_message<B>(send: &mut SendStream, head: Bytes, body: B) -> Result<(), StreamError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    send.write_chunk(head).await.map_err(quic)?;
    let mut body = std::pin::pin!(body);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| StreamError::Body(e.to_string()))?;
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    let chunk = data.split_to(data.len().min(MAX_DATA_BYTES));
                    let header = Bytes::copy_from_slice(&frame_header(Kind::Data, chunk.len()));
                    send.write_all_chunks(&mut [header, chunk])
                        .await
                        .map_err(quic)?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let mut encoded = BytesMut::new();
                    framing::encode_trailers(&trailers, &mut encoded)?;
                    send.write_chunk(encoded.freeze()).await.map_err(quic)?;
                }
            }
        }
    }
    send.finish().map_err(quic)
}

/// The body that follows a head on a receive stream: DATA frames, then optional trailers.
pub struct FramedBody {
    recv: RecvStream,
    buffer: BytesMut,
    done: bool,
}

impl FramedBody {
    /// `buffer` is what [`read_head`] left over.
    pub fn new(recv: RecvStream, buffer: BytesMut) -> Self {
        Self {
            recv,
            buffer,
            done: false,
        }
    }
}

impl Body for FramedBody {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, StreamError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        let frame = match ready!(poll_next_frame(&mut this.recv, &mut this.buffer, cx)) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Err(error) => {
                this.done = true;
                return Poll::Ready(Some(Err(error)));
            }
        };
        Poll::Ready(Some(match frame.kind {
            Kind::Data => Ok(BodyFrame::data(frame.payload)),
            Kind::Trailers => decode_trailers(&frame.payload)
                .map(BodyFrame::trailers)
                .map_err(Into::into),
            kind @ (Kind::Head | Kind::Ping | Kind::Refused | Kind::Failed) => {
                Err(StreamError::Unexpected(kind))
            }
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
