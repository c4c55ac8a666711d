//! Why the ingress could not serve a request, with the kind kept to the end, and the one
//! place that turns it into a response ([`RequestError::into_response`]).
//!
//! | kind | status |
//! |---|---|
//! | the target names no service, or a malformed one | 400 |
//! | the request head cannot be framed (too many or too large fields) | 431 |
//! | the client's own request body failed | 400 |
//! | no such service | 404 |
//! | the lookup cannot be asked, no instance and none can be started, the wait for one ran out, too many waiting | 503 |
//! | the instance's service never got the request and it cannot be sent again (its body is gone) | 503 |
//! | the exchange with an instance broke and the request cannot be sent again | 502 |
//! | the instance's answer cannot be read | 502 |

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use libp2p::PeerId;

use super::{ResponseBody, routing::Unavailable};
use crate::{forward::AttemptError, framing::FrameError, rewrite::RouteError};

/// Why the ingress could not serve a request (or open a layer-4 tunnel); each kind has its
/// status ([`RequestError::status`]), as the module's table says.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The target names no service, or not a valid one (400).
    #[error(transparent)]
    Target(#[from] RouteError),
    /// An HTTP/2 request's head cannot be encoded as a `HEAD` frame: too many fields, a part
    /// too long, ... (431).
    #[error("the request head cannot be sent: {0}")]
    Head(FrameError),
    /// The lookup knows no service of this name (404).
    #[error("no service named '{0}'")]
    NoSuchService(String),
    /// The lookup could not be asked or did not answer (503); holds the reason.
    #[error("the lookup service is unreachable: {0}")]
    Lookup(String),
    /// The service's routing says no instance can be had now (503).
    #[error("no instance of '{service}' {why}")]
    Unavailable {
        /// The service's name.
        service: String,
        /// Why: no instance and none could be started, or too many requests wait already.
        why: Unavailable,
    },
    /// The request waited `--instance-wait` for an instance and none became usable (503).
    #[error("no instance of '{service}' became available within {waited:?}")]
    WaitedTooLong {
        /// The service's name.
        service: String,
        /// How long the request waited.
        waited: Duration,
    },
    /// An instance's response `HEAD` frame arrived but cannot be decoded (502).
    #[error("the answer of an instance of '{service}' cannot be read: {error}")]
    Answer {
        /// The service's name.
        service: String,
        /// What is wrong with the frame.
        error: FrameError,
    },
    /// The last attempt on an instance failed and the request was not sent again: it could
    /// not be, or the retry budget was spent (400 if the client's body failed, 503 if the
    /// service never got it, else 502).
    #[error("instance {peer} of '{service}' failed: {error}")]
    Attempt {
        /// The service's name.
        service: String,
        /// The instance's proxy, by overlay peer id.
        peer: PeerId,
        /// How the attempt failed.
        error: AttemptError,
    },
}

impl RequestError {
    /// The HTTP status the client is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Target(_) => StatusCode::BAD_REQUEST,
            Self::Head(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Answer { .. } => StatusCode::BAD_GATEWAY,
            Self::NoSuchService(_) => StatusCode::NOT_FOUND,
            Self::Lookup(_) | Self::Unavailable { .. } | Self::WaitedTooLong { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Attempt { error, .. } => match error {
                AttemptError::Client(_) => StatusCode::BAD_REQUEST,
                AttemptError::Refused(_) => StatusCode::SERVICE_UNAVAILABLE,
                AttemptError::Unreachable(_)
                | AttemptError::NotSent(_)
                | AttemptError::Broken(_) => StatusCode::BAD_GATEWAY,
            },
        }
    }

    /// The response the client gets: the status, and the reason as plain text.
    pub fn into_response(self) -> Response<ResponseBody> {
        plain(self.status(), self.to_string())
    }
}

/// A plain-text response.
pub fn plain(status: StatusCode, text: String) -> Response<ResponseBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(text + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
