//! The instance side of the data plane: the [`Sidecar`] answers the streams ingresses open
//! over QUIC by calling its service through a pooled hyper client, and knows whether that
//! service answers ([`health`]).
//!
//! # Rules
//! 1. **A request** (a stream opening with `HEAD`) goes to the service with its body streamed
//!    as it arrives and `TE: trailers` set; the response head, body and trailers stream back.
//! 2. **Nothing reached the service** (the client could not connect: refused, unreachable,
//!    past the connect timeout): the answer is `REFUSED` naming the service's address, so the
//!    ingress may send the request elsewhere whatever its method, and the service is reported
//!    down ([`health::Observation::ConnectFailed`]).
//! 3. **The exchange broke after connecting** (the service reset it, closed early): the
//!    answer is `FAILED` saying so (the ingress retries it only if it is idempotent, as the
//!    request may have had effects), never a response of the service; the health is left as it
//!    is. If it was the request body from the ingress that broke (the ingress reset its side),
//!    the service is not blamed either.
//! 4. **Any response** of the service, whatever its status, reports it serving.
//! 5. **A probe** (a stream opening with `PING`) is answered at once with a `PING` carrying the
//!    service's [`Health`](crate::framing::Health) (starting counts as down), without troubling
//!    the service; probes are counted.
//! 6. **Liveness checks** run from [`Sidecar::new`] on: a TCP connect to the service every
//!    interval, until the sidecar is dropped ([`health::run_checks`]).

pub mod health;

use std::{
    error::Error as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::BytesMut;
use http::{
    HeaderValue, Request, Uri, header,
    uri::{self, Authority, PathAndQuery, Scheme},
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use quinn::{Connection, RecvStream, SendStream};

use self::health::{HealthPolicy, Observation, ServiceHealth};
use crate::{
    forward::HEAD_CAPACITY,
    framing::{Kind, ResponseHead, decode_request_head, encode_response_head},
    metrics::Activity,
    stream::{
        FramedBody, Opening, StreamError, read_opening, send_failed, send_message, send_ping,
        send_refused,
    },
};

/// The instance side: requests arriving on QUIC streams go to the service at `upstream`.
pub struct Sidecar {
    upstream: SocketAddr,
    /// `upstream` as a URI authority, made once (cloning it shares its bytes).
    authority: Authority,
    client: Client<HttpConnector, FramedBody>,
    activity: Arc<Activity>,
    health: Arc<ServiceHealth>,
    probes_answered: AtomicU64,
}

impl Sidecar {
    /// A sidecar of the service at `upstream`, checked with the default [`HealthPolicy`].
    /// `activity` is told of every request served (the allocator culls idle instances).
    pub fn new(upstream: SocketAddr, activity: Arc<Activity>) -> Arc<Self> {
        Self::with_policy(upstream, activity, HealthPolicy::default())
    }

    /// A sidecar whose service is checked as `policy` says; starts the checks (in a task
    /// that ends when the sidecar and every holder of its [`Sidecar::health`] are gone), so
    /// it must be called within a Tokio runtime.
    pub fn with_policy(
        upstream: SocketAddr,
        activity: Arc<Activity>,
        policy: HealthPolicy,
    ) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(policy.connect_timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let authority = Authority::try_from(upstream.to_string())
            .expect("a socket address is a valid authority");
        let health = ServiceHealth::new(upstream, policy);
        tokio::spawn(health::run_checks(Arc::downgrade(&health)));
        Arc::new(Self {
            upstream,
            authority,
            client,
            activity,
            health,
            probes_answered: AtomicU64::new(0),
        })
    }

    /// What the sidecar knows of its service; [`ServiceHealth::serving`] waits for it to
    /// answer.
    pub fn health(&self) -> &Arc<ServiceHealth> {
        &self.health
    }

    /// Probes this sidecar answered.
    pub fn probes_answered(&self) -> u64 {
        self.probes_answered.load(Ordering::Relaxed)
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
            Opening::Ping(_) => {
                self.probes_answered.fetch_add(1, Ordering::Relaxed);
                return send_ping(&mut send, &self.health.health().encode()).await;
            }
            Opening::Refused(_) => return Err(StreamError::Unexpected(Kind::Refused)),
            Opening::Failed(_) => return Err(StreamError::Unexpected(Kind::Failed)),
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
        let error = match self.client.request(request).await {
            Ok(response) => {
                self.health.observe(Observation::Answered);
                let (parts, body) = response.into_parts();
                encode_response_head(
                    &ResponseHead {
                        status: parts.status,
                        headers: parts.headers,
                    },
                    &mut encoded,
                )?;
                return send_message(&mut send, encoded.freeze(), body).await;
            }
            Err(error) => error,
        };
        if error.is_connect() {
            self.health.observe(Observation::ConnectFailed);
            let reason = format!(
                "cannot connect to the service at {}: {}",
                self.upstream,
                causes(&error)
            );
            return send_refused(&mut send, &reason).await;
        }
        let reason = if ingress_body_failed(&error) {
            format!(
                "the request body from the ingress broke: {}",
                causes(&error)
            )
        } else {
            format!(
                "the service at {} broke the exchange: {}",
                self.upstream,
                causes(&error)
            )
        };
        send_failed(&mut send, &reason).await
    }
}

/// An error and its causes, innermost last: hyper's own text ("client error (Connect)") says
/// little without them.
fn causes(error: &hyper_util::client::legacy::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether the client failed because the request body (the [`FramedBody`] from the
/// ingress) did: its error is among the causes.
fn ingress_body_failed(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source = error.source();
    while let Some(cause) = source {
        if cause.is::<StreamError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

#[cfg(test)]
mod tests;
