//! One request along the whole path, in one process with real sockets: client -> ingress
//! (HTTP) -> lookup (overlay) -> chosen instance's sidecar (QUIC) -> service (HTTP) and back.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

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
    overlay::{BootstrapAddr, Node, NodeConfig},
    rpc::serve_node_info,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use libp2p::identity::Keypair;
use proxy::{
    forward::Sidecar,
    ingress::{Ingress, IngressSettings},
    metrics::{Activity, IngressMetrics},
    transport::Transport,
};
use tokio_util::sync::CancellationToken;

const LOOPBACK: &str = "127.0.0.1:0";

/// An overlay node; a proxy's QUIC transport must use the same `keypair` (its data plane
/// proves the node's identity).
async fn node(
    role: &str,
    bootstraps: &[BootstrapAddr],
    keypair: Keypair,
    data_plane: Option<SocketAddr>,
) -> Node {
    let mut config = NodeConfig::new(role, keypair);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.bootstraps = bootstraps.to_vec();
    config.data_plane = data_plane;
    let node = Node::start(config).await.unwrap();
    serve_node_info(&node);
    node
}

/// The example service: "Hello, world", with the target it was asked for in a header.
async fn hello_service() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let target = request
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    let response = Response::builder()
                        .header("x-target", target)
                        .body(Full::new(Bytes::from("Hello, world\n")))
                        .unwrap();
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn get(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: String,
) -> (StatusCode, http::HeaderMap, String) {
    let response = client.get(url.parse().unwrap()).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn a_request_goes_through_ingress_and_sidecar_to_the_service_and_back() {
    let bootstrap = node("bootstrap", &[], Keypair::generate_ed25519(), None).await;
    let addr: BootstrapAddr = bootstrap.listen_addrs().await[0]
        .to_string()
        .parse()
        .unwrap();
    let boot = std::slice::from_ref(&addr);

    // A lookup service, in process.
    let data = tempfile::tempdir().unwrap();
    let lookup = node("hl-service", boot, Keypair::generate_ed25519(), None).await;
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

    // Register the service: its artifact first, then its record.
    let artifact = b"a static hello-world executable".to_vec();
    let digest = Digest::of(&artifact);
    let admin = node("hl-cli", boot, Keypair::generate_ed25519(), None).await;
    let lookup_peer = control::lookup::client::lookup_services(&admin)
        .await
        .unwrap()[0];
    let mut source = futures::io::Cursor::new(artifact.clone());
    transfer::upload(
        &admin,
        lookup_peer,
        digest,
        artifact.len() as u64,
        &mut source,
        |_| {},
    )
    .await
    .unwrap();
    let record = ServiceRecord {
        version: RECORD_VERSION,
        name: "hello-world-server".into(),
        digest,
        size: artifact.len() as u64,
        artifact: Artifact::Executable {
            command: vec!["helloworldserver".into()],
        },
        limits: Limits::default(),
        unknown: Default::default(),
    };
    let added = admin
        .request::<LookupProtocol>(lookup_peer, &LookupRequest::Add(record))
        .await
        .unwrap();
    assert_eq!(added, LookupResponse::Added);

    // One instance: the service and its sidecar, advertising the service's digest.
    let upstream = hello_service().await;
    let sidecar_key = Keypair::generate_ed25519();
    let sidecar_transport =
        Arc::new(Transport::bind(LOOPBACK.parse().unwrap(), sidecar_key.clone(), None).unwrap());
    let sidecar_node = node(
        "proxy",
        boot,
        sidecar_key,
        Some(sidecar_transport.local_addr().unwrap()),
    )
    .await;
    sidecar_node.advertise(&digest.to_string()).await;
    let sidecar = Sidecar::new(upstream, Activity::new());
    let accepting = Arc::clone(&sidecar_transport);
    tokio::spawn(async move {
        while let Some(accepted) = accepting.accept().await {
            if let Ok((_, connection)) = accepted {
                tokio::spawn(Arc::clone(&sidecar).serve_connection(connection));
            }
        }
    });

    // The ingress.
    let ingress_key = Keypair::generate_ed25519();
    let ingress_node = node("proxy", boot, ingress_key.clone(), None).await;
    let ingress_transport =
        Arc::new(Transport::bind(LOOPBACK.parse().unwrap(), ingress_key, None).unwrap());
    let ingress = Ingress::new(
        ingress_node,
        ingress_transport,
        IngressSettings::default(),
        IngressMetrics::register(&registry).unwrap(),
        Activity::new(),
    );
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(ingress.serve(listener, CancellationToken::new()));

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    // The sidecar's announcement may take a moment to spread: retry within a deadline.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(20);
    let (status, headers, body) = loop {
        let answer = get(
            &client,
            format!("http://127.0.0.1:{port}/hello-world-server/greet?who=you"),
        )
        .await;
        if answer.0 == StatusCode::OK || tokio::time::Instant::now() > give_up {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "Hello, world\n");
    assert_eq!(headers["x-target"], "/greet?who=you");
    assert!(
        headers
            .get_all("via")
            .iter()
            .any(|v| v.to_str().unwrap().contains("multi-tier-cloud"))
    );

    let (status, _, body) = get(&client, format!("http://127.0.0.1:{port}/no-such-service/")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no-such-service"), "{body}");
    let (status, _, _) = get(&client, format!("http://127.0.0.1:{port}/")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
