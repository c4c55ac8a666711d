//! The ingress: HTTP/1.1 and h2c on a local port; each request `/<service>/<rest>` is resolved
//! through the lookup (cached), sent to the instance chosen from live RTTs over an
//! authenticated QUIC connection, and the response streamed back.

use std::{
    cell::Cell,
    collections::HashMap,
    convert::Infallible,
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use control::{
    common::http::accept_until,
    lookup::{
        ServiceRecord,
        client::{self, ClientError},
        protocol::{LookupRequest, LookupResponse},
    },
    overlay::Node,
    rpc::NodeInfoProtocol,
};
use futures::StreamExt;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use libp2p::PeerId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    cache::{Read, TtlCache},
    config::perf::{Overrides, PerfConfig},
    forward::forward,
    framing::RequestHead,
    rewrite::{forward_request_headers, forward_response_headers, split_target},
    select::Chooser,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// How long an unknown service is remembered as unknown.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// How long a service with no instance found waits before its instances are looked for again.
const EMPTY_RETRY: Duration = Duration::from_secs(1);
/// How often the instances of a service are looked for again (in the background) while it is
/// in use.
const INSTANCES_REFRESH: Duration = Duration::from_secs(10);

/// The instances of one service (by its digest) and where their data planes listen.
struct Instances {
    chooser: Chooser<PeerId>,
    addrs: HashMap<PeerId, SocketAddr>,
    refreshed: Option<Instant>,
    /// A background discovery is running (one at a time per service).
    refreshing: bool,
}

pub struct Ingress {
    node: Node,
    transport: Arc<crate::transport::Transport>,
    perf: PerfConfig,
    records: Mutex<Records>,
    instances: Mutex<HashMap<String, Instances>>,
}

/// Resolved service records, and the names being refreshed in the background (one refresh
/// per name at a time).
struct Records {
    cache: TtlCache<String, ServiceRecord>,
    refreshing: std::collections::HashSet<String>,
}

fn plain(status: StatusCode, text: String) -> Response<ResponseBody> {
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

thread_local! {
    static RANDOM: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
}

/// A number below `n` from a per-thread xorshift generator: choosing instances needs speed,
/// not cryptographic quality.
fn random_below(n: usize) -> usize {
    RANDOM.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        (x % n as u64) as usize
    })
}

impl Ingress {
    pub fn new(
        node: Node,
        transport: Arc<crate::transport::Transport>,
        perf: PerfConfig,
        record_ttl: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            transport,
            perf,
            records: Mutex::new(Records {
                cache: TtlCache::new(record_ttl, NEGATIVE_TTL),
                refreshing: Default::default(),
            }),
            instances: Mutex::default(),
        })
    }

    /// Serves HTTP/1.1 and h2c on `listener` until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        accept_until(listener, shutdown, "ingress", move |stream, client| {
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let this = Arc::clone(&this);
                    async move { Ok::<_, Infallible>(this.handle(request, client).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(error) = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%error, "ingress connection failed");
                }
            });
        })
        .await;
    }

    /// Answers one client request.
    pub async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ResponseBody> {
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let (service, target) = match split_target(path) {
            Ok((service, target)) => (service.to_owned(), target),
            Err(error) => return plain(StatusCode::BAD_REQUEST, error.to_string()),
        };
        let record = match self.resolve(&service).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                return plain(
                    StatusCode::NOT_FOUND,
                    format!("no service named '{service}'"),
                );
            }
            Err(reason) => {
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the lookup service is unreachable: {reason}"),
                );
            }
        };
        let Some((peer, addr)) = self.choose(&record).await else {
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no instance of '{service}' is running"),
            );
        };
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        forward_request_headers(&mut headers, client.ip());
        let head = RequestHead {
            method: parts.method,
            target,
            headers,
        };
        self.with_instances(&record, |instances| instances.chooser.start(&peer));
        let begin = Instant::now();
        let result = match self.transport.connect(peer, addr).await {
            Ok(connection) => forward(&connection, &head, body)
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        let now = Instant::now();
        self.with_instances(&record, |instances| {
            instances.chooser.finish(&peer, result.is_ok(), now);
            if result.is_ok() {
                instances.chooser.record_rtt(&peer, now - begin, now);
            }
        });
        match result {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                forward_response_headers(&mut parts.headers);
                Response::from_parts(parts, body.map_err(BoxError::from).boxed())
            }
            Err(reason) => plain(
                StatusCode::BAD_GATEWAY,
                format!("instance {peer} of '{service}' failed: {reason}"),
            ),
        }
    }

    /// The record of `service`: from the cache, else from the lookup. A refresh due is done
    /// in the background, so a warm cache never waits on the lookup.
    async fn resolve(self: &Arc<Self>, service: &str) -> Result<Option<ServiceRecord>, String> {
        let now = Instant::now();
        let cached = {
            let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
            let read = match records.cache.get(&service.to_owned(), now) {
                Read::Found { value, refresh_due } => Some((Some(value.clone()), refresh_due)),
                Read::Absent => Some((None, false)),
                Read::Miss => None,
            };
            if let Some((_, true)) = read
                && records.refreshing.insert(service.to_owned())
            {
                let (this, service) = (Arc::clone(self), service.to_owned());
                tokio::spawn(async move {
                    let fetched = fetch_record(&this.node, &service).await;
                    let mut records = this.records.lock().unwrap_or_else(|p| p.into_inner());
                    if let Ok(record) = fetched {
                        records
                            .cache
                            .insert(service.clone(), record, Instant::now());
                    }
                    records.refreshing.remove(&service);
                });
            }
            read
        };
        match cached {
            Some((record, _)) => Ok(record),
            None => {
                let record = fetch_record(&self.node, service).await?;
                let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
                records
                    .cache
                    .insert(service.to_owned(), record.clone(), Instant::now());
                Ok(record)
            }
        }
    }

    fn with_instances<T>(
        &self,
        record: &ServiceRecord,
        f: impl FnOnce(&mut Instances) -> T,
    ) -> Option<T> {
        let mut all = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        all.get_mut(&record.digest.to_string()).map(f)
    }

    /// An instance for `record` (its peer and data-plane address), discovering instances when
    /// none are known or the list is old.
    async fn choose(self: &Arc<Self>, record: &ServiceRecord) -> Option<(PeerId, SocketAddr)> {
        let limits = self.perf.limits_for(
            &record.name,
            Overrides {
                soft_rtt: record.limits.soft_rtt,
                hard_rtt: record.limits.hard_rtt,
            },
        );
        let key = record.digest.to_string();
        // Known instances are served from at once and refreshed in the background; only a
        // service with none known waits for a discovery.
        let known = {
            let mut all = self.instances.lock().unwrap_or_else(|p| p.into_inner());
            match all.get_mut(&key) {
                Some(instances) if !instances.chooser.is_empty() => {
                    let stale = instances
                        .refreshed
                        .is_none_or(|at| at.elapsed() > INSTANCES_REFRESH);
                    if stale && !instances.refreshing {
                        instances.refreshing = true;
                        let (this, key) = (Arc::clone(self), key.clone());
                        tokio::spawn(async move { this.discover(&key).await });
                    }
                    true
                }
                // None found a moment ago: do not search the DHT on every request.
                Some(instances)
                    if instances
                        .refreshed
                        .is_some_and(|at| at.elapsed() < EMPTY_RETRY) =>
                {
                    true
                }
                _ => false,
            }
        };
        if !known {
            self.discover(&key).await;
        }
        let mut all = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        let instances = all.get_mut(&key)?;
        let decision = instances
            .chooser
            .choose(Instant::now(), limits, random_below);
        let peer = decision.pick?;
        Some((peer, *instances.addrs.get(&peer)?))
    }

    /// Finds the providers of `namespace` and asks each new one where its data plane listens.
    async fn discover(&self, namespace: &str) {
        let mut providers = self.node.find_providers(namespace).await;
        let mut found = Vec::new();
        while let Some(peer) = providers.next().await {
            let known = {
                let all = self.instances.lock().unwrap_or_else(|p| p.into_inner());
                all.get(namespace)
                    .is_some_and(|i| i.addrs.contains_key(&peer))
            };
            if known {
                continue;
            }
            let Ok(info) = self.node.request::<NodeInfoProtocol>(peer, &()).await else {
                continue;
            };
            let Some(mut addr) = info.data_plane else {
                continue;
            };
            if addr.ip().is_unspecified() {
                match self.node.remote_ip(peer).await {
                    Some(ip) => addr.set_ip(ip),
                    None => continue,
                }
            }
            found.push((peer, addr));
        }
        let now = Instant::now();
        let mut all = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        let instances = all
            .entry(namespace.to_owned())
            .or_insert_with(|| Instances {
                chooser: Chooser::new(self.perf.policy),
                addrs: HashMap::new(),
                refreshed: None,
                refreshing: false,
            });
        for (peer, addr) in found {
            instances.chooser.add(peer, now);
            // The overlay's ping RTT is a first sample until requests measure the path.
            if let Some(stats) = self.node.rtt(&peer) {
                instances.chooser.record_rtt(&peer, stats.ewma, now);
            }
            instances.addrs.insert(peer, addr);
        }
        instances.refreshed = Some(now);
        instances.refreshing = false;
    }
}

/// Asks the lookup for `service`: `Some(record)`, `None` if it does not exist.
async fn fetch_record(node: &Node, service: &str) -> Result<Option<ServiceRecord>, String> {
    match client::call(node, &LookupRequest::Get(service.to_owned())).await {
        Ok((_, LookupResponse::Found(record))) => Ok(Some(record)),
        Ok((_, LookupResponse::NotFound)) => Ok(None),
        Ok((_, LookupResponse::Failed(reason))) => Err(reason),
        Ok((_, other)) => Err(format!("unexpected answer {other:?}")),
        Err(error @ (ClientError::NoLookupService { .. } | ClientError::AllFailed(_))) => {
            Err(error.to_string())
        }
    }
}
