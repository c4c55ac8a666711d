//! The lookup service's request handling: records in a [`Store`], blobs in a [`BlobStore`].

use std::{sync::Arc, time::Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

use super::{
    protocol::{LookupRequest, LookupResponse},
    record::{ServiceRecord, validate_name},
    store::Store,
};
use crate::blob::BlobStore;

/// Metrics of the lookup service.
#[derive(Clone)]
pub struct LookupMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
    store_errors: IntCounter,
}

impl LookupMetrics {
    /// Creates the series `lookup_requests_total` (by `op` and `outcome`),
    /// `lookup_request_duration_seconds` (by `op`) and `lookup_store_errors_total`, and
    /// registers them in `registry`; an error if they are registered there already.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "lookup_requests_total",
                "Lookup requests by operation and outcome.",
            ),
            &["op", "outcome"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "lookup_request_duration_seconds",
                "Time to answer a lookup request.",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 4.0, 10)?),
            &["op"],
        )?;
        let store_errors = IntCounter::new(
            "lookup_store_errors_total",
            "Failed record store operations.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        Ok(Self {
            requests,
            latency,
            store_errors,
        })
    }
}

/// Answers lookup requests: records from a [`Store`], accepted only once their artifact is in
/// the [`BlobStore`].
pub struct LookupService {
    store: Store,
    blobs: Arc<BlobStore>,
    metrics: LookupMetrics,
}

impl LookupService {
    /// A service over `store` and `blobs` that counts its requests in `metrics`.
    pub fn new(store: Store, blobs: Arc<BlobStore>, metrics: LookupMetrics) -> Self {
        Self {
            store,
            blobs,
            metrics,
        }
    }

    /// Answers one request and accounts for it.
    pub async fn handle(&self, request: LookupRequest) -> LookupResponse {
        let op = request.op();
        let start = Instant::now();
        let response = match request {
            LookupRequest::Add(record) => self.add(record).await,
            LookupRequest::Get(name) => self.get(&name).await,
            LookupRequest::List => self.list().await,
            LookupRequest::Delete(name) => self.delete(&name).await,
        };
        let outcome = match &response {
            LookupResponse::NotFound => "not_found",
            LookupResponse::Failed(_) | LookupResponse::Unavailable(_) => "error",
            _ => "ok",
        };
        self.metrics
            .requests
            .with_label_values(&[op, outcome])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        response
    }

    fn store_failed(&self, error: impl std::fmt::Display) -> LookupResponse {
        self.metrics.store_errors.inc();
        tracing::warn!(%error, "record store failed");
        LookupResponse::Unavailable(error.to_string())
    }

    async fn add(&self, record: ServiceRecord) -> LookupResponse {
        if let Err(reason) = record.validate() {
            return LookupResponse::Failed(reason);
        }
        // Never a record without its blob: whoever resolves the name must be able to get it.
        // The copy is hashed anew (adds are rare; a copy damaged on disk since it was stored
        // must not pass for the artifact).
        let held = self.blobs.open_verified(record.digest).await;
        if !matches!(held, Ok((_, size)) if size == record.size) {
            return LookupResponse::Failed(format!(
                "blob {} ({} bytes) is not stored intact at this lookup service: upload it first",
                record.digest, record.size
            ));
        }
        match self.store.put(&record.name, record.to_json()).await {
            Ok(()) => {
                tracing::info!(name = %record.name, digest = %record.digest, "record added");
                LookupResponse::Added
            }
            Err(error) => self.store_failed(error),
        }
    }

    async fn get(&self, name: &str) -> LookupResponse {
        if let Err(reason) = validate_name(name) {
            return LookupResponse::Failed(reason);
        }
        match self.store.get(name).await {
            Ok(Some(json)) => match ServiceRecord::from_json(&json) {
                Ok(record) => LookupResponse::Found(record),
                Err(reason) => LookupResponse::Failed(format!("record of '{name}': {reason}")),
            },
            Ok(None) => LookupResponse::NotFound,
            Err(error) => self.store_failed(error),
        }
    }

    async fn list(&self) -> LookupResponse {
        match self.store.list().await {
            Ok(entries) => LookupResponse::Services(
                entries
                    .into_iter()
                    .filter_map(|(name, json)| match ServiceRecord::from_json(&json) {
                        Ok(record) => Some(record),
                        Err(reason) => {
                            tracing::warn!(%name, %reason, "skipping unreadable record");
                            None
                        }
                    })
                    .collect(),
            ),
            Err(error) => self.store_failed(error),
        }
    }

    async fn delete(&self, name: &str) -> LookupResponse {
        if let Err(reason) = validate_name(name) {
            return LookupResponse::Failed(reason);
        }
        match self.store.delete(name).await {
            Ok(count) => LookupResponse::Deleted(count),
            Err(error) => self.store_failed(error),
        }
    }
}
