//! HTTP messages on a QUIC stream, in the frames of [`crate::framing`], streamed both ways
//! with back-pressure: a body is never held whole, a DATA frame is a 5-byte header written in
//! front of the chunk it carries (no copy), received body bytes are the chunks quinn hands
//! over (no copy either: [`Decoder`]), and a receiver reads only as fast as its consumer
//! takes what it read.

use std::{
    future::Future,
    pin::{Pin, pin},
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame as BodyFrame};
use http_body_util::BodyExt;

use crate::framing::{
    self, Decoder, FrameError, Kind, MAX_DATA_BYTES, Piece, decode_trailers, frame_header,
};
use crate::transport::{RecvStream, SendStream};

/// What went wrong reading or writing a message on a QUIC stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A frame could not be encoded, or one received was malformed or over its limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer ended the stream direction part way through a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The peer ended the stream direction before sending any frame.
    #[error("stream ended before the head")]
    NoHead,
    /// A frame of the given kind came where it has no place (DATA before the head, a second
    /// HEAD in a body, ...).
    #[error("unexpected {0:?} frame")]
    Unexpected(Kind),
    /// QUIC failed to open, read or write the stream (connection lost, stream reset, ...);
    /// holds quinn's error as text.
    #[error("QUIC stream: {0}")]
    Quic(String),
    /// The sidecar did not hand the request to its service (a `REFUSED` frame).
    #[error("the service did not get the request: {0}")]
    Refused(String),
    /// The service got the request and broke the exchange (a `FAILED` frame).
    #[error("the service failed: {0}")]
    ServiceFailed(String),
    /// A body being sent or received failed: it gave an error, broke off, or did not match its
    /// `Content-Length`; holds the reason as text.
    #[error("body: {0}")]
    Body(String),
    /// What is named (e.g. the answer to a tunnel's set-up) did not come within the duration.
    #[error("no {0} within {1:?}")]
    TimedOut(&'static str, std::time::Duration),
}

fn quic(e: impl std::fmt::Display) -> StreamError {
    StreamError::Quic(e.to_string())
}

/// Reads chunks from `recv` into `decoder` until it gives a piece; `None` at a clean end of
/// stream.
fn poll_piece(
    recv: &mut RecvStream,
    decoder: &mut Decoder,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Piece>, StreamError>> {
    loop {
        if let Some(piece) = decoder.next_piece()? {
            return Poll::Ready(Ok(Some(piece)));
        }
        // Cancel-safe: a chunk is only taken from the stream when it is returned.
        let chunk = ready!(pin!(recv.read_chunk(usize::MAX, true)).poll(cx)).map_err(quic)?;
        match chunk {
            Some(chunk) => decoder.push(chunk.bytes),
            None if decoder.at_boundary() => return Poll::Ready(Ok(None)),
            None => return Poll::Ready(Err(StreamError::Truncated)),
        }
    }
}

/// The next piece of `recv`, through `decoder`; `None` at a clean end of stream.
pub(crate) async fn next_piece(
    recv: &mut RecvStream,
    decoder: &mut Decoder,
) -> Result<Option<Piece>, StreamError> {
    std::future::poll_fn(|cx| poll_piece(recv, decoder, cx)).await
}

/// How a stream direction opens: a message head, a probe (or its answer), or a refusal.
pub enum Opening {
    /// The HEAD frame's payload and the decoder holding whatever arrived after it (the start
    /// of the body).
    Head(Bytes, Decoder),
    /// A PING frame's payload (empty for a probe, the [`framing::Health`] in an answer).
    Ping(Bytes),
    /// A REFUSED frame's reason.
    Refused(String),
    /// A FAILED frame's reason.
    Failed(String),
    /// A CHAIN frame's payload (a tunnel's set-up) and the decoder holding what followed.
    Chain(Bytes, Decoder),
    /// A READY frame's payload (the tunnel is open) and the decoder holding what followed.
    Ready(Bytes, Decoder),
}

impl Opening {
    /// The kind of frame it opened with.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Head(..) => Kind::Head,
            Self::Ping(_) => Kind::Ping,
            Self::Refused(_) => Kind::Refused,
            Self::Failed(_) => Kind::Failed,
            Self::Chain(..) => Kind::Chain,
            Self::Ready(..) => Kind::Ready,
        }
    }
}

/// Reads the frame that opens a stream direction.
pub async fn read_opening(recv: &mut RecvStream) -> Result<Opening, StreamError> {
    let mut decoder = Decoder::default();
    let piece = next_piece(recv, &mut decoder).await?;
    let reason = |payload: &Bytes| String::from_utf8_lossy(payload).into_owned();
    match piece {
        Some(Piece::Frame(frame)) => match frame.kind {
            Kind::Head => Ok(Opening::Head(frame.payload, decoder)),
            Kind::Ping => Ok(Opening::Ping(frame.payload)),
            Kind::Refused => Ok(Opening::Refused(reason(&frame.payload))),
            Kind::Failed => Ok(Opening::Failed(reason(&frame.payload))),
            Kind::Chain => Ok(Opening::Chain(frame.payload, decoder)),
            Kind::Ready => Ok(Opening::Ready(frame.payload, decoder)),
            kind @ (Kind::Data | Kind::Trailers | Kind::Datagram) => {
                Err(StreamError::Unexpected(kind))
            }
        },
        Some(Piece::Data(_)) => Err(StreamError::Unexpected(Kind::Data)),
        None => Err(StreamError::NoHead),
    }
}

/// Reads the HEAD frame that opens a stream direction; returns its payload and the decoder
/// holding whatever arrived after it (the start of the body). A REFUSED frame is
/// [`StreamError::Refused`].
pub async fn read_head(recv: &mut RecvStream) -> Result<(Bytes, Decoder), StreamError> {
    match read_opening(recv).await? {
        Opening::Head(payload, rest) => Ok((payload, rest)),
        Opening::Refused(reason) => Err(StreamError::Refused(reason)),
        Opening::Failed(reason) => Err(StreamError::ServiceFailed(reason)),
        other => Err(StreamError::Unexpected(other.kind())),
    }
}

/// Writes one small frame and ends the stream direction.
pub(crate) async fn send_last(
    send: &mut SendStream,
    kind: Kind,
    payload: &[u8],
) -> Result<(), StreamError> {
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

/// Received body pieces smaller than this are gathered, with whatever else has arrived, into
/// one piece of up to [`GATHER_UP_TO`] bytes: on a path of 1.4 KB datagrams every chunk quinn
/// hands over is about that small, and a write to the next socket per chunk would cost far
/// more than the copy. Larger pieces (loopback and jumbo-frame paths) go on as they came.
const GATHER_BELOW: usize = 16 * 1024;
const GATHER_UP_TO: usize = 64 * 1024;

/// The body that follows a head on a receive stream: DATA payloads as quinn received them
/// (small ones gathered), then optional trailers.
pub struct FramedBody {
    recv: RecvStream,
    decoder: Decoder,
    /// What was read while gathering and is given next: a piece, the end, or an error.
    next: Option<Result<Option<Piece>, StreamError>>,
    done: bool,
}

impl FramedBody {
    /// `decoder` is what [`read_head`] left over.
    pub fn new(recv: RecvStream, decoder: Decoder) -> Self {
        Self {
            recv,
            decoder,
            next: None,
            done: false,
        }
    }

    /// The stream and what its decoder holds, for a stream that stops carrying a body: an
    /// upgrade that switched it to the upgraded protocol's bytes ([`crate::sidecar`]). Only
    /// before the body was read (nothing is read ahead then).
    pub fn into_parts(self) -> (RecvStream, Decoder) {
        debug_assert!(self.next.is_none(), "a piece was read ahead");
        (self.recv, self.decoder)
    }

    /// The next piece, small DATA pieces gathered with those that have already arrived.
    fn poll_gathered(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Piece>, StreamError>> {
        let first = match self.next.take() {
            Some(read) => read?,
            None => ready!(poll_piece(&mut self.recv, &mut self.decoder, cx))?,
        };
        let Some(first) = first else {
            return Poll::Ready(Ok(None));
        };
        let small = match first {
            Piece::Data(data) if data.len() < GATHER_BELOW => data,
            other => return Poll::Ready(Ok(Some(other))),
        };
        // Only what is already here: a pending read leaves the waker registered. With
        // nothing more yet, the piece goes on as it came, neither copied nor allocated for.
        let second = match poll_piece(&mut self.recv, &mut self.decoder, cx) {
            Poll::Ready(Ok(Some(Piece::Data(data)))) if data.len() < GATHER_BELOW => data,
            Poll::Ready(other) => {
                self.next = Some(other);
                return Poll::Ready(Ok(Some(Piece::Data(small))));
            }
            Poll::Pending => return Poll::Ready(Ok(Some(Piece::Data(small)))),
        };
        let mut gathered = BytesMut::with_capacity(GATHER_UP_TO);
        gathered.extend_from_slice(&small);
        gathered.extend_from_slice(&second);
        while gathered.len() < GATHER_UP_TO {
            match poll_piece(&mut self.recv, &mut self.decoder, cx) {
                Poll::Ready(Ok(Some(Piece::Data(data)))) if data.len() < GATHER_BELOW => {
                    gathered.extend_from_slice(&data);
                }
                Poll::Ready(other) => {
                    self.next = Some(other);
                    break;
                }
                Poll::Pending => break,
            }
        }
        Poll::Ready(Ok(Some(Piece::Data(gathered.freeze()))))
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
        let piece = match ready!(this.poll_gathered(cx)) {
            Ok(Some(piece)) => piece,
            Ok(None) => {
                this.done = true;
                return Poll::Ready(None);
            }
            Err(error) => {
                this.done = true;
                return Poll::Ready(Some(Err(error)));
            }
        };
        Poll::Ready(Some(match piece {
            Piece::Data(data) => Ok(BodyFrame::data(data)),
            Piece::Frame(frame) => match frame.kind {
                Kind::Trailers => decode_trailers(&frame.payload)
                    .map(BodyFrame::trailers)
                    .map_err(Into::into),
                kind => Err(StreamError::Unexpected(kind)),
            },
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests;
