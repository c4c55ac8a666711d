//! The `proxy` program in service mode, seen from outside: it advertises its instance key only
//! once its service answers, and its probes and /metrics say whether the service does.

mod support;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use control::{lookup::Limits, overlay::BootstrapAddr, rpc::NodeInfoProtocol};
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use libp2p::{PeerId, identity::Keypair};
use proxy::{forward::probe, framing::Health, transport::Transport};
use support::*;

const DEADLINE: Duration = Duration::from_secs(30);
/// What the sidecar logs (at warn, every 10 s) while it has the record but the service has
/// not answered: the moment it would have advertised without waiting.
const WAITING: &str = "the service does not answer yet";

/// A service answering "up" on `addr`.
async fn serve_at(addr: SocketAddr) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"up"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// A sidecar as `start_proxy` starts one, logging what its program does at info (so that
/// it says when it stops advertising).
async fn start_sidecar(network: &Network, service: &str, upstream: &str) -> Proxy {
    let boot = network.boot_arg();
    let args = proxy_args(
        &boot,
        &["--quic-addr", "127.0.0.1:0", "0", service, upstream],
    );
    let process = Process::spawn(PROXY, &args, &[("RUST_LOG", "warn,proxy::app=info")]);
    let after = |line: String, prefix: &str| line[prefix.len()..].to_owned();
    let metrics = after(
        process.line_containing("metrics: http://", DEADLINE).await,
        "metrics: http://",
    );
    let metrics = metrics.split('/').next().unwrap().to_owned();
    let ingress = after(
        process.line_containing("ingress: http://", DEADLINE).await,
        "ingress: http://",
    );
    let quic = after(
        process
            .line_containing("data plane (QUIC): ", DEADLINE)
            .await,
        "data plane (QUIC): ",
    );
    Proxy {
        process,
        ingress,
        metrics,
        quic: quic.parse().unwrap(),
    }
}

async fn metrics_of(proxy: &Proxy) -> String {
    http_get(&proxy.metrics, "/metrics").await.unwrap().1
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_is_advertised_only_once_its_service_answers() {
    let network = Network::start().await;
    let record = network.register("late-starter", Limits::default()).await;
    let key = record.instance_key();
    let service_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let upstream = service_addr.to_string();
    let mut side = start_sidecar(&network, "late-starter", &upstream).await;
    let address: BootstrapAddr = side
        .process
        .line_containing("/p2p/", DEADLINE)
        .await
        .parse()
        .unwrap();
    let peer: PeerId = address.peer;
    // A node that reaches the sidecar directly (to ask what it advertises) and through the
    // DHT (to look for it as ingresses do).
    let seeker = node(
        "test",
        &[network.boot.clone(), address],
        Keypair::generate_ed25519(),
        None,
    )
    .await;
    let advertised = || async {
        seeker
            .request::<NodeInfoProtocol>(peer, &())
            .await
            .map(|info| info.advertised)
            .unwrap_or_default()
    };
    let quic = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        Keypair::generate_ed25519(),
        None,
    )
    .unwrap();
    let connection = quic.connect(peer, side.quic).await.unwrap();

    // The sidecar has the record and waits for its service (it says so after 10 s): not
    // advertised, not found, and its probes and metrics say the service is down.
    wait_until("the sidecar waiting for its service", DEADLINE, || {
        std::future::ready(side.process.stderr().contains(WAITING))
    })
    .await;
    assert!(
        !advertised().await.contains(&key),
        "{:?}",
        advertised().await
    );
    assert!(!providers(&seeker, &key).await.contains(&peer));
    assert_eq!(probe(&connection).await.unwrap().1, Health::Down);
    let text = metrics_of(&side).await;
    assert_eq!(metric(&text, "proxy_service_up"), Some(0.0), "{text}");

    // The service comes up: the instance is advertised under its key (not the digest), and
    // found.
    serve_at(service_addr).await;
    wait_until("the instance key advertised", DEADLINE, || async {
        advertised().await.contains(&key)
    })
    .await;
    assert!(!advertised().await.contains(&record.digest.to_string()));
    wait_until("the instance found under its key", DEADLINE, || async {
        providers(&seeker, &key).await.contains(&peer)
    })
    .await;
    assert_eq!(probe(&connection).await.unwrap().1, Health::Serving);
    let text = metrics_of(&side).await;
    assert_eq!(metric(&text, "proxy_service_up"), Some(1.0), "{text}");
    assert!(
        metric(&text, "proxy_probes_answered_total").is_some_and(|n| n >= 2.0),
        "{text}"
    );

    // On SIGTERM it stops advertising before its node stops (others forget it when their
    // records expire), and exits cleanly.
    let pid = side.process.child.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(DEADLINE, side.process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{}", side.process.stderr());
    // (Its standard error is read by a task of its own: the last lines may still be coming.)
    wait_until(
        "the sidecar saying it stopped advertising",
        DEADLINE,
        || {
            let log = side.process.stderr();
            std::future::ready(
                log.lines()
                    .any(|l| l.contains("stopped advertising this instance") && l.contains(&key)),
            )
        },
    )
    .await;
}
