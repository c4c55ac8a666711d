//! The sidecar's side of a service that speaks HTTP/2 without TLS (h2c with prior knowledge:
//! gRPC servers, and any service declared `h2c`): one multiplexed connection per worker,
//! made when first needed and again once the service closed it, driven by hyper's client.
//!
//! # Rules
//! 1. **The request** is the `HEAD` frame's method, target and fields (less `Host`, which
//!    becomes the `:authority`; the ingress's `Transfer-Encoding: chunked` mark; and the
//!    HTTP/1.1 connection fields), with `TE: trailers` (gRPC servers ask for it). Its body
//!    and trailers stream from the ingress as they arrive.
//! 2. **The response** goes back as it comes: head, each `DATA` frame as hyper hands it over
//!    (a gRPC stream's messages one by one), trailers (`grpc-status`, `grpc-message`).
//! 3. **Nothing reached the service** (no connection, or the service refused the stream with
//!    `REFUSED_STREAM`): [`H2Error::Connect`] / [`H2Error::Unprocessed`], so the ingress may
//!    send the request elsewhere. The exchange broke before the response head:
//!    [`H2Error::Service`]; after it: [`H2Error::AfterHead`] (the stream is reset).
//! 4. **Cancelled**: when the ingress stops reading the response (its client reset its call,
//!    or a deadline passed) or resets the request, the request is dropped, and hyper resets
//!    the service's stream (`RST_STREAM`): the service sees the call cancelled.

use std::{net::SocketAddr, sync::Mutex, time::Duration};

use bytes::BytesMut;
use http::{HeaderName, HeaderValue, Method, Request, Uri, header};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::transport::{RecvStream, SendStream};
use crate::{
    framing::{Decoder, FrameError, RequestHeadView, ResponseHead, encode_response_head},
    stream::{FramedBody, StreamError, send_message},
};

/// Why an exchange with an HTTP/2 service failed (rule 3).
#[derive(Debug, thiserror::Error)]
pub enum H2Error {
    /// The request's head from the ingress is not a valid HTTP/2 request.
    #[error("the request head is invalid: {0}")]
    Request(String),
    /// No connection to the service: it never saw the request.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The service refused the stream before processing it (`REFUSED_STREAM`, or its
    /// connection was going away).
    #[error("the service did not process it: {0}")]
    Unprocessed(hyper::Error),
    /// The exchange broke before the response head.
    #[error("{0}")]
    Service(hyper::Error),
    /// The service's response head cannot be put in a frame (too many or too long fields).
    #[error("the service's response head cannot be framed: {0}")]
    ResponseHead(FrameError),
    /// The exchange broke after the response head went to the ingress.
    #[error("the response broke after its head: {0}")]
    AfterHead(StreamError),
    /// The ingress stopped reading the response (its client went away, or a deadline
    /// passed): the request was dropped, so the service saw it cancelled.
    #[error("the ingress stopped reading the response")]
    Abandoned,
}

/// One worker's connection to an h2c service.
pub struct H2Upstream {
    addr: SocketAddr,
    connect_timeout: Duration,
    connection: Mutex<Option<SendRequest<FramedBody>>>,
}

impl H2Upstream {
    /// The service at `addr`, connected to within `connect_timeout` when first asked.
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self {
            addr,
            connect_timeout,
            connection: Mutex::new(None),
        }
    }

    /// Sends the request whose head is `head` and whose body follows on `recv` (`rest` is
    /// what arrived after the head) to the service, and streams its response on `send`.
    /// `answered` is called once the response head arrived.
    pub async fn exchange(
        &self,
        head: &RequestHeadView<'_>,
        recv: RecvStream,
        rest: Decoder,
        send: &mut SendStream,
        answered: impl Fn(),
    ) -> Result<(), H2Error> {
        let request = self.request(head, FramedBody::new(recv, rest))?;
        let mut connection = self.connection().await?;
        // Ends when the ingress stops reading: the request is dropped and its stream reset.
        let abandoned = send.stopped();
        let exchange = async {
            let response = match connection.send_request(request).await {
                Ok(response) => response,
                Err(error) if unprocessed(&error) => return Err(H2Error::Unprocessed(error)),
                Err(error) => return Err(H2Error::Service(error)),
            };
            answered();
            let (parts, body) = response.into_parts();
            let mut encoded = BytesMut::new();
            let head = ResponseHead {
                status: parts.status,
                headers: parts.headers,
            };
            encode_response_head(&head, &mut encoded).map_err(H2Error::ResponseHead)?;
            send_message(send, encoded.freeze(), body)
                .await
                .map_err(H2Error::AfterHead)
        };
        tokio::select! {
            result = exchange => result,
            _ = abandoned => Err(H2Error::Abandoned),
        }
    }

    /// The request for the service (rule 1).
    fn request(
        &self,
        head: &RequestHeadView<'_>,
        body: FramedBody,
    ) -> Result<Request<FramedBody>, H2Error> {
        let invalid = |what: &str| H2Error::Request(what.to_owned());
        let method = Method::from_bytes(head.method).map_err(|_| invalid("the method"))?;
        let mut authority = None;
        let mut builder = Request::builder().method(method);
        for (name, value) in head.fields {
            if name.eq_ignore_ascii_case(b"host") {
                authority = Some(value);
                continue;
            }
            if connection_specific(name) {
                continue;
            }
            let name = HeaderName::from_bytes(name).map_err(|_| invalid("a field name"))?;
            let value = HeaderValue::from_bytes(value).map_err(|_| invalid("a field value"))?;
            builder = builder.header(name, value);
        }
        let authority = match authority {
            Some(host) => std::str::from_utf8(host)
                .map_err(|_| invalid("Host"))?
                .to_owned(),
            None => self.addr.to_string(),
        };
        let target = std::str::from_utf8(head.target).map_err(|_| invalid("the target"))?;
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(target)
            .build()
            .map_err(|_| invalid("the target or Host"))?;
        builder
            .uri(uri)
            .header(header::TE, HeaderValue::from_static("trailers"))
            .body(body)
            .map_err(|error| H2Error::Request(error.to_string()))
    }

    /// A handle on the connection to the service: the open one, or a new one.
    async fn connection(&self) -> Result<SendRequest<FramedBody>, H2Error> {
        if let Some(open) = self.lock().as_ref().filter(|open| !open.is_closed()) {
            return Ok(open.clone());
        }
        let stream = super::connect_service(self.addr, self.connect_timeout)
            .await
            .map_err(|error| H2Error::Connect(error.to_string()))?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|error| H2Error::Connect(error.to_string()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP/2 connection to the service ended");
            }
        });
        // Two requests may have connected at once: the later one's connection is kept, the
        // other's serves its own request and ends when its handle goes.
        *self.lock() = Some(sender.clone());
        Ok(sender)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SendRequest<FramedBody>>> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113 section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

/// Whether the service at `addr` speaks HTTP/2 without TLS: on a connection of its own the
/// preface and an empty SETTINGS frame are sent, and an HTTP/2 server's first frame back is
/// SETTINGS (type 4), where an HTTP/1.1 server answers with a status line or closes. Nothing
/// is requested of the service. `None` when it cannot be told (no connection, no answer
/// within `timeout`: a service still starting), so that the question is asked again.
pub async fn speaks_h2c(addr: SocketAddr, timeout: Duration) -> Option<bool> {
    let ask = async {
        let mut stream = super::connect_service(addr, timeout).await.ok()?;
        stream.write_all(PREFACE).await.ok()?;
        let mut header = [0u8; 9];
        // Closed after the preface, or an answer shorter than a frame header: HTTP/1.1.
        Some(stream.read_exact(&mut header).await.is_ok() && header[3] == 0x4)
    };
    tokio::time::timeout(timeout, ask).await.ok().flatten()
}

/// HTTP/1.1's connection-specific fields, which HTTP/2 forbids (RFC 9113 section 8.2.2), and
/// the ingress's mark of a body of unknown length; `TE` is set anew.
fn connection_specific(name: &[u8]) -> bool {
    [
        &b"connection"[..],
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    ]
    .iter()
    .any(|field| name.eq_ignore_ascii_case(field))
}

/// Whether the service cannot have processed the request (rule 3).
fn unprocessed(error: &hyper::Error) -> bool {
    use std::error::Error as _;
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = cause.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// A listener that answers every connection with `answer` (after reading what came).
    async fn answering(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buffer = [0u8; 64];
                let _ = stream.read(&mut buffer).await;
                let _ = stream.write_all(answer).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_service_is_asked_whether_it_speaks_h2c_and_silence_is_no_answer() {
        let timeout = Duration::from_secs(5);
        // An HTTP/2 server's first frame: an empty SETTINGS.
        let h2 = answering(b"\0\0\0\x04\0\0\0\0\0").await;
        assert_eq!(speaks_h2c(h2, timeout).await, Some(true));
        let http1 = answering(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
        assert_eq!(speaks_h2c(http1, timeout).await, Some(false));
        let closes = answering(b"").await;
        assert_eq!(speaks_h2c(closes, timeout).await, Some(false));
        // Nothing listening (a service still starting): asked again next time.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        assert_eq!(speaks_h2c(addr, timeout).await, None);
    }
}
