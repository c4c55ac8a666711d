//! How a request and its response cross between two proxies on one QUIC bidirectional stream.
//!
//! Each direction is a sequence of frames, `kind: u8 | length: u32 big-endian | payload`:
//!
//! | kind | payload |
//! |---|---|
//! | `HEAD` (1) | request: `version 1 | method (u8 length) | target (u16 length) | headers`; response: `version 1 | status u16 | headers` |
//! | `DATA` (2) | body bytes, as they came |
//! | `TRAILERS` (3) | `headers` |
//! | `PING` (4) | a probe: empty; its answer: `health: u8` (0 serving, 1 down) |
//! | `REFUSED` (5) | why, UTF-8: the sidecar could not hand the request to its service |
//! | `FAILED` (6) | why, UTF-8: the service took the request and broke the exchange before a response |
//! | `CHAIN` (7) | a layer-4 tunnel's set-up: the chain ([`crate::l4::chain`]) |
//! | `READY` (8) | its answer: the tunnel is open, with the reverse chain, UTF-8 |
//! | `DATAGRAM` (9) | one UDP datagram, whole (at most [`MAX_DATAGRAM_BYTES`]) |
//!
//! `headers` is `count: u16` then per field `name (u16 length) | value (u16 length)`. A
//! direction is one `HEAD`, any number of `DATA`, at most one `TRAILERS`, then the end of the
//! stream (QUIC FIN). The target is the path and query the sidecar sends to its service (the
//! ingress already removed the `/<service>` segment).
//!
//! A stream that opens with `PING` instead of `HEAD` is a probe: the sidecar answers with one
//! `PING` saying whether its service answers ([`Health`]) and ends the stream, so the ingress
//! measures the round trip to the instance's proxy without troubling its service. An empty
//! answer (a sidecar older than the health byte) means serving.
//!
//! A response direction that opens with `REFUSED` instead of `HEAD` says the service never
//! saw the request (it refused the connection, or the sidecar knows it is down): the ingress
//! may send the request elsewhere whatever its method, and counts the failure against the
//! instance, never as an answer of its service. One that opens with `FAILED` says the service
//! got the request (it may have acted on it) and then closed or reset the exchange without a
//! response: the ingress may send it elsewhere only if it is idempotent. Neither is ever
//! dressed up as a response of the service (a fast 502 would make a dead instance look best).
//!
//! A stream that opens with `CHAIN` is a layer-4 tunnel ([`crate::l4`]): answered with
//! `READY`, or `REFUSED`/`FAILED` as a request is, then bytes both ways as `DATA` and
//! datagrams as `DATAGRAM` frames.
//!
//! A request whose head carries an `Upgrade` field is an upgrade ([`crate::upgrade`]): the
//! ingress sends its `HEAD` and leaves its direction open. A `101` response `HEAD` switches
//! the stream: from then on each direction is the upgraded protocol's bytes as `DATA` frames,
//! ended by its FIN (either side may end first). Any other response is an ordinary one, and
//! the ingress then ends its direction with no body.
//!
//! Body bytes are never copied into frames: a `DATA` frame is its 5-byte header written
//! before the chunk hyper handed over. Decoding splits frames off the receive buffer without
//! copying either. Limits ([`MAX_HEAD_BYTES`], [`MAX_HEADERS`], [`MAX_DATA_BYTES`]) are
//! checked from the length prefix, before anything is buffered.

mod decoder;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

pub use decoder::{Decoder, Piece, parse_header};

/// Version byte that opens every `HEAD` payload; a head of another version is refused
/// ([`FrameError::Version`]).
pub const VERSION: u8 = 1;
/// Largest encoded head or trailers frame.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one head or trailers frame.
pub const MAX_HEADERS: usize = 256;
/// Largest DATA frame a sender writes and a receiver accepts.
pub const MAX_DATA_BYTES: usize = 1 << 20;
/// Largest UDP datagram a tunnel carries (the largest IPv4 UDP payload).
pub const MAX_DATAGRAM_BYTES: usize = 65507;
/// Bytes before every frame's payload.
pub const FRAME_HEADER_BYTES: usize = 5;

/// The kind byte that opens every frame; the table in the module doc gives each payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request or response head: method and target, or status, then header fields.
    Head = 1,
    /// Body bytes, or a tunnel's bytes, as they came.
    Data = 2,
    /// The trailer fields that close a body.
    Trailers = 3,
    /// A probe (empty payload) or its answer (the service's [`Health`]).
    Ping = 4,
    /// The sidecar could not hand the request to its service; the payload says why, in UTF-8.
    Refused = 5,
    /// The service took the request and broke the exchange before a response; the payload says
    /// why, in UTF-8.
    Failed = 6,
    /// Opens a layer-4 tunnel; the payload is the chain of hops.
    Chain = 7,
    /// Answers `CHAIN`: the tunnel is open; the payload is the reverse chain, in UTF-8.
    Ready = 8,
    /// One whole UDP datagram of a tunnel, at most [`MAX_DATAGRAM_BYTES`].
    Datagram = 9,
}

/// What a sidecar says of its service in a probe's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The service answers (or the sidecar has no reason to think otherwise).
    Serving = 0,
    /// The service refuses connections or failed its liveness check.
    Down = 1,
}

impl Health {
    /// The payload of a probe's answer.
    pub fn encode(self) -> [u8; 1] {
        [self as u8]
    }

    /// Reads a probe answer's payload; anything but "down" is serving, so that an older
    /// sidecar's empty answer keeps its instance in use.
    pub fn decode(payload: &[u8]) -> Self {
        match payload.first() {
            Some(1) => Self::Down,
            _ => Self::Serving,
        }
    }
}

/// One frame split off the receive buffer; the payload shares the buffer's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame carries.
    pub kind: Kind,
    /// The bytes after the 5-byte header, `length` of them.
    pub payload: Bytes,
}

/// Why a frame could not be encoded, or what was wrong with one received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame header's kind byte (given) is none of the kinds of [`Kind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame, or a part of one, is longer than its limit: a received length prefix over the
    /// limit of its kind, or, when encoding, a head or trailers over [`MAX_HEAD_BYTES`], a
    /// method, target, name or value too long for its length field.
    #[error("{kind:?} frame of {len} bytes is over the limit of {limit}")]
    TooLarge {
        /// The kind of the frame (`Head` for a field of a head or trailers).
        kind: Kind,
        /// Its length, in bytes.
        len: usize,
        /// The most bytes allowed.
        limit: usize,
    },
    /// A `HEAD` payload opens with a version (given) other than [`VERSION`].
    #[error("head version {0} is not supported (this proxy speaks {VERSION})")]
    Version(u8),
    /// A payload ends before the part named (`"method"`, `"header value"`, ...) is whole.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A head or trailers frame has more than [`MAX_HEADERS`] fields.
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// A part of a head or trailers is malformed: a method or name that is not a token, a
    /// target not starting with `/`, a status out of range, bytes left after the fields, ...
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// The part at fault (`"method"`, `"target"`, `"header name"`, `"status"`, ...).
        what: &'static str,
        /// What is wrong with it, for a person to read.
        detail: String,
    },
}

/// The head of a request between proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The request method.
    pub method: Method,
    /// Path and query for the service, starting with `/`.
    pub target: String,
    /// The request's header fields; a name may repeat.
    pub headers: HeaderMap,
}

/// The head of a response between proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The service's status code.
    pub status: StatusCode,
    /// The response's header fields; a name may repeat.
    pub headers: HeaderMap,
}

/// The 5 bytes that precede a payload of `len` bytes.
pub fn frame_header(kind: Kind, len: usize) -> [u8; FRAME_HEADER_BYTES] {
    let len = u32::try_from(len).expect("frames are far below 4 GiB");
    let mut header = [kind as u8, 0, 0, 0, 0];
    header[1..].copy_from_slice(&len.to_be_bytes());
    header
}

/// Writes `fields` as `count | (name, value)*`, the count patched in afterwards; more than
/// [`MAX_HEADERS`] fields, or a name or value over 64 KiB, is refused.
fn put_fields<'a>(
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let start = out.len();
    out.put_u16(0);
    let mut count = 0usize;
    for (name, value) in fields {
        count += 1;
        if count > MAX_HEADERS {
            return Err(FrameError::TooManyHeaders);
        }
        let too_long = |len: usize| FrameError::TooLarge {
            kind: Kind::Head,
            len,
            limit: usize::from(u16::MAX),
        };
        out.put_u16(u16::try_from(name.len()).map_err(|_| too_long(name.len()))?);
        out.put_slice(name);
        out.put_u16(u16::try_from(value.len()).map_err(|_| too_long(value.len()))?);
        out.put_slice(value);
    }
    out[start..start + 2].copy_from_slice(&(count as u16).to_be_bytes());
    Ok(())
}

/// A `HeaderMap`'s fields as bytes.
fn map_fields(headers: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
}

/// Encodes a frame whose payload is written by `write`, patching its length in afterwards; on
/// any error nothing is left in `out`.
fn framed(
    kind: Kind,
    out: &mut BytesMut,
    write: impl FnOnce(&mut BytesMut) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    let start = out.len();
    out.put_slice(&frame_header(kind, 0));
    if let Err(error) = write(out) {
        out.truncate(start);
        return Err(error);
    }
    let len = out.len() - start - FRAME_HEADER_BYTES;
    if len > MAX_HEAD_BYTES {
        out.truncate(start);
        return Err(FrameError::TooLarge {
            kind,
            len,
            limit: MAX_HEAD_BYTES,
        });
    }
    out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&frame_header(kind, len));
    Ok(())
}

/// Appends a request `HEAD` frame to `out`.
pub fn encode_request_head(head: &RequestHead, out: &mut BytesMut) -> Result<(), FrameError> {
    let method = head.method.as_str();
    if method.len() > usize::from(u8::MAX) || head.target.len() > usize::from(u16::MAX) {
        return Err(FrameError::TooLarge {
            kind: Kind::Head,
            len: head.target.len(),
            limit: MAX_HEAD_BYTES,
        });
    }
    framed(Kind::Head, out, |out| {
        out.put_u8(VERSION);
        out.put_u8(method.len() as u8);
        out.put_slice(method.as_bytes());
        out.put_u16(head.target.len() as u16);
        out.put_slice(head.target.as_bytes());
        put_fields(map_fields(&head.headers), out)
    })
}

/// Appends a request `HEAD` frame made of bytes, as the ingress reads them off a client's
/// request (no `HeaderMap` in between): the target is the concatenation of `target`'s parts.
pub fn encode_request_fields<'a>(
    method: &[u8],
    target: &[&[u8]],
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let target_len: usize = target.iter().map(|part| part.len()).sum();
    if method.len() > usize::from(u8::MAX) || target_len > usize::from(u16::MAX) {
        return Err(FrameError::TooLarge {
            kind: Kind::Head,
            len: method.len().max(target_len),
            limit: usize::from(u16::MAX),
        });
    }
    framed(Kind::Head, out, |out| {
        out.put_u8(VERSION);
        out.put_u8(method.len() as u8);
        out.put_slice(method);
        out.put_u16(target_len as u16);
        for part in target {
            out.put_slice(part);
        }
        put_fields(fields, out)
    })
}

/// Appends a response `HEAD` frame to `out`.
pub fn encode_response_head(head: &ResponseHead, out: &mut BytesMut) -> Result<(), FrameError> {
    encode_response_fields(head.status.as_u16(), map_fields(&head.headers), out)
}

/// Appends a response `HEAD` frame made of a status and header fields as bytes, as a sidecar
/// reads them off its service's response (no `HeaderMap` in between).
pub fn encode_response_fields<'a>(
    status: u16,
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    framed(Kind::Head, out, |out| {
        out.put_u8(VERSION);
        out.put_u16(status);
        put_fields(fields, out)
    })
}

/// Appends a `TRAILERS` frame to `out`.
pub fn encode_trailers(trailers: &HeaderMap, out: &mut BytesMut) -> Result<(), FrameError> {
    encode_trailer_fields(map_fields(trailers), out)
}

/// Appends a `TRAILERS` frame made of header fields as bytes.
pub fn encode_trailer_fields<'a>(
    fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    framed(Kind::Trailers, out, |out| put_fields(fields, out))
}

/// Splits the next complete frame off `buffer`, or returns `None` if more bytes are needed.
/// Lengths over the limits are refused as soon as the 5-byte header is there.
pub fn decode_frame(buffer: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buffer.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let (kind, len) = parse_header(buffer)?;
    if buffer.len() < FRAME_HEADER_BYTES + len {
        buffer.reserve(FRAME_HEADER_BYTES + len - buffer.len());
        return Ok(None);
    }
    buffer.advance(FRAME_HEADER_BYTES);
    Ok(Some(Frame {
        kind,
        payload: buffer.split_to(len).freeze(),
    }))
}

fn take<'a>(payload: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
    if payload.len() < n {
        return Err(FrameError::Truncated(what));
    }
    let (taken, rest) = payload.split_at(n);
    *payload = rest;
    Ok(taken)
}

fn take_u16(payload: &mut &[u8], what: &'static str) -> Result<usize, FrameError> {
    let bytes = take(payload, 2, what)?;
    Ok(usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
}

/// Which bytes may be in a method or a header name (RFC 9110 section 5.6.2, `tchar`).
const TOKEN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    table
};

fn is_token(b: u8) -> bool {
    TOKEN[usize::from(b)]
}

/// Whether `b` may be in a header value: visible ASCII, space, tab and obs-text, never CR, LF
/// or NUL (what `http::HeaderValue` accepts).
fn is_value_byte(b: u8) -> bool {
    (b >= 0x20 && b != 0x7f) || b == b'\t'
}

fn invalid(what: &'static str, detail: impl Into<String>) -> FrameError {
    FrameError::Invalid {
        what,
        detail: detail.into(),
    }
}

/// Header fields as they lie in a frame's payload, checked once and borrowed: a sidecar
/// writes them to its service as they are, without building a `HeaderMap`.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    bytes: &'a [u8],
    count: usize,
}

impl<'a> Fields<'a> {
    /// How many fields there are.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the fields in the frame: their names and values plus 4 per field, which is
    /// also what they take as HTTP/1.1 lines (`name: value\r\n`).
    pub fn encoded_len(&self) -> usize {
        self.bytes.len()
    }

    /// The `(name, value)` pairs, in the order of the frame.
    pub fn iter(&self) -> FieldIter<'a> {
        FieldIter {
            rest: self.bytes,
            left: self.count,
        }
    }
}

impl<'a> IntoIterator for Fields<'a> {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = FieldIter<'a>;

    fn into_iter(self) -> FieldIter<'a> {
        self.iter()
    }
}

/// The `(name, value)` pairs of [`Fields`], in order.
pub struct FieldIter<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Iterator for FieldIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The layout was checked when the fields were taken off the payload.
        let mut split = || {
            let len = usize::from(u16::from_be_bytes([self.rest[0], self.rest[1]]));
            let (taken, rest) = self.rest[2..].split_at(len);
            self.rest = rest;
            taken
        };
        let name = split();
        Some((name, split()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

/// Takes the rest of a payload as header fields, checking the layout and every name and
/// value.
fn take_fields<'a>(payload: &mut &'a [u8]) -> Result<Fields<'a>, FrameError> {
    let count = take_u16(payload, "header count")?;
    if count > MAX_HEADERS {
        return Err(FrameError::TooManyHeaders);
    }
    let start = *payload;
    for _ in 0..count {
        let len = take_u16(payload, "header name")?;
        let name = take(payload, len, "header name")?;
        if name.is_empty() || !name.iter().copied().all(is_token) {
            return Err(invalid(
                "header name",
                format!("'{}' is not a token", String::from_utf8_lossy(name)),
            ));
        }
        let len = take_u16(payload, "header value")?;
        let value = take(payload, len, "header value")?;
        if !value.iter().copied().all(is_value_byte) {
            return Err(invalid(
                "header value",
                format!(
                    "the value of '{}' holds a control character",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
    }
    if !payload.is_empty() {
        return Err(invalid(
            "head",
            format!("{} bytes after the headers", payload.len()),
        ));
    }
    Ok(Fields {
        bytes: start,
        count,
    })
}

fn fields_to_map(fields: Fields<'_>) -> Result<HeaderMap, FrameError> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        let name =
            HeaderName::from_bytes(name).map_err(|e| invalid("header name", e.to_string()))?;
        let value =
            HeaderValue::from_bytes(value).map_err(|e| invalid("header value", e.to_string()))?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn take_version(payload: &mut &[u8]) -> Result<(), FrameError> {
    match take(payload, 1, "version")?[0] {
        VERSION => Ok(()),
        other => Err(FrameError::Version(other)),
    }
}

/// A request head as it lies in a `HEAD` frame's payload, checked and borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RequestHeadView<'a> {
    /// A token (RFC 9110 section 9.1).
    pub method: &'a [u8],
    /// Starts with `/`; no spaces or control characters.
    pub target: &'a [u8],
    /// The header fields, each name a token and each value free of CR, LF and NUL.
    pub fields: Fields<'a>,
}

/// Reads a request head off a `HEAD` frame's payload without copying it.
pub fn view_request_head(mut payload: &[u8]) -> Result<RequestHeadView<'_>, FrameError> {
    let payload = &mut payload;
    take_version(payload)?;
    let len = usize::from(take(payload, 1, "method")?[0]);
    let method = take(payload, len, "method")?;
    if method.is_empty() || !method.iter().copied().all(is_token) {
        return Err(invalid(
            "method",
            format!("'{}' is not a token", String::from_utf8_lossy(method)),
        ));
    }
    let len = take_u16(payload, "target")?;
    let target = take(payload, len, "target")?;
    if target.first() != Some(&b'/') {
        return Err(invalid(
            "target",
            format!(
                "'{}' does not start with /",
                String::from_utf8_lossy(target)
            ),
        ));
    }
    if target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return Err(invalid("target", "holds a space or a control character"));
    }
    Ok(RequestHeadView {
        method,
        target,
        fields: take_fields(payload)?,
    })
}

/// Reads a request head off a `HEAD` frame's payload into owned values.
pub fn decode_request_head(payload: &[u8]) -> Result<RequestHead, FrameError> {
    let view = view_request_head(payload)?;
    let method = Method::from_bytes(view.method).map_err(|e| invalid("method", e.to_string()))?;
    let target = std::str::from_utf8(view.target)
        .map_err(|e| invalid("target", e.to_string()))?
        .to_owned();
    Ok(RequestHead {
        method,
        target,
        headers: fields_to_map(view.fields)?,
    })
}

/// Reads a response head off a `HEAD` frame's payload without copying it: the status and the
/// fields.
pub fn view_response_head(mut payload: &[u8]) -> Result<(u16, Fields<'_>), FrameError> {
    let payload = &mut payload;
    take_version(payload)?;
    let status = take_u16(payload, "status")?;
    if !(100..=999).contains(&status) {
        return Err(invalid("status", format!("{status} is not a status code")));
    }
    Ok((status as u16, take_fields(payload)?))
}

/// Reads a response head off a `HEAD` frame's payload into owned values.
pub fn decode_response_head(mut payload: &[u8]) -> Result<ResponseHead, FrameError> {
    let payload = &mut payload;
    take_version(payload)?;
    let status = StatusCode::from_u16(take_u16(payload, "status")? as u16).map_err(|e| {
        FrameError::Invalid {
            what: "status",
            detail: e.to_string(),
        }
    })?;
    Ok(ResponseHead {
        status,
        headers: fields_to_map(take_fields(payload)?)?,
    })
}

/// Reads the fields of a `TRAILERS` frame's payload.
pub fn decode_trailers(mut payload: &[u8]) -> Result<HeaderMap, FrameError> {
    fields_to_map(take_fields(&mut payload)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RequestHead {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-many", HeaderValue::from_static("1"));
        headers.append("x-many", HeaderValue::from_static("2"));
        headers.insert("x-binary", HeaderValue::from_bytes(b"\xfe\xff ok").unwrap());
        RequestHead {
            method: Method::from_bytes(b"PROPFIND").unwrap(),
            target: "/a/b?c=d&e".into(),
            headers,
        }
    }

    #[test]
    fn heads_data_and_trailers_round_trip_across_arbitrary_splits() {
        let mut wire = BytesMut::new();
        encode_request_head(&request(), &mut wire).unwrap();
        wire.put_slice(&frame_header(Kind::Data, 3));
        wire.put_slice(b"abc");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        encode_trailers(&trailers, &mut wire).unwrap();
        let wire = wire.freeze();
        // Whatever chunks the bytes arrive in, the same frames come out.
        for chunk in [1, 2, 5, 7, wire.len()] {
            let mut buffer = BytesMut::new();
            let mut frames = Vec::new();
            for piece in wire.chunks(chunk) {
                buffer.put_slice(piece);
                while let Some(frame) = decode_frame(&mut buffer).unwrap() {
                    frames.push(frame);
                }
            }
            assert_eq!(frames.len(), 3, "chunk {chunk}");
            assert_eq!(decode_request_head(&frames[0].payload).unwrap(), request());
            assert_eq!(
                (frames[1].kind, &frames[1].payload[..]),
                (Kind::Data, &b"abc"[..])
            );
            assert_eq!(decode_trailers(&frames[2].payload).unwrap(), trailers);
        }
    }

    #[test]
    fn response_heads_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert("server", HeaderValue::from_static("hello"));
        let head = ResponseHead {
            status: StatusCode::IM_A_TEAPOT,
            headers,
        };
        let mut wire = BytesMut::new();
        encode_response_head(&head, &mut wire).unwrap();
        let frame = decode_frame(&mut wire).unwrap().unwrap();
        assert_eq!(decode_response_head(&frame.payload).unwrap(), head);
        assert!(wire.is_empty());
    }

    #[test]
    fn limits_are_checked_from_the_length_prefix() {
        let mut buffer = BytesMut::from(&frame_header(Kind::Head, MAX_HEAD_BYTES + 1)[..]);
        assert!(matches!(
            decode_frame(&mut buffer),
            Err(FrameError::TooLarge {
                kind: Kind::Head,
                ..
            })
        ));
        let mut buffer = BytesMut::from(&frame_header(Kind::Data, MAX_DATA_BYTES + 1)[..]);
        assert!(matches!(
            decode_frame(&mut buffer),
            Err(FrameError::TooLarge {
                kind: Kind::Data,
                ..
            })
        ));
        let mut buffer = BytesMut::from(&[10u8, 0, 0, 0, 0][..]);
        assert_eq!(decode_frame(&mut buffer), Err(FrameError::UnknownKind(10)));
        let mut head = request();
        head.headers.insert(
            "x-huge",
            HeaderValue::from_bytes(&vec![b'a'; 65_000]).unwrap(),
        );
        head.headers.insert(
            "x-huge-2",
            HeaderValue::from_bytes(&vec![b'a'; 65_000]).unwrap(),
        );
        let mut out = BytesMut::new();
        assert!(matches!(
            encode_request_head(&head, &mut out),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(out.is_empty(), "a refused frame leaves nothing behind");
    }

    #[test]
    fn malformed_heads_are_errors_not_panics() {
        let mut wire = BytesMut::new();
        encode_request_head(&request(), &mut wire).unwrap();
        let payload = decode_frame(&mut wire).unwrap().unwrap().payload;
        for cut in 0..payload.len() {
            assert!(
                decode_request_head(&payload[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut wrong_version = payload.to_vec();
        wrong_version[0] = 7;
        assert_eq!(
            decode_request_head(&wrong_version),
            Err(FrameError::Version(7))
        );
        let no_slash = [1, 3, b'G', b'E', b'T', 0, 1, b'x', 0, 0];
        assert!(matches!(
            decode_request_head(&no_slash),
            Err(FrameError::Invalid { what: "target", .. })
        ));
        let bad_name = [
            1, 3, b'G', b'E', b'T', 0, 1, b'/', 0, 1, 0, 2, b'a', b' ', 0, 0,
        ];
        assert!(matches!(
            decode_request_head(&bad_name),
            Err(FrameError::Invalid {
                what: "header name",
                ..
            })
        ));
        let bad_status = [1, 0x03, 0xe8, 0, 0];
        assert!(matches!(
            decode_response_head(&bad_status),
            Err(FrameError::Invalid { what: "status", .. })
        ));
    }
}
