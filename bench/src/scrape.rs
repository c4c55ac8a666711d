//! Reading a program's Prometheus `/metrics`, as Prometheus would.

use std::{net::SocketAddr, time::Duration};

use http::Uri;
use http_body_util::BodyExt;

use crate::load::GetClient;

/// How long a GET of [`http_text`] may take.
const WITHIN: Duration = Duration::from_secs(5);

/// Why a GET of [`http_text`] (or [`scrape`]) got no text.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No whole answer within [`WITHIN`].
    #[error("http://{addr}{path} did not answer within {WITHIN:?}")]
    TimedOut {
        /// The endpoint.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
    },
    /// The request or the body failed (connection refused, reset), or the path is not one.
    #[error("http://{addr}{path}: {reason}")]
    Failed {
        /// The endpoint.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// hyper's error, as text.
        reason: String,
    },
}

/// The text of `http://<metrics>/metrics`, within 5 s.
pub async fn scrape(client: &GetClient, metrics: SocketAddr) -> Result<String, HttpError> {
    http_text(client, metrics, "/metrics").await
}

/// The body of `http://<addr><path>` as text, within 5 s.
pub async fn http_text(
    client: &GetClient,
    addr: SocketAddr,
    path: &str,
) -> Result<String, HttpError> {
    let failed = |reason: String| HttpError::Failed {
        addr,
        path: path.to_owned(),
        reason,
    };
    let uri: Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| failed(e.to_string()))?;
    let read = async {
        let response = client.get(uri).await.map_err(|e| failed(e.to_string()))?;
        let body = response.into_body().collect().await;
        let body = body.map_err(|e| failed(e.to_string()))?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(WITHIN, read)
        .await
        .map_err(|_| HttpError::TimedOut {
            addr,
            path: path.to_owned(),
        })?
}

/// The value of `series` (name and labels as printed) in a Prometheus text exposition.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}
