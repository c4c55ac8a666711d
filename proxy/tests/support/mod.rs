//! Helpers of the proxy's integration tests: the control side of a network in this process (a
//! bootstrap node and a lookup service with services registered), test services, `proxy`
//! processes, and a UDP relay that delays the data plane (netem is not available here).

#![allow(dead_code, unused_imports)] // Each test file uses its own subset.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use control::{
    blob::{BlobStore, Digest, transfer},
    lookup::{
        Artifact, Limits, ServiceRecord,
        protocol::{LookupProtocol, LookupRequest, LookupResponse, NAMESPACE},
        record::RECORD_VERSION,
        service::{LookupMetrics, LookupService},
        store::{EmbeddedStore, Store},
    },
    overlay::{BootstrapAddr, Node},
    rpc::serve_node_info,
};
use futures::stream;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use libp2p::identity::Keypair;
use tokio::net::UdpSocket;

pub use testkit::*;

pub const PROXY: &str = env!("CARGO_BIN_EXE_proxy");

/// An overlay node on loopback with test timers, serving node info.
pub async fn node(
    role: &str,
    bootstraps: &[BootstrapAddr],
    keypair: Keypair,
    psk: Option<&str>,
) -> Node {
    let mut config = node_config(role, keypair, bootstraps);
    config.network_key = psk.map(control::overlay::NetworkKey::from_passphrase);
    let node = Node::start(config).await.unwrap();
    serve_node_info(&node);
    node
}

/// The control side of a network, in this process: a bootstrap node and a lookup service.
pub struct Network {
    pub bootstrap: Node,
    pub boot: BootstrapAddr,
    pub lookup: Node,
    admin: Node,
    _data: tempfile::TempDir,
}

impl Network {
    pub async fn start() -> Self {
        Self::start_with_psk(None).await
    }

    /// A private network: every node, and every proxy started on it, needs `psk`.
    pub async fn start_with_psk(psk: Option<&str>) -> Self {
        let bootstrap = node("bootstrap", &[], Keypair::generate_ed25519(), psk).await;
        let boot = bootstrap_of(&bootstrap).await;
        let data = tempfile::tempdir().unwrap();
        let lookup = node(
            "hl-service",
            std::slice::from_ref(&boot),
            Keypair::generate_ed25519(),
            psk,
        )
        .await;
        let blobs = Arc::new(BlobStore::open(&data.path().join("blobs")).unwrap());
        let registry = prometheus::Registry::new();
        let service = Arc::new(LookupService::new(
            Store::Embedded(EmbeddedStore::open(&data.path().join("lookup.redb")).unwrap()),
            Arc::clone(&blobs),
            LookupMetrics::register(&registry).unwrap(),
        ));
        lookup.serve::<LookupProtocol, _, _>(move |_, request| {
            let service = Arc::clone(&service);
            async move { service.handle(request).await }
        });
        transfer::serve(
            &lookup,
            blobs,
            transfer::BlobCounters::register(&registry).unwrap(),
        )
        .await;
        lookup.advertise(NAMESPACE).await;
        let admin = node(
            "hl-cli",
            std::slice::from_ref(&boot),
            Keypair::generate_ed25519(),
            psk,
        )
        .await;
        Self {
            bootstrap,
            boot,
            lookup,
            admin,
            _data: data,
        }
    }

    pub fn boot_arg(&self) -> String {
        self.boot.to_string()
    }

    /// Registers a service `name` (an executable artifact whose bytes name it) with `limits`.
    pub async fn register(&self, name: &str, limits: Limits) -> ServiceRecord {
        let artifact = format!("the executable of {name}").into_bytes();
        self.register_artifact(name, artifact, vec![name.into()], limits)
            .await
    }

    /// Registers a service `name` run as `command` from `artifact` (which other services
    /// may share).
    pub async fn register_artifact(
        &self,
        name: &str,
        artifact: Vec<u8>,
        command: Vec<String>,
        limits: Limits,
    ) -> ServiceRecord {
        let digest = Digest::of(&artifact);
        let lookup_peer = control::lookup::client::lookup_services(&self.admin)
            .await
            .unwrap()[0];
        // Right after the network starts, the DHT may name the lookup service before its
        // address is known here (the dial the search started still under way: "no addresses
        // for peer"); an unreachable peer is asked again for a while, as clients do.
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut source = futures::io::Cursor::new(artifact.clone());
            let uploaded = transfer::upload(
                &self.admin,
                lookup_peer,
                digest,
                artifact.len() as u64,
                &mut source,
                |_| {},
            )
            .await;
            match uploaded {
                Ok(()) => break,
                Err(transfer::TransferError::Unreachable { .. })
                    if tokio::time::Instant::now() < give_up =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("uploading the artifact of {name}: {error}"),
            }
        }
        let record = ServiceRecord {
            version: RECORD_VERSION,
            name: name.into(),
            digest,
            size: artifact.len() as u64,
            artifact: Artifact::Executable { command },
            limits,
            protocol: Default::default(),
            unknown: Default::default(),
        };
        let added = self
            .admin
            .request::<LookupProtocol>(lookup_peer, &LookupRequest::Add(record.clone()))
            .await
            .unwrap();
        assert_eq!(added, LookupResponse::Added);
        record
    }
}

type TestBody = BoxBody<Bytes, hyper::Error>;

fn full(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A service for tests, on a loopback port:
/// - `/tag`: its tag (which instance answered);
/// - `/echo`: the request body streamed back, with what arrived in `x-echo-*` headers;
/// - `/status/N`: an empty response with status N;
/// - `/trailers`: a body and a trailer `x-checksum: ok`;
/// - `/bytes/N`: N bytes, streamed in 64 KiB chunks;
/// - `/drain`: reads the request body, answers its length.
pub async fn test_service(tag: &'static str) -> SocketAddr {
    let service = TestService::start(tag, Duration::ZERO).await;
    let addr = service.addr;
    // Lives as long as the test.
    std::mem::forget(service);
    addr
}

/// A test service ([`test_service`]) that answers after `delay` and can be killed: its
/// port then refuses connections and its open connections are closed.
pub struct TestService {
    pub addr: SocketAddr,
    serving: tokio::task::JoinHandle<()>,
}

impl TestService {
    pub async fn start(tag: &'static str, delay: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(async move {
            // Connections are served in this set, so that killing the service ends them too.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                connections.spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| async move {
                        tokio::time::sleep(delay).await;
                        answer(tag, request).await
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self { addr, serving }
    }

    /// Kills the service: nothing listens on its port any more.
    pub fn kill(&self) {
        self.serving.abort();
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        self.serving.abort();
    }
}

async fn answer(
    tag: &'static str,
    request: Request<Incoming>,
) -> Result<Response<TestBody>, Infallible> {
    let path = request.uri().path().to_owned();
    let mut response = Response::new(full(""));
    if path == "/tag" {
        *response.body_mut() = full(tag);
    } else if path == "/echo" {
        let (parts, body) = request.into_parts();
        let names: Vec<_> = parts.headers.keys().map(|k| k.as_str()).collect();
        let echo = response.headers_mut();
        echo.insert("x-echo-method", parts.method.as_str().parse().unwrap());
        let target = parts.uri.path_and_query().unwrap().as_str();
        echo.insert("x-echo-target", target.parse().unwrap());
        echo.insert("x-echo-names", names.join(",").parse().unwrap());
        for name in ["x-custom", "via", "x-forwarded-for", "te"] {
            if let Some(value) = parts.headers.get(name) {
                echo.insert(
                    http::HeaderName::from_bytes(format!("x-echo-{name}").as_bytes()).unwrap(),
                    value.clone(),
                );
            }
        }
        *response.body_mut() = body.boxed();
    } else if let Some(code) = path.strip_prefix("/status/") {
        *response.status_mut() = StatusCode::from_u16(code.parse().unwrap()).unwrap();
    } else if path == "/trailers" {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("ok"));
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"data"))),
            Ok(Frame::trailers(trailers)),
        ];
        // HTTP/1.1 sends only the trailer fields the head announced.
        response
            .headers_mut()
            .insert("trailer", HeaderValue::from_static("x-checksum"));
        *response.body_mut() = StreamBody::new(stream::iter(frames)).boxed();
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let total: usize = n.parse().unwrap();
        const CHUNK: usize = 64 * 1024;
        let chunk = Bytes::from(vec![7u8; CHUNK]);
        let chunks = stream::iter((0..total.div_ceil(CHUNK)).map(move |i| {
            let len = CHUNK.min(total - i * CHUNK);
            Ok::<_, hyper::Error>(Frame::data(chunk.slice(..len)))
        }));
        *response.body_mut() = StreamBody::new(chunks).boxed();
    } else if path == "/drain" {
        let mut body = request.into_body();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map(|f| f.into_data()) {
                total += data.map_or(0, |d| d.len());
            }
        }
        *response.body_mut() = full(total.to_string());
    } else {
        *response.status_mut() = StatusCode::NOT_FOUND;
    }
    Ok(response)
}

/// A running `proxy` and the addresses it printed.
pub struct Proxy {
    pub process: Process,
    /// HOST:PORT of its ingress.
    pub ingress: String,
    /// HOST:PORT of its /metrics.
    pub metrics: String,
    /// Its data-plane (QUIC) address.
    pub quic: SocketAddr,
}

/// Starts `proxy` on loopback, joined to `network`, with `args` (options and positionals)
/// after the common flags; waits until it printed its addresses.
pub async fn start_proxy(network: &Network, args: &[&str]) -> Proxy {
    start_proxy_with_env(network, args, &[]).await
}

/// The flags every proxy of a test starts with (joined to the network at `boot`, a throw-away
/// identity, any free ports on loopback), then `args`.
pub fn proxy_args<'a>(boot: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "--bootstrap",
        boot,
        "--ephemeral",
        "--p2p-listen-addr",
        "127.0.0.1:0",
        "--prom-listen-addr",
        "127.0.0.1:0",
    ];
    all.extend_from_slice(args);
    all
}

pub async fn start_proxy_with_env(network: &Network, args: &[&str], env: &[(&str, &str)]) -> Proxy {
    let boot = network.boot_arg();
    let all = proxy_args(&boot, args);
    let mut env = env.to_vec();
    // MTC_TEST_LOG at build time (e.g. "proxy=debug") makes the proxies say more.
    env.push(("RUST_LOG", option_env!("MTC_TEST_LOG").unwrap_or("warn")));
    let process = Process::spawn(PROXY, &all, &env);
    let deadline = Duration::from_secs(30);
    let after = |line: String, prefix: &str| {
        line[line.find(prefix).unwrap() + prefix.len()..]
            .split('/')
            .next()
            .unwrap()
            .to_owned()
    };
    let metrics = after(
        process.line_containing("metrics: http://", deadline).await,
        "metrics: http://",
    );
    let ingress = after(
        process.line_containing("ingress: http://", deadline).await,
        "ingress: http://",
    );
    let quic = process
        .line_containing("data plane (QUIC): ", deadline)
        .await;
    let quic = quic["data plane (QUIC): ".len()..].parse().unwrap();
    Proxy {
        process,
        ingress,
        metrics,
        quic,
    }
}

/// A hyper HTTP/1.1 client.
pub fn http1_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    BoxBody<Bytes, Infallible>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// An HTTP/2 client with prior knowledge (h2c).
pub fn h2c_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    BoxBody<Bytes, Infallible>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn body(bytes: impl Into<Bytes>) -> BoxBody<Bytes, Infallible> {
    Full::new(bytes.into()).boxed()
}

/// The value of the sample `name{labels}` in a Prometheus text exposition, if present.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|line| {
            line.starts_with(name_and_labels) && line[name_and_labels.len()..].starts_with(' ')
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// A program built beside the `proxy` binary (the workspace's own, e.g. `allocator`); the
/// workspace must be built (`cargo build --workspace`, as `cargo test --workspace` does).
pub fn sibling(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(PROXY).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// A real `allocator` (process runtime) on `network`, its instances' proxies being `proxy`,
/// with fast checks; its instances are stopped when it is dropped, even if the test failed.
pub struct RealAllocator {
    pub process: Process,
    pub peer: libp2p::PeerId,
    /// HOST:PORT of its /metrics.
    pub metrics: String,
    data: tempfile::TempDir,
}

impl RealAllocator {
    pub async fn start(network: &Network, extra: &[&str]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let boot = network.boot_arg();
        let allocator = sibling("allocator");
        let common = allocator_args(&boot, "process", PROXY, data.path().to_str().unwrap());
        let mut args: Vec<&str> = common.iter().map(String::as_str).collect();
        args.push("--ephemeral");
        args.extend_from_slice(extra);
        let daemon = start_daemon(allocator.to_str().unwrap(), &args).await;
        Self {
            peer: daemon.bootstrap.peer,
            metrics: daemon.metrics,
            process: daemon.process,
            data,
        }
    }

    /// Start requests it answered, by outcome (`started`, `reused`, `refused`).
    pub async fn starts(&self, outcome: &str) -> f64 {
        let text = http_get(&self.metrics, "/metrics").await.unwrap().1;
        metric(
            &text,
            &format!("allocator_starts_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0)
    }

    /// Every start request it answered.
    pub async fn asked(&self) -> f64 {
        self.starts("started").await + self.starts("reused").await + self.starts("refused").await
    }
}

impl Drop for RealAllocator {
    fn drop(&mut self) {
        // Its instances run in sessions of their own: stop every process under its data.
        let _ = std::process::Command::new("pkill")
            .args(["-9", "-f"])
            .arg(self.data.path())
            .status();
    }
}

/// Registers `name` as the project's hello-world server (an executable), run by a real
/// allocator: it answers every request with "Hello, world\n".
pub async fn register_hello(network: &Network, name: &str) -> ServiceRecord {
    let bytes = std::fs::read(sibling("helloworldserver")).unwrap();
    network
        .register_artifact(
            name,
            bytes,
            vec!["helloworldserver".into(), "$SERVICE_PORT".into()],
            Limits::default(),
        )
        .await
}
