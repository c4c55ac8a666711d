//! One request along the whole path, in one process with real sockets (the library, without
//! the `proxy` program): client -> ingress (HTTP) -> lookup (overlay) -> chosen instance's
//! sidecar (QUIC) -> service (HTTP) and back.

mod support;

use std::{sync::Arc, time::Duration};

use control::lookup::Limits;
use http::StatusCode;
use libp2p::identity::Keypair;
use proxy::{
    ingress::{Ingress, IngressSettings},
    metrics::{Activity, IngressMetrics},
    sidecar::Sidecar,
    transport::Transport,
};
use support::*;
use tokio_util::sync::CancellationToken;

const LOOPBACK: &str = "127.0.0.1:0";

/// An overlay node whose data plane listens at `data_plane`; the proxy's QUIC transport must
/// use the same `keypair` (its data plane proves the node's identity).
async fn proxy_node(
    network: &Network,
    keypair: Keypair,
    data_plane: Option<std::net::SocketAddr>,
) -> control::overlay::Node {
    let mut config = testkit::node_config("proxy", keypair, std::slice::from_ref(&network.boot));
    config.data_plane = data_plane;
    let node = control::overlay::Node::start(config).await.unwrap();
    control::rpc::serve_node_info(&node);
    node
}

#[testkit::deadline_test]
async fn a_request_goes_through_ingress_and_sidecar_to_the_service_and_back() {
    let network = Network::start().await;
    let record = network
        .register("hello-world-server", Limits::default())
        .await;

    // One instance: the service and its sidecar, advertising the service's instance key.
    let upstream = test_service("hello").await;
    let sidecar_key = Keypair::generate_ed25519();
    let sidecar_transport =
        Arc::new(Transport::bind(LOOPBACK.parse().unwrap(), sidecar_key.clone(), None).unwrap());
    let sidecar_node = proxy_node(
        &network,
        sidecar_key,
        Some(sidecar_transport.local_addr().unwrap()),
    )
    .await;
    sidecar_node.advertise(&record.instance_key()).await;
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
    let ingress_node = proxy_node(&network, ingress_key.clone(), None).await;
    let ingress_transport =
        Arc::new(Transport::bind(LOOPBACK.parse().unwrap(), ingress_key, None).unwrap());
    let registry = prometheus::Registry::new();
    let ingress = Ingress::new(
        ingress_node,
        ingress_transport,
        IngressSettings::default(),
        IngressMetrics::register(&registry).unwrap(),
        Activity::new(),
    );
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(ingress.serve(listener, CancellationToken::new()));

    // The sidecar's announcement may take a moment to spread: ask until it answers.
    wait_until("the instance answers", Duration::from_secs(20), || {
        let addr = addr.clone();
        async move {
            http_get(&addr, "/hello-world-server/tag?who=you")
                .await
                .is_some_and(|(status, body)| status == 200 && body == "hello")
        }
    })
    .await;

    let (status, body) = http_get(&addr, "/no-such-service/").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND.as_u16());
    assert!(body.contains("no-such-service"), "{body}");
    let (status, _) = http_get(&addr, "/").await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST.as_u16());
}
