//! The allocator's Docker runtime against the real engine of this machine: the test image
//! (sidecar-image/build.sh: the static proxy and helloworldserver in a FROM-scratch image) is
//! registered through hl-service from its `docker save` tarball and removed from the engine,
//! so the allocator must fetch it from the overlay, verify it and load it. Without an engine
//! it fails, unless MTC_SKIP_DOCKER=1 (see `docker_engine`).

mod support;

use std::time::Duration;

use control::{
    allocator::protocol::{StartRequest, StartResponse},
    lookup::ServiceRecord,
};
use support::*;

const DEADLINE: Duration = Duration::from_secs(60);
const IMAGE_TAG: &str = "multi-tier-cloud/hello-world-server:latest";

async fn metrics_value(daemon: &Daemon, series: &str) -> Option<f64> {
    let text = http_get(&daemon.metrics, "/metrics").await?.1;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_instances_load_from_the_overlay_serve_are_culled_and_adopted() {
    if !docker_engine() {
        return;
    }
    let tarball = test_image();
    let network = start_network().await;
    let (ok, _, err) = cli(
        &network,
        &[
            "add",
            "--file",
            tarball.to_str().unwrap(),
            "hello-world-server",
            "--cpu",
            "0.5",
            "--memory",
            "64MiB",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let (_, out, _) = cli(&network, &["get", "--json", "hello-world-server"]).await;
    let record = ServiceRecord::from_json(out.as_bytes()).unwrap();
    let control::lookup::Artifact::DockerArchive { image_id, .. } = &record.artifact else {
        panic!("not an image record: {record:?}");
    };
    // The engine forgets the image: the allocator has to bring it from the overlay.
    docker(&["rmi", "-f", IMAGE_TAG]);
    docker(&["rmi", "-f", &image_id.to_string()]);
    assert!(!docker(&["image", "inspect", &image_id.to_string()]).0);

    let dir = tempfile::tempdir().unwrap();
    let range = ["--port-range", "21200-21299"];
    let allocator = start_allocator(
        &network,
        dir.path(),
        "docker",
        &[&["--idle-timeout", "1h"][..], &range].concat(),
    )
    .await;
    let peer = allocator.peer;
    let containers = Containers(peer.to_string());

    // 20 start requests at once while nothing runs yet, as from 20 proxies that all missed
    // at the same moment: one image load, one container, 20 answers naming it.
    assert!(
        containers.ids().is_empty(),
        "nothing runs before the first start"
    );
    let asker = asker_of(&network.monitor.bootstrap, peer).await;
    let request = StartRequest {
        service: record.name.clone(),
        digest: record.digest.to_string(),
    };
    let answers = futures::future::join_all((0..20).map(|_| ask(&asker, peer, &request))).await;
    for answer in answers {
        match answer {
            Ok(StartResponse::Started { .. }) => {}
            other => panic!(
                "{other:?}; the allocator ({:?}) said: {}",
                allocator.daemon.process.child.id(),
                allocator.daemon.process.stderr()
            ),
        }
    }
    let ids = containers.ids();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(
        docker(&["image", "inspect", &image_id.to_string()]).0,
        "loaded"
    );

    // request -> (the running instance) -> response, through an ingress proxy.
    let (_ingress, addr) = start_ingress(&network).await;
    let (status, body) = http_get(&addr, "/hello-world-server/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "Hello, world\n"));
    assert_eq!(containers.ids(), ids, "the ingress used the same instance");

    // As asked: environment, limits, labels, host networking.
    let (_, inspect) = docker(&["inspect", &ids[0]]);
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let container = &inspect[0];
    assert_eq!(container["HostConfig"]["NanoCpus"], 500_000_000);
    assert_eq!(container["HostConfig"]["Memory"], 64 << 20);
    assert_eq!(container["HostConfig"]["NetworkMode"], "host");
    let labels = &container["Config"]["Labels"];
    assert_eq!(labels["mtc.service"], "hello-world-server");
    assert_eq!(labels["mtc.digest"], record.digest.to_string());
    let env: Vec<&str> = container["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for name in [
        "PROXY_PORT=",
        "PROXY_IP=127.0.0.1",
        // Every listener of the sidecar on the host IP only.
        "MTC_QUIC_ADDR=127.0.0.1:",
        "MTC_PROM_LISTEN_ADDR=127.0.0.1:",
        "MTC_P2P_LISTEN_ADDR=127.0.0.1:0",
        "SERVICE_PORT=",
        "METRICS_PORT=",
        "P2P_BOOTSTRAPS=",
        "SERVICE_NAME=hello-world-server",
        // The record says nothing of its protocol: HTTP, the sidecar's default role.
        "SERVICE_PROTOCOL=http",
    ] {
        assert!(
            env.iter().any(|v| v.starts_with(name)),
            "{name} missing: {env:?}"
        );
    }

    // Killed and restarted with a short idle timeout: the container is adopted, then culled;
    // nothing is left with its label.
    let mut killed = allocator.daemon.process;
    killed.child.start_kill().unwrap();
    killed.child.wait().await.unwrap();
    assert_eq!(
        containers.ids().len(),
        1,
        "the container outlived the allocator"
    );
    let restarted = start_allocator(
        &network,
        dir.path(),
        "docker",
        &[&["--idle-timeout", "1s", "--boot-grace", "1s"][..], &range].concat(),
    )
    .await;
    assert_eq!(restarted.peer, peer);
    assert_eq!(
        metrics_value(
            &restarted.daemon,
            "allocator_instances{service=\"hello-world-server\"}"
        )
        .await,
        Some(1.0)
    );
    wait_until("the adopted container culled", DEADLINE, || async {
        metrics_value(&restarted.daemon, "allocator_culls_total{reason=\"idle\"}").await
            == Some(1.0)
    })
    .await;
    assert!(
        containers.ids().is_empty(),
        "orphans: {:?}",
        containers.ids()
    );
}

/// Issue 15: any service is baked on the proxy base image (sidecar-image/README.md's contract)
/// and runs through a Docker allocator like hello world: here sidecar-image/examples/echo,
/// built by sidecar-image/build.sh from its directory, registered, started on demand.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_service_baked_on_the_proxy_base_image_serves_through_an_allocator() {
    if !docker_engine() {
        return;
    }
    let tarball = bake("examples/echo");
    assert!(tarball.ends_with("echo.tar"), "{}", tarball.display());
    let network = start_network().await;
    let (ok, _, err) = cli(
        &network,
        &["add", "--file", tarball.to_str().unwrap(), "echo"],
    )
    .await;
    assert!(ok, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let allocator = start_allocator(
        &network,
        dir.path(),
        "docker",
        &["--idle-timeout", "1h", "--port-range", "21300-21399"],
    )
    .await;
    let _containers = Containers(allocator.peer.to_string());
    let (_ingress, addr) = start_ingress(&network).await;
    let (status, body) = http_get(&addr, "/echo/hello/there").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "GET /hello/there"));
}
