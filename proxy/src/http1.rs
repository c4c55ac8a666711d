//! HTTP/1.1 as pure functions over bytes: between a client and the ingress in [`front`], and
//! here between a sidecar and its service (RFC 9112): a
//! request head written straight from a `HEAD` frame, a response head parsed in place and
//! re-framed, and the chunked coding both ways. No `HeaderMap` is built on either side: a
//! head is parsed once (by the ingress, or by [`parse_response_head`] here) and otherwise
//! passes through as the bytes it is.
//!
//! # Rules
//! - **Request body framing** (what hyper's client does, so services see no change): a
//!   `Content-Length` from the ingress is kept and the body sent as it is; without one, a
//!   request the ingress marked `Transfer-Encoding: chunked` (it has a body of unknown
//!   length, whatever its method) and every method but `GET`, `HEAD` and `CONNECT` get a
//!   chunked one, and those three none. `TE: trailers` is added (this proxy carries
//!   trailers), and `Host` when the ingress sent none. `Transfer-Encoding`, `TE`, `Connection`
//!   and `Keep-Alive` from the ingress are dropped: they were the client's hop's, and this hop
//!   sets its own.
//! - **Upgrades**: an `Upgrade` field from the ingress (which lets it cross only when the
//!   client asked for the upgrade) is sent with `Connection: upgrade`; a `101` answer to it
//!   switches the connection to the upgraded protocol ([`crate::sidecar`]).
//! - **Response body length** (RFC 9112 section 6.3): none after `HEAD` and for 1xx, 204 and
//!   304; chunked if `Transfer-Encoding` ends in `chunked` (a `Content-Length` beside it is
//!   then removed, as RFC 9112 has intermediaries do); else `Content-Length`; else until the
//!   service closes. Conflicting or malformed lengths are errors, never guesses; so is a
//!   status under 100.
//! - **Keep-alive**: an HTTP/1.1 response keeps the connection unless it says
//!   `Connection: close`; an HTTP/1.0 one only with `Connection: keep-alive`; a body read
//!   until close never does.
//! - **What crosses back**: the status and every header field but the hop-by-hop framing
//!   fields (`Transfer-Encoding`, `Connection`, `Keep-Alive`); interim (1xx) responses other
//!   than 101 are skipped, as the ingress's client has its own.

pub mod front;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::framing::{
    FrameError, MAX_HEAD_BYTES, MAX_HEADERS, RequestHeadView, encode_response_fields,
    encode_trailer_fields,
};

/// Why HTTP/1.1 bytes could not be read or re-framed: a service's response head, a
/// `Content-Length`, or a chunked body (a service's response or a client's request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Http1Error {
    /// The service's response head does not parse (or has more than `MAX_HEADERS` fields);
    /// holds the parser's reason.
    #[error("the service's response head is malformed: {0}")]
    Head(String),
    /// The service's response head is longer than `MAX_HEAD_BYTES` bytes, or had not ended
    /// within them.
    #[error("the service's response head is over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// A `Content-Length` that is not a decimal number, or repeated values that disagree;
    /// holds the value or the disagreement.
    #[error("invalid Content-Length: {0}")]
    ContentLength(String),
    /// A chunked body breaks the coding (a bad chunk size, no CRLF after a chunk's data,
    /// malformed or oversized trailers); holds what was wrong.
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    /// A service's response head, or a chunked body's trailers, parsed but the frame encoding
    /// refused them (too many fields, a field too long, ...).
    #[error("the service's head cannot be framed: {0}")]
    Frame(#[from] FrameError),
}

/// How a request's body goes to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// No body follows the head.
    None,
    /// A body of exactly this many bytes, as `Content-Length` said.
    Length(u64),
    /// A body in the chunked coding, ended by its last (empty) chunk.
    Chunked,
}

/// How a response's body comes from the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body (after `HEAD`, and for 101, 204 and 304).
    None,
    /// A body of exactly this many bytes, as `Content-Length` said.
    Length(u64),
    /// A body in the chunked coding, ended by its last (empty) chunk.
    Chunked,
    /// A body that ends when the service closes the connection (no length given, or a
    /// transfer coding other than chunked last).
    UntilClose,
}

fn eq(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The fields that frame a message on its own hop; they never cross to the next one.
fn framing_field(name: &[u8]) -> bool {
    eq(name, b"transfer-encoding") || eq(name, b"connection") || eq(name, b"keep-alive")
}

/// The fields of a request this hop sets itself.
fn hop_field(name: &[u8]) -> bool {
    framing_field(name) || eq(name, b"te")
}

/// Parses a `Content-Length` value; repeated values (`5, 5`) must agree.
fn content_length(value: &[u8], seen: Option<u64>) -> Result<u64, Http1Error> {
    let mut length = seen;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        let parsed = (!part.is_empty() && part.len() <= 19 && part.iter().all(u8::is_ascii_digit))
            .then(|| part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
            .ok_or_else(|| Http1Error::ContentLength(String::from_utf8_lossy(value).into()))?;
        if length.is_some_and(|l| l != parsed) {
            return Err(Http1Error::ContentLength(format!(
                "{} disagrees with {}",
                parsed,
                length.unwrap_or_default()
            )));
        }
        length = Some(parsed);
    }
    length.ok_or_else(|| Http1Error::ContentLength("empty".into()))
}

/// Whether a request's fields (from the ingress) ask to switch protocols: an `Upgrade`
/// field crosses the ingress only when its client asked for the upgrade.
pub fn asks_upgrade(fields: crate::framing::Fields<'_>) -> bool {
    fields.iter().any(|(name, _)| eq(name, b"upgrade"))
}

/// Whether a request's fields make it a gRPC call (`Content-Type: application/grpc`, or
/// `application/grpc+proto` and the like), which only HTTP/2 carries.
pub fn is_grpc(fields: crate::framing::Fields<'_>) -> bool {
    fields.iter().any(|(name, value)| {
        eq(name, b"content-type")
            && value.len() >= 16
            && eq(&value[..16], b"application/grpc")
            && matches!(value.get(16), None | Some(b'+' | b';'))
    })
}

/// Whether the client spoke HTTP/2 to the ingress: the last `Via` entry (the ingress's own)
/// has received-protocol `2` ([`crate::rewrite::VIA_H2`]).
pub fn arrived_over_h2(fields: crate::framing::Fields<'_>) -> bool {
    let last = fields
        .iter()
        .filter(|(name, _)| eq(name, b"via"))
        .last()
        .and_then(|(_, value)| value.rsplit(|&b| b == b',').next());
    last.is_some_and(|entry| entry.trim_ascii().starts_with(b"2 "))
}

/// Appends the HTTP/1.1 request head for `head` to `out`; `host` is used when the ingress
/// sent no `Host`. Returns how the body must follow.
pub fn write_request_head(
    head: &RequestHeadView<'_>,
    host: &[u8],
    out: &mut BytesMut,
) -> Result<RequestBody, Http1Error> {
    out.reserve(head.method.len() + head.target.len() + 64 + head.fields.encoded_len());
    out.put_slice(head.method);
    out.put_u8(b' ');
    out.put_slice(head.target);
    out.put_slice(b" HTTP/1.1\r\n");
    let mut has_host = false;
    let mut length = None;
    let mut marked_chunked = false;
    let mut upgrade = false;
    for (name, value) in head.fields {
        if hop_field(name) {
            marked_chunked |= eq(name, b"transfer-encoding");
            continue;
        }
        if eq(name, b"content-length") {
            length = Some(content_length(value, length)?);
        }
        has_host |= eq(name, b"host");
        upgrade |= eq(name, b"upgrade");
        out.put_slice(name);
        out.put_slice(b": ");
        out.put_slice(value);
        out.put_slice(b"\r\n");
    }
    if !has_host {
        out.put_slice(b"host: ");
        out.put_slice(host);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"te: trailers\r\n");
    if upgrade {
        // The ingress lets `Upgrade` cross only when its client's `Connection` named it.
        out.put_slice(b"connection: upgrade\r\n");
    }
    let body = match length {
        Some(length) => RequestBody::Length(length),
        None if !marked_chunked && matches!(head.method, b"GET" | b"HEAD" | b"CONNECT") => {
            RequestBody::None
        }
        None => {
            out.put_slice(b"transfer-encoding: chunked\r\n");
            RequestBody::Chunked
        }
    };
    out.put_slice(b"\r\n");
    Ok(body)
}

/// A response head read off the service's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseStart {
    /// The response's status code.
    pub status: u16,
    /// Bytes of the head, to drop from the receive buffer.
    pub head_len: usize,
    /// How the response's body follows the head.
    pub body: ResponseBody,
    /// Whether the connection may carry another request once this body is read.
    pub keep_alive: bool,
}

/// What [`parse_response_head`] found at the start of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// An interim (1xx) response of this many bytes, to skip.
    Interim(usize),
    /// A final response; its `HEAD` frame was appended to the output.
    Response(ResponseStart),
}

/// Parses a response head at the start of `buffer` and, for a final response, appends the
/// `HEAD` frame carrying it to `frame`. `after_head_request` says the request was `HEAD`
/// (its response has no body whatever its headers say).
pub fn parse_response_head(
    buffer: &[u8],
    after_head_request: bool,
    frame: &mut BytesMut,
) -> Result<Parsed, Http1Error> {
    // Left uninitialised: httparse writes the fields it finds.
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buffer,
        &mut fields,
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD_BYTES => {
            return Err(Http1Error::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Http1Error::Head(format!("more than {MAX_HEADERS} fields")));
        }
        Err(error) => return Err(Http1Error::Head(error.to_string())),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(Http1Error::HeadTooLarge);
    }
    let status = response.code.unwrap_or_default();
    // httparse takes any three digits; the frame carries 100 to 999 (found by the
    // http_upstream fuzz target: a 0xx status made a frame the ingress refused).
    if status < 100 {
        return Err(Http1Error::Head(format!(
            "{status:03} is not a status code"
        )));
    }
    if (100..200).contains(&status) && status != 101 {
        return Ok(Parsed::Interim(head_len));
    }
    let http10 = response.version == Some(0);
    let (mut chunked, mut coded, mut length) = (false, false, None);
    let (mut close, mut keep_alive_asked) = (false, false);
    for field in response.headers.iter() {
        let (name, value) = (field.name.as_bytes(), field.value);
        if eq(name, b"transfer-encoding") {
            coded = true;
            // Only the last coding decides whether the body is chunked.
            chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| eq(last.trim_ascii(), b"chunked"));
        } else if eq(name, b"content-length") {
            length = Some(content_length(value, length)?);
        } else if eq(name, b"connection") {
            for option in value.split(|&b| b == b',') {
                close |= eq(option.trim_ascii(), b"close");
                keep_alive_asked |= eq(option.trim_ascii(), b"keep-alive");
            }
        }
    }
    let body = if after_head_request || matches!(status, 101 | 204 | 304) {
        ResponseBody::None
    } else if coded {
        if chunked {
            ResponseBody::Chunked
        } else {
            ResponseBody::UntilClose
        }
    } else if let Some(length) = length {
        ResponseBody::Length(length)
    } else {
        ResponseBody::UntilClose
    };
    let keep_alive = !close
        && (!http10 || keep_alive_asked)
        && body != ResponseBody::UntilClose
        && status != 101;
    // With a Transfer-Encoding, a Content-Length is not this body's length: RFC 9112
    // section 6.3 has an intermediary remove it (it crossed with a chunked body, and the
    // client was told a length the body did not have; found by the http_upstream fuzz target).
    let crossing = response
        .headers
        .iter()
        .map(|field| (field.name.as_bytes(), field.value))
        .filter(|(name, _)| !(framing_field(name) || coded && eq(name, b"content-length")));
    encode_response_fields(status, crossing, frame)?;
    Ok(Parsed::Response(ResponseStart {
        status,
        head_len,
        body,
        keep_alive,
    }))
}

/// The line that opens a chunk of `len` bytes: its size in hex and CRLF.
pub fn chunk_size_line(len: usize) -> ([u8; 18], usize) {
    let mut line = [0u8; 18];
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, slot) in line[..digits].iter_mut().enumerate() {
        let nibble = (len >> (4 * (digits - 1 - i))) & 0xf;
        *slot = b"0123456789abcdef"[nibble];
    }
    line[digits..digits + 2].copy_from_slice(b"\r\n");
    (line, digits + 2)
}

/// What a body decoder took off the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Body bytes, sharing the buffer's memory.
    Data(Bytes),
    /// The trailers, as a `TRAILERS` frame ready to send.
    Trailers(Bytes),
    /// The body is complete.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Longest chunk-size line (size and extensions) accepted.
const MAX_SIZE_LINE: usize = 4096;

/// Decodes a chunked body (RFC 9112 section 7.1) as its bytes arrive, without copying data.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: ChunkState::Size,
        }
    }
}

impl ChunkedDecoder {
    /// The next piece of the body from `buffer` (data of at most `max` bytes), or `None` if
    /// more bytes are needed.
    pub fn decode(
        &mut self,
        buffer: &mut BytesMut,
        max: usize,
    ) -> Result<Option<Piece>, Http1Error> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = buffer.iter().position(|&b| b == b'\n') else {
                        if buffer.len() > MAX_SIZE_LINE {
                            return Err(Http1Error::Chunked("chunk-size line too long"));
                        }
                        return Ok(None);
                    };
                    let line = &buffer[..end];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let digits = line
                        .split(|&b| b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    if digits.is_empty() || digits.len() > 15 {
                        return Err(Http1Error::Chunked("bad chunk size"));
                    }
                    let mut size = 0u64;
                    for &d in digits {
                        let value = (d as char)
                            .to_digit(16)
                            .ok_or(Http1Error::Chunked("bad chunk size"))?;
                        size = size * 16 + u64::from(value);
                    }
                    buffer.advance(end + 1);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buffer.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(buffer.len())
                        .min(max);
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Some(Piece::Data(buffer.split_to(take).freeze())));
                }
                ChunkState::DataEnd => {
                    if buffer.len() < 2 && buffer.first() != Some(&b'\n') {
                        return Ok(None);
                    }
                    match &buffer[..] {
                        [b'\r', b'\n', ..] => buffer.advance(2),
                        [b'\n', ..] => buffer.advance(1),
                        _ => return Err(Http1Error::Chunked("no CRLF after chunk data")),
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buffer.starts_with(b"\r\n") || buffer.starts_with(b"\n") {
                        buffer.advance(if buffer[0] == b'\r' { 2 } else { 1 });
                        self.state = ChunkState::Done;
                        return Ok(Some(Piece::End));
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buffer, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut frame = BytesMut::new();
                            encode_trailer_fields(
                                fields.iter().map(|f| (f.name.as_bytes(), f.value)),
                                &mut frame,
                            )?;
                            buffer.advance(len);
                            self.state = ChunkState::Done;
                            return Ok(Some(Piece::Trailers(frame.freeze())));
                        }
                        Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD_BYTES => {
                            return Err(Http1Error::Chunked("trailers too large"));
                        }
                        Ok(httparse::Status::Partial) => return Ok(None),
                        Err(_) => return Err(Http1Error::Chunked("malformed trailers")),
                    }
                }
                ChunkState::Done => return Ok(Some(Piece::End)),
            }
        }
    }

    /// Whether the whole body, trailers included, has been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

#[cfg(test)]
mod tests;
