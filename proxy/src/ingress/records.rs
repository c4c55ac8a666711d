//! Service records for the ingress: resolved through the lookup, cached with a TTL (and a
//! short negative TTL for names that do not exist), refreshed in the background before they
//! expire so that a warm cache never waits on the lookup.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use mtc_overlay::{
    lookup::{ServiceRecord, client::get as fetch_record},
    overlay::Node,
};

use crate::{
    cache::{Read, TtlCache},
    metrics::ServiceSeries,
};

/// How long an unknown service is remembered as unknown.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);

pub(super) struct Records {
    node: Node,
    state: Mutex<State>,
}

/// A service record and what the request path derives from it, computed once per lookup
/// rather than per request.
#[derive(Debug)]
pub struct Resolved {
    pub record: ServiceRecord,
    /// The namespace its instances advertise ([`ServiceRecord::instance_key`]).
    pub key: String,
    /// Its request series, looked up on its first answered request.
    pub series: OnceLock<ServiceSeries>,
}

impl Resolved {
    pub(super) fn new(record: ServiceRecord) -> Arc<Self> {
        let key = record.instance_key();
        Arc::new(Self {
            record,
            key,
            series: OnceLock::new(),
        })
    }
}

struct State {
    cache: TtlCache<String, Arc<Resolved>>,
    /// Names being refreshed in the background (one refresh per name at a time).
    refreshing: HashSet<String>,
    /// Names being looked up on the request path, each behind a lock its waiters share.
    fetching: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

impl Records {
    pub(super) fn new(node: Node, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            node,
            state: Mutex::new(State {
                cache: TtlCache::new(ttl, NEGATIVE_TTL),
                refreshing: HashSet::new(),
                fetching: HashMap::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record of `service`: `Some(record)`, `None` if it does not exist, an error if the
    /// lookup cannot be asked.
    pub(super) async fn resolve(
        self: &Arc<Self>,
        service: &str,
    ) -> Result<Option<Arc<Resolved>>, String> {
        if let Some(cached) = self.cached(service) {
            return Ok(cached);
        }
        // A miss: one lookup per name however many requests missed at once; the others wait
        // for it and read the cache it filled.
        let turn = {
            let mut state = self.state();
            Arc::clone(state.fetching.entry(service.to_owned()).or_default())
        };
        let _turn = turn.lock().await;
        if let Some(cached) = self.cached(service) {
            return Ok(cached);
        }
        let fetched = fetch_record(&self.node, service).await;
        let mut state = self.state();
        state.fetching.remove(service);
        let resolved = fetched?.map(Resolved::new);
        state
            .cache
            .insert(service.to_owned(), resolved.clone(), Instant::now());
        Ok(resolved)
    }

    /// What the cache says of `service` (`Some(None)`: known not to exist), starting a
    /// background refresh when one is due; `None` on a miss.
    fn cached(self: &Arc<Self>, service: &str) -> Option<Option<Arc<Resolved>>> {
        let cached = {
            let mut state = self.state();
            let read = match state.cache.get(service, Instant::now()) {
                Read::Found { value, refresh_due } => Some((Some(Arc::clone(value)), refresh_due)),
                Read::Absent => Some((None, false)),
                Read::Miss => None,
            };
            if let Some((_, true)) = read
                && state.refreshing.insert(service.to_owned())
            {
                let (this, service) = (Arc::clone(self), service.to_owned());
                tokio::spawn(async move {
                    let fetched = fetch_record(&this.node, &service).await;
                    let mut state = this.state();
                    if let Ok(record) = fetched {
                        let resolved = record.map(Resolved::new);
                        state
                            .cache
                            .insert(service.clone(), resolved, Instant::now());
                    }
                    state.refreshing.remove(&service);
                });
            }
            read
        };
        cached.map(|(record, _)| record)
    }
}
