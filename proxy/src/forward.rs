//! Both ends of one request between proxies: [`forward`] on the ingress side sends a request
//! over an authenticated QUIC connection and returns the streaming response; [`Sidecar`] on
//! the instance side answers such streams by calling its service through a pooled hyper
//! client.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderValue, Request, Response, StatusCode, Uri, header,
    uri::{self, Authority, PathAndQuery, Scheme},
};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use quinn::{Connection, RecvStream, SendStream};

use crate::{
    framing::{
        RequestHead, ResponseHead, decode_request_head, decode_response_head, encode_request_head,
        encode_response_head,
    },
    metrics::Activity,
    stream::{FramedBody, Opening, StreamError, read_head, read_opening, send_message, send_ping},
};

/// Sends `head` and `body` on a new stream of `connection` and returns the response as soon as
/// its head arrives; its body streams from the connection as the caller reads it. The request
/// body is sent concurrently, so a service may answer before it has read all of it.
pub async fn forward<B>(
    connection: &Connection,
    head: &RequestHead,
    body: B,
) -> Result<Response<FramedBody>, StreamError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display + Send,
{
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| StreamError::Quic(e.to_string()))?;
    let mut encoded = BytesMut::with_capacity(HEAD_CAPACITY);
    encode_request_head(head, &mut encoded)?;
    if body.is_end_stream() {
        // No body (most GETs): the head and the stream's end go out at once, without a task
        // of their own, a spawn and a wake-up less per request.
        send_message(&mut send, encoded.freeze(), body).await?;
    } else {
        tokio::spawn(async move {
            if let Err(error) = send_message(&mut send, encoded.freeze(), body).await {
                tracing::debug!(%error, "request body not fully sent");
                let _ = send.reset(0u32.into());
            }
        });
    }
    let (payload, rest) = read_head(&mut recv).await?;
    let head = decode_response_head(&payload)?;
    let mut response = Response::new(FramedBody::new(recv, rest));
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    Ok(response)
}

/// Measures the round trip to the proxy at the other end of `connection`: a PING on a new
/// stream, answered by the sidecar without involving its service.
pub async fn probe(connection: &Connection) -> Result<Duration, StreamError> {
    let begin = Instant::now();
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| StreamError::Quic(e.to_string()))?;
    send_ping(&mut send).await?;
    match read_opening(&mut recv).await? {
        Opening::Ping => Ok(begin.elapsed()),
        Opening::Head(..) => Err(StreamError::Unexpected(crate::framing::Kind::Head)),
    }
}

/// Room for a typical encoded head, so that encoding it does not grow the buffer.
const HEAD_CAPACITY: usize = 512;

/// The instance side: requests arriving on QUIC streams go to the service at `upstream`.
pub struct Sidecar {
    upstream: SocketAddr,
    /// `upstream` as a URI authority, made once (cloning it shares its bytes).
    authority: Authority,
    client: Client<HttpConnector, FramedBody>,
    activity: Arc<Activity>,
}

impl Sidecar {
    /// `activity` is told of every request served (the allocator culls idle instances).
    pub fn new(upstream: SocketAddr, activity: Arc<Activity>) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let authority = Authority::try_from(upstream.to_string())
            .expect("a socket address is a valid authority");
        Arc::new(Self {
            upstream,
            authority,
            client,
            activity,
        })
    }

    /// Serves every request stream of an authenticated connection until it closes.
    pub async fn serve_connection(self: Arc<Self>, connection: Connection) {
        while let Ok((send, recv)) = connection.accept_bi().await {
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(error) = this.serve_stream(send, recv).await {
                    tracing::debug!(%error, "request stream failed");
                }
            });
        }
    }

    async fn serve_stream(
        &self,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Result<(), StreamError> {
        let (payload, rest) = match read_opening(&mut recv).await? {
            Opening::Head(payload, rest) => (payload, rest),
            Opening::Ping => return send_ping(&mut send).await,
        };
        let head = decode_request_head(&payload)?;
        let _serving = self.activity.serve();
        let mut uri = uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        uri.path_and_query = Some(
            PathAndQuery::try_from(head.target)
                .map_err(|e: uri::InvalidUri| StreamError::Body(e.to_string()))?,
        );
        let mut request = Request::new(FramedBody::new(recv, rest));
        *request.method_mut() = head.method;
        *request.uri_mut() = Uri::from_parts(uri).map_err(|e| StreamError::Body(e.to_string()))?;
        *request.headers_mut() = head.headers;
        // This proxy carries trailers, so it says so: an HTTP/1.1 service sends trailers
        // only to a client that accepts them (TE itself is hop-by-hop, set per hop).
        request
            .headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
        let mut encoded = BytesMut::with_capacity(HEAD_CAPACITY);
        match self.client.request(request).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                encode_response_head(
                    &ResponseHead {
                        status: parts.status,
                        headers: parts.headers,
                    },
                    &mut encoded,
                )?;
                send_message(&mut send, encoded.freeze(), body).await
            }
            Err(error) => {
                let text = format!("the service at {} did not answer: {error}\n", self.upstream);
                let mut headers = http::HeaderMap::new();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                encode_response_head(
                    &ResponseHead {
                        status: StatusCode::BAD_GATEWAY,
                        headers,
                    },
                    &mut encoded,
                )?;
                send_message(
                    &mut send,
                    encoded.freeze(),
                    Full::new(Bytes::from(text)).map_err(|never| match never {}),
                )
                .await
            }
        }
    }
}

#[cfg(test)]
mod tests;
