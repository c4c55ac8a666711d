//! Reading a program's Prometheus `/metrics`, as Prometheus would.

use std::{net::SocketAddr, time::Duration};

use http::Uri;
use http_body_util::BodyExt;

use crate::load::GetClient;

/// The text of `http://<metrics>/metrics`, within 5 s.
pub async fn scrape(client: &GetClient, metrics: SocketAddr) -> Result<String, String> {
    http_text(client, metrics, "/metrics")
        .await
        .map_err(|e| format!("the metrics at {metrics}: {e}"))
}

/// The body of `http://<addr><path>` as text, within 5 s.
pub async fn http_text(client: &GetClient, addr: SocketAddr, path: &str) -> Result<String, String> {
    let uri: Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let read = async {
        let response = client.get(uri).await.map_err(|e| e.to_string())?;
        let body = response.into_body().collect().await;
        let body = body.map_err(|e| e.to_string())?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| format!("{addr}{path} did not answer within 5 s"))?
}

/// The value of `series` (name and labels as printed) in a Prometheus text exposition.
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}
