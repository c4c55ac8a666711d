//! HTTP load generators. Open loop: GETs at a fixed rate whatever the answers do, each
//! latency measured from the request's intended send time, so a stall is charged to every
//! request it delays (no coordinated omission). Closed loop: N workers sending back to back,
//! for the most requests a second a path can take.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{StatusCode, Uri};
use http_body_util::Empty;
use hyper::body::Body;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};

use crate::{body::drain, serve::SERVED_BY};

/// Every request (and a waiting one's wait for a slot) gets this long, then it is an error.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Most open-loop requests in flight at once, so at most this many client connections, as
/// wrk2's fixed connection count: one due while this many are outstanding waits for a slot,
/// and the wait counts in its latency. With 1024, a stall of a fifth of a second at 5000
/// requests/s opened a thousand connections through each path, and each TLS peer a
/// thousand upstream handshakes on its one core, which it never recovered from.
const MAX_IN_FLIGHT: usize = 128;

pub type GetClient = Client<HttpConnector, Empty<Bytes>>;

/// A keep-alive HTTP/1.1 client; no Nagle delay, so small requests leave at once.
pub fn client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// One GET, answered 200 and read to the end; the answer's `x-served-by`, if any.
pub async fn get(client: &GetClient, uri: Uri) -> anyhow::Result<Option<String>> {
    let response = client.get(uri).await?;
    let status = response.status();
    let served_by = response
        .headers()
        .get(SERVED_BY)
        .and_then(|tag| tag.to_str().ok())
        .map(str::to_owned);
    drain(response.into_body()).await?;
    anyhow::ensure!(status == StatusCode::OK, "answered {status}");
    Ok(served_by)
}

/// What an open-loop run measured.
pub struct OpenLoop {
    /// Latency of each answered request in microseconds, from its intended send time.
    pub latency: Histogram<u64>,
    pub sent: u64,
    pub errors: u64,
    /// The first error, to say what went wrong.
    pub first_error: Option<String>,
    /// For each answer that said which instance it came from (`bench serve --tag`): when it
    /// was due to be sent, from the start of the run, and the instance's tag.
    pub served_by: Vec<(Duration, String)>,
}

/// GETs `uri` `rate` times a second for `duration`. Requests are released by a pacer thread
/// that sleeps with nanosleep (tens of microseconds of slack, where the runtime's timer
/// rounds to milliseconds, which would be charged to every request).
pub async fn open_loop(
    client: &GetClient,
    uri: Uri,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<OpenLoop> {
    let sent = (duration.as_secs_f64() * f64::from(rate)) as u64;
    let interval = 1.0 / f64::from(rate);
    let (done, mut results) = mpsc::unbounded_channel();
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let runtime = tokio::runtime::Handle::current();
    let client = client.clone();
    let start = Instant::now();
    let pacer = tokio::task::spawn_blocking(move || {
        for i in 0..sent {
            let intended = start + Duration::from_secs_f64(i as f64 * interval);
            if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (client, uri, slots, done) = (
                client.clone(),
                uri.clone(),
                Arc::clone(&slots),
                done.clone(),
            );
            runtime.spawn(async move {
                let answered = tokio::time::timeout(TIMEOUT, async {
                    let _slot = slots.acquire_owned().await?;
                    get(&client, uri).await
                })
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {TIMEOUT:?}")));
                // The receiver outlives every request.
                let _ = done.send(answered.map(|tag| (intended, intended.elapsed(), tag)));
            });
        }
    });
    let mut latency = Histogram::new_with_bounds(1, 60_000_000, 3)?;
    let (mut errors, mut first_error, mut served_by) = (0, None, Vec::new());
    // Ends when the pacer and every request (each holding a sender) are done.
    while let Some(answered) = results.recv().await {
        match answered {
            Ok((intended, took, tag)) => {
                latency.saturating_record(took.as_micros() as u64);
                if let Some(tag) = tag {
                    served_by.push((intended - start, tag));
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    pacer.await.context("pacer")?;
    Ok(OpenLoop {
        latency,
        sent,
        errors,
        first_error,
        served_by,
    })
}

/// What a closed-loop run measured.
pub struct ClosedLoop {
    pub answered: u64,
    pub errors: u64,
    pub took: Duration,
}

impl ClosedLoop {
    pub fn per_second(&self) -> f64 {
        self.answered as f64 / self.took.as_secs_f64()
    }
}

/// `workers` tasks GET `uri` back to back for `duration` (requests started before its end
/// may finish, within [`TIMEOUT`]).
pub async fn closed_loop(
    client: &GetClient,
    uri: Uri,
    workers: usize,
    duration: Duration,
) -> anyhow::Result<ClosedLoop> {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (client, uri) = (client.clone(), uri.clone());
        tasks.spawn(async move {
            let (mut answered, mut errors) = (0u64, 0u64);
            while start.elapsed() < duration {
                match tokio::time::timeout(TIMEOUT, get(&client, uri.clone())).await {
                    Ok(Ok(_)) => answered += 1,
                    _ => errors += 1,
                }
            }
            (answered, errors)
        });
    }
    let (mut answered, mut errors) = (0, 0);
    while let Some(counts) = tasks.join_next().await {
        let (a, e) = counts?;
        answered += a;
        errors += e;
    }
    Ok(ClosedLoop {
        answered,
        errors,
        took: start.elapsed(),
    })
}
