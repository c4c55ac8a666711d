//! HTTP/1.1 between a client and the ingress (RFC 9112), as pure functions over bytes: a
//! client's request head parsed once, in place, and written straight into the `HEAD` frame
//! that crosses to the instance, rewritten on the way; and a response `HEAD` frame written
//! back as an HTTP/1.1 head. No `HeaderMap` is built: what [`crate::rewrite`] does to a
//! `HeaderMap` for HTTP/2 clients is done here to the bytes, with the same rules.
//!
//! # Rules
//! - **Target**: `/<service>/<rest>?<query>` names the service; the frame carries
//!   `/<rest>?<query>`. A name the lookup would refuse, or none, is the client's error,
//!   answered 400 here and never sent to the lookup.
//! - **Request fields**: every field crosses but the hop-by-hop ones (`Connection` and the
//!   fields it names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`)
//!   and `Proxy-Authorization`, except that an upgrade's `Upgrade` crosses (below); `Via` gets this proxy, `X-Forwarded-For` the client's address
//!   after the first value the client sent, if any. `Content-Length` crosses: the sidecar
//!   sends a body of that length, or chunks one without it.
//! - **Request body**: `Transfer-Encoding` whose last coding is `chunked` (any other is 501),
//!   else `Content-Length`, else none. A request with both is refused (400): a proxy that
//!   picks one while the next hop picks the other is how requests are smuggled.
//! - **Keep-alive**: HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with
//!   `Connection: keep-alive`.
//! - **Upgrades** ([`crate::upgrade`]): an HTTP/1.1 request without a body whose
//!   `Connection` names `upgrade` and that has an `Upgrade` field asks to switch protocols;
//!   its `Upgrade` crosses. A `101` answer to it is written with the service's `Upgrade` and
//!   `Connection: upgrade`, and the connection then carries the upgraded protocol; any other
//!   answer is an ordinary response.
//! - **Response**: the status line, every field but the hop-by-hop ones, `Via`; the body by
//!   `Content-Length` when the instance sent one, none after `HEAD` and for 1xx, 204 and 304,
//!   else chunked to an HTTP/1.1 client (trailers only if it said `TE: trailers`) and until
//!   close to an HTTP/1.0 one. `Connection: close` when the connection ends after it.

use std::{io::Write as _, mem::MaybeUninit, net::IpAddr};

use bytes::{BufMut, BytesMut};

use super::{RequestBody, content_length, eq};
use crate::{
    framing::{FrameError, MAX_HEADERS, encode_request_fields, view_response_head},
    rewrite::{HOP_BY_HOP, RouteError, VIA, split_service},
};

/// Why a client's request head is refused; each kind has its status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrontError {
    /// The head does not parse as an HTTP/1.x request (400); holds the parser's reason.
    #[error("malformed request head: {0}")]
    Malformed(String),
    /// The head is longer than the limit it holds, in bytes (`--max-head-bytes`; 431).
    #[error("the request head is over {0} bytes")]
    HeadTooLarge(usize),
    /// The target names no service, or not a valid one (400).
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A `Content-Length` that is not a decimal number, or repeated values that disagree
    /// (400); holds the field's value.
    #[error("invalid Content-Length: {0}")]
    ContentLength(String),
    /// The request has both `Content-Length` and `Transfer-Encoding` (400).
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndCoding,
    /// `Transfer-Encoding` does not end in `chunked` (501); holds the field's value.
    #[error("transfer coding '{0}' is not supported")]
    Coding(String),
    /// The head cannot be put in a frame: too many fields or a part too long (431), or a
    /// part the frame encoding refuses (400).
    #[error("the request head cannot be framed: {0}")]
    Frame(#[from] FrameError),
}

impl FrontError {
    /// The status the client is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge(_) | Self::Frame(FrameError::TooManyHeaders) => 431,
            Self::Frame(FrameError::TooLarge { .. }) => 431,
            Self::Coding(_) => 501,
            _ => 400,
        }
    }
}

/// A client's request head, read off its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestStart<'a> {
    /// The request's method, as the client wrote it.
    pub method: &'a [u8],
    /// The service the target names (its first path segment).
    pub service: &'a str,
    /// Bytes of the head, to drop from the receive buffer.
    pub head_len: usize,
    /// How the request's body follows the head on the client's connection.
    pub body: RequestBody,
    /// The client may send another request on the connection after this one.
    pub keep_alive: bool,
    /// HTTP/1.0: a response without a length is delimited by closing the connection.
    pub http10: bool,
    /// `Expect: 100-continue`: the client waits for `100 Continue` before its body.
    pub expect_continue: bool,
    /// `TE: trailers`: the client takes trailers in a chunked response.
    pub trailers: bool,
    /// The client asks to switch protocols (`Connection: upgrade` and an `Upgrade` field, no
    /// body): its `Upgrade` crossed in the frame ([`crate::upgrade`]).
    pub upgrade: bool,
}

impl RequestStart<'_> {
    /// What of this request decides how its response is framed.
    pub fn response_context(&self) -> ResponseContext {
        ResponseContext {
            head_request: self.method == b"HEAD",
            http10: self.http10,
            keep_alive: self.keep_alive,
            trailers: self.trailers,
            upgrade: self.upgrade,
        }
    }
}

/// What of a request decides how its response is framed (see [`RequestStart`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseContext {
    /// The request was `HEAD`: its response has no body whatever its fields say.
    pub head_request: bool,
    /// The client speaks HTTP/1.0: no chunked coding, a body without a length ends with the
    /// connection.
    pub http10: bool,
    /// The client may send another request on the connection after this one.
    pub keep_alive: bool,
    /// The client said `TE: trailers`: a chunked response may carry trailers.
    pub trailers: bool,
    /// The client asked to switch protocols: a `101` answer switches the connection.
    pub upgrade: bool,
}

/// What [`parse_request_head`] found at the start of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParsedRequest<'a> {
    /// More bytes are needed.
    Partial,
    /// A request; its `HEAD` frame was appended to the output.
    Request(RequestStart<'a>),
}

/// Whether `name` never crosses a proxy ([`HOP_BY_HOP`]; those `Connection` names aside).
fn hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|hop| eq(name, hop.as_bytes()))
}

/// Whether a `Connection` field among `fields` names `option` (a field name, `close` or
/// `keep-alive`).
fn connection_names<'a>(
    mut fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    option: &[u8],
) -> bool {
    fields.any(|(name, value)| {
        eq(name, b"connection")
            && value
                .split(|&b| b == b',')
                .any(|named| eq(named.trim_ascii(), option))
    })
}

/// A client's fields as `(name, value)` pairs.
fn pairs<'a>(fields: &'a [httparse::Header<'a>]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    fields
        .iter()
        .map(|field| (field.name.as_bytes(), field.value))
}

/// Parses a client's request head at the start of `buffer` and appends the `HEAD` frame that
/// carries it to the instance to `frame` (see the module's rules). `max_head` bounds the head.
pub fn parse_request_head<'b>(
    buffer: &'b [u8],
    max_head: usize,
    client: IpAddr,
    frame: &mut BytesMut,
) -> Result<ParsedRequest<'b>, FrontError> {
    // Left uninitialised: httparse writes the fields it finds (zeroing 256 of them would cost
    // more than parsing a typical head's ten).
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let head_len = match request.parse_with_uninit_headers(buffer, &mut fields) {
        Ok(httparse::Status::Complete(len)) if len > max_head => {
            return Err(FrontError::HeadTooLarge(max_head));
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buffer.len() > max_head => {
            return Err(FrontError::HeadTooLarge(max_head));
        }
        Ok(httparse::Status::Partial) => return Ok(ParsedRequest::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(FrontError::Frame(FrameError::TooManyHeaders));
        }
        Err(error) => return Err(FrontError::Malformed(error.to_string())),
    };
    let (Some(method), Some(path), Some(version)) = (request.method, request.path, request.version)
    else {
        return Err(FrontError::Malformed("incomplete request line".into()));
    };
    let fields = &*request.headers;
    let (service, after) = split_service(path)?;
    let http10 = version == 0;

    let (mut coding, mut length, mut forwarded) = (None, None, None);
    let (mut expect_continue, mut trailers, mut connection) = (false, false, false);
    let mut upgrade_field = false;
    for field in fields {
        let (name, value) = (field.name.as_bytes(), field.value);
        if eq(name, b"connection") {
            connection = true;
        } else if eq(name, b"transfer-encoding") {
            coding = Some(value);
        } else if eq(name, b"content-length") {
            length = Some(
                content_length(value, length)
                    .map_err(|_| FrontError::ContentLength(lossy(value)))?,
            );
        } else if eq(name, b"x-forwarded-for") {
            forwarded.get_or_insert(value);
        } else if eq(name, b"upgrade") {
            upgrade_field = true;
        } else if eq(name, b"expect") {
            expect_continue |= eq(value.trim_ascii(), b"100-continue");
        } else if eq(name, b"te") {
            trailers |= value
                .split(|&b| b == b',')
                .any(|option| eq(option.trim_ascii(), b"trailers"));
        }
    }
    let body = match (coding, length) {
        (Some(_), Some(_)) => return Err(FrontError::LengthAndCoding),
        (Some(coding), None) => {
            let last = coding.rsplit(|&b| b == b',').next().unwrap_or_default();
            if !eq(last.trim_ascii(), b"chunked") {
                return Err(FrontError::Coding(lossy(coding)));
            }
            RequestBody::Chunked
        }
        (None, Some(0)) | (None, None) => RequestBody::None,
        (None, Some(length)) => RequestBody::Length(length),
    };
    // HTTP/1.0 has no upgrades; a request with a body is not one here (the body would have
    // to cross before the switch).
    let upgrade = !http10
        && upgrade_field
        && body == RequestBody::None
        && connection
        && connection_names(pairs(fields), b"upgrade");
    let keep_alive = if http10 {
        connection && connection_names(pairs(fields), b"keep-alive")
    } else {
        !(connection && connection_names(pairs(fields), b"close"))
    };

    // X-Forwarded-For: the client's first value, then the client.
    let mut client_text = [0u8; 64];
    let mut cursor = &mut client_text[..];
    write!(cursor, "{client}").expect("an address fits in 64 bytes");
    let written = 64 - cursor.len();
    let joined;
    let forwarded_for: &[u8] = match forwarded {
        Some(previous) => {
            joined = [previous, b", ", &client_text[..written]].concat();
            &joined
        }
        None => &client_text[..written],
    };
    let crossing = pairs(fields)
        .filter(|(name, _)| {
            let asked_upgrade = upgrade && eq(name, b"upgrade");
            let dropped = hop_by_hop(name)
                || eq(name, b"x-forwarded-for")
                || (connection && connection_names(pairs(fields), name));
            asked_upgrade || !dropped
        })
        .chain([
            (&b"via"[..], VIA.as_bytes()),
            (&b"x-forwarded-for"[..], forwarded_for),
        ])
        // A body without a length is marked so, whatever the method: the sidecar would take
        // a GET or HEAD without a length for one without a body.
        .chain(
            (body == RequestBody::Chunked).then_some((&b"transfer-encoding"[..], &b"chunked"[..])),
        );
    let target: [&[u8]; 2] = if after.starts_with('/') {
        [b"", after.as_bytes()]
    } else {
        [b"/", after.as_bytes()]
    };
    encode_request_fields(method.as_bytes(), &target, crossing, frame)?;
    Ok(ParsedRequest::Request(RequestStart {
        method: method.as_bytes(),
        service,
        head_len,
        body,
        keep_alive,
        http10,
        expect_continue,
        trailers,
        upgrade,
    }))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// How a response's body goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body (after `HEAD`, and for 1xx, 204 and 304).
    None,
    /// A body of exactly this many bytes, as the instance's `Content-Length` said.
    Length(u64),
    /// Chunked; trailers are written only if the client takes them.
    Chunked {
        /// Whether the client takes trailers (`TE: trailers`).
        trailers: bool,
    },
    /// Until the connection closes (an HTTP/1.0 client, no length).
    UntilClose,
}

/// Appends the HTTP/1.1 head of the response in `payload` (a `HEAD` frame's) for `request`
/// to `out`. Returns how the body follows and whether the connection stays open after it.
pub fn write_response_head(
    payload: &[u8],
    request: &ResponseContext,
    out: &mut BytesMut,
) -> Result<(ResponseFraming, bool), FrameError> {
    let (status, fields) = view_response_head(payload)?;
    let (mut length, mut connection) = (None, false);
    for (name, value) in fields {
        if eq(name, b"content-length") {
            length = content_length(value, length).ok();
        }
        connection |= eq(name, b"connection");
    }
    let framing =
        if request.head_request || (100..200).contains(&status) || status == 204 || status == 304 {
            ResponseFraming::None
        } else if let Some(length) = length {
            ResponseFraming::Length(length)
        } else if request.http10 {
            ResponseFraming::UntilClose
        } else {
            ResponseFraming::Chunked {
                trailers: request.trailers,
            }
        };
    // The connection becomes the upgraded protocol's: no other request follows on it.
    let switching = request.upgrade && status == 101;
    let keep_alive = request.keep_alive && framing != ResponseFraming::UntilClose && !switching;

    out.reserve(64 + fields.encoded_len());
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.put_slice(reason.as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in fields {
        // An invalid length is not passed on: the body goes chunked instead.
        let bad_length = length.is_none() && eq(name, b"content-length");
        let switched_to = switching && eq(name, b"upgrade");
        if !switched_to
            && (bad_length
                || hop_by_hop(name)
                || (connection && connection_names(fields.iter(), name)))
        {
            continue;
        }
        out.put_slice(name);
        out.put_slice(b": ");
        out.put_slice(value);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"via: ");
    out.put_slice(VIA.as_bytes());
    out.put_slice(b"\r\n");
    if matches!(framing, ResponseFraming::Chunked { .. }) {
        out.put_slice(b"transfer-encoding: chunked\r\n");
    }
    if switching {
        out.put_slice(b"connection: upgrade\r\n");
    } else if !keep_alive {
        out.put_slice(b"connection: close\r\n");
    } else if request.http10 {
        out.put_slice(b"connection: keep-alive\r\n");
    }
    out.put_slice(b"\r\n");
    Ok((framing, keep_alive))
}

/// Appends the HTTP/1.1 head of a response the ingress makes itself (an error: `status`,
/// a plain-text `body` of `body_len` bytes to follow) to `out`.
pub fn write_local_response_head(
    status: u16,
    body_len: usize,
    keep_alive: bool,
    out: &mut BytesMut,
) {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let _ = write!(
        out.writer(),
        "HTTP/1.1 {status:03} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {body_len}\r\nvia: {VIA}\r\n{}\r\n",
        if keep_alive {
            ""
        } else {
            "connection: close\r\n"
        }
    );
}

#[cfg(test)]
mod tests;
