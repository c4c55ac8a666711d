//! The allocator as users run it, with the process runtime (the Docker runtime's tests are in
//! allocator_docker.rs): a ping-monitor, an hl-service, an allocator and proxies as processes;
//! the service is the project's helloworldserver, registered as a static executable.

mod support;

use std::time::Duration;

use control::{
    allocator::protocol::{StartProtocol, StartRequest, StartResponse},
    lookup::ServiceRecord,
};
use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

async fn metrics(daemon: &Daemon) -> String {
    http_get(&daemon.metrics, "/metrics").await.unwrap().1
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The processes whose command line contains `needle`.
async fn processes_with(needle: &str) -> Vec<String> {
    let out = tokio::process::Command::new("pgrep")
        .args(["-f", needle])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until the allocator has culled one instance for `reason`, and nothing of the
/// instance in `dir` (processes, files) is left.
async fn culled_and_gone(allocator: &Daemon, reason: &str, dir: &std::path::Path) {
    let series = format!("allocator_culls_total{{reason=\"{reason}\"}}");
    wait_until(
        &format!("the instance culled ({reason})"),
        DEADLINE,
        || async { value(&metrics(allocator).await, &series) == Some(1.0) },
    )
    .await;
    wait_until("nothing of the instance left", DEADLINE, || async {
        processes_with(dir.to_str().unwrap()).await.is_empty()
    })
    .await;
    assert!(!dir.exists());
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn process_instances_start_once_serve_and_are_culled_when_idle() {
    let HelloNetwork {
        allocator,
        reaper: _reaper,
        dir,
        record,
        network,
    } = hello_network(&[
        "--idle-timeout",
        "5s",
        "--boot-grace",
        "1s",
        "--port-range",
        "21000-21099",
    ])
    .await;

    // 20 concurrent start requests, as from 20 proxies at once: one instance.
    let asker = asker_of(&network.monitor.bootstrap, allocator.peer).await;
    let request = StartRequest {
        service: record.name.clone(),
        digest: record.digest.to_string(),
    };
    let answers =
        futures::future::join_all((0..20).map(|_| ask(&asker, allocator.peer, &request))).await;
    let mut ids = std::collections::BTreeSet::new();
    for answer in answers {
        match answer {
            Ok(StartResponse::Started { instance, .. }) => ids.insert(instance),
            other => panic!(
                "{other:?}; the allocator said: {}",
                allocator.daemon.process.stderr()
            ),
        };
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids.into_iter().next().unwrap();
    let text = metrics(&allocator.daemon).await;
    assert_eq!(
        value(&text, "allocator_starts_total{outcome=\"started\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "allocator_starts_total{outcome=\"reused\"}"),
        Some(19.0)
    );
    assert_eq!(
        value(&text, "allocator_instances{service=\"hello-world-server\"}"),
        Some(1.0)
    );

    // Its environment is the container contract.
    let instance_dir = dir.path().join("data/instances").join(&id);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(instance_dir.join("instance.json")).unwrap())
            .unwrap();
    let pid = state["pid"].as_u64().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    for name in [
        "PROXY_PORT=",
        "PROXY_IP=127.0.0.1",
        "SERVICE_PORT=",
        "METRICS_PORT=",
        "P2P_BOOTSTRAPS=",
        "SERVICE_NAME=hello-world-server",
        // The record says nothing of its protocol: HTTP, the sidecar's default role.
        "SERVICE_PROTOCOL=http",
    ] {
        assert!(
            environ.split('\0').any(|v| v.starts_with(name)),
            "{name} missing: {environ}"
        );
    }
    let bootstraps = environ
        .split('\0')
        .find(|v| v.starts_with("P2P_BOOTSTRAPS="))
        .unwrap();
    assert!(
        bootstraps.contains(&allocator.peer.to_string()),
        "the allocator itself: {bootstraps}"
    );
    // Issue 16: with --host-ip 127.0.0.1, the instance's proxy listens there only: data plane
    // (UDP), ingress, /metrics and overlay (TCP); none on every interface.
    let mut sockets = Vec::new();
    wait_until("the instance's proxy listening", DEADLINE, || {
        sockets = sockets_of(pid as u32);
        std::future::ready(sockets.iter().filter(|(proto, _)| proto == "tcp").count() >= 3)
    })
    .await;
    assert!(
        sockets.iter().any(|(proto, _)| proto == "udp"),
        "{sockets:?}"
    );
    for (proto, local) in &sockets {
        assert!(
            local.starts_with("127.0.0.1:"),
            "{proto} {local} in {sockets:?}"
        );
    }

    // A wrong digest is refused, and nothing more is run.
    let wrong = StartRequest {
        service: record.name.clone(),
        digest: format!("sha256:{}", "0".repeat(64)),
    };
    let other = StartRequest {
        service: "no-such-service".into(),
        ..wrong.clone()
    };
    for (request, expected) in [(&wrong, "digest mismatch"), (&other, "no service named")] {
        match asker
            .request::<StartProtocol>(allocator.peer, request)
            .await
            .unwrap()
        {
            StartResponse::Refused(why) => assert!(why.contains(expected), "{why}"),
            started => panic!("{request:?} was not refused: {started:?}"),
        }
    }
    // A blob corrupt at its only holder is never run: the reason reaches the requester.
    let damaged =
        register_executable(&network, "damaged", &variant(dir.path(), "another build")).await;
    let stored = network
        .data
        .path()
        .join("blobs/sha256")
        .join(damaged.digest.hex());
    std::fs::write(&stored, b"not what was registered").unwrap();
    let request = StartRequest {
        service: "damaged".into(),
        digest: damaged.digest.to_string(),
    };
    match asker
        .request::<StartProtocol>(allocator.peer, &request)
        .await
        .unwrap()
    {
        StartResponse::Refused(why) => assert!(why.contains("cannot fetch the artifact"), "{why}"),
        started => panic!("a corrupt artifact was started: {started:?}"),
    }
    let text = metrics(&allocator.daemon).await;
    assert_eq!(
        value(&text, "allocator_starts_total{outcome=\"refused\"}"),
        Some(3.0)
    );
    assert_eq!(
        value(&text, "allocator_instances{service=\"hello-world-server\"}"),
        Some(1.0)
    );

    // Unused, the instance is culled after the idle timeout (its boot grace passed).
    culled_and_gone(&allocator.daemon, "idle", &instance_dir).await;
    assert!(allocator.daemon.process.terminate().await);
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_an_ingress_starts_an_instance_and_a_restarted_allocator_adopts_it() {
    let network = start_network().await;
    register_hello(&network, "hello-world-server").await;
    let dir = tempfile::tempdir().unwrap();
    let _reaper = InstanceReaper(dir.path().join("data"));
    register_executable(&network, "other-service", &variant(dir.path(), "other")).await;
    let range = ["--port-range", "21100-21199"];
    let allocator = start_allocator(
        &network,
        dir.path(),
        "process",
        &[
            &["--idle-timeout", "1h", "--max-instances", "1"][..],
            &range,
        ]
        .concat(),
    )
    .await;

    // request -> allocation -> response, through a real ingress proxy.
    let (_ingress, addr) = start_ingress(&network).await;
    let (status, body) = http_get(&addr, "/hello-world-server/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "Hello, world\n"));

    // At --max-instances, another service is refused, saying why.
    let (status, body) = http_get(&addr, "/other-service/").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("maximum of 1 instances"), "{body}");

    // Killed outright and restarted: the instance is adopted, not orphaned.
    let mut killed = allocator.daemon.process;
    killed.child.start_kill().unwrap();
    killed.child.wait().await.unwrap();
    let instances = dir.path().join("data/instances");
    assert_eq!(
        std::fs::read_dir(&instances).unwrap().count(),
        1,
        "the instance outlived it"
    );
    // Adopted instances boot again as far as culling goes: idle for longer than the timeout
    // (1 ms) at every check, this one is not culled within its grace, however many checks
    // pass...
    let booting = start_allocator(
        &network,
        dir.path(),
        "process",
        &[&["--idle-timeout", "1ms", "--boot-grace", "1h"][..], &range].concat(),
    )
    .await;
    assert_eq!(booting.peer, allocator.peer, "same key, same allocator");
    let text = metrics(&booting.daemon).await;
    assert_eq!(
        value(&text, "allocator_instances{service=\"hello-world-server\"}"),
        Some(1.0),
        "{text}"
    );
    wait_until("three rounds of checks", DEADLINE, || async {
        value(
            &metrics(&booting.daemon).await,
            "allocator_check_rounds_total",
        )
        .is_some_and(|rounds| rounds >= 3.0)
    })
    .await;
    let text = metrics(&booting.daemon).await;
    assert_eq!(
        value(&text, "allocator_culls_total{reason=\"idle\"}"),
        Some(0.0),
        "culled while booting: {text}"
    );
    let mut killed = booting.daemon.process;
    killed.child.start_kill().unwrap();
    killed.child.wait().await.unwrap();
    // ... and once the grace has passed it is culled like the allocator's own: nothing is
    // left behind.
    let restarted = start_allocator(
        &network,
        dir.path(),
        "process",
        &[&["--idle-timeout", "1s", "--boot-grace", "1s"][..], &range].concat(),
    )
    .await;
    wait_until("the adopted instance culled", DEADLINE, || async {
        value(
            &metrics(&restarted.daemon).await,
            "allocator_culls_total{reason=\"idle\"}",
        ) == Some(1.0)
    })
    .await;
    wait_until("no instance left", DEADLINE, || async {
        processes_with(instances.to_str().unwrap()).await.is_empty()
    })
    .await;
    assert_eq!(std::fs::read_dir(&instances).unwrap().count(), 0);

    // A new instance, then SIGTERM: the allocator stops what it started.
    let (status, _) = http_get(&addr, "/hello-world-server/").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(std::fs::read_dir(&instances).unwrap().count(), 1);
    assert!(restarted.daemon.process.terminate().await);
    assert!(processes_with(instances.to_str().unwrap()).await.is_empty());
    assert_eq!(std::fs::read_dir(&instances).unwrap().count(), 0);
}

/// Issue 16: after an allocator stopped, ingresses kept finding it, and asking it, until its
/// provider record expired (two minutes, longer than the deadline here): a clean shutdown
/// withdraws the record.
#[testkit::deadline_test]
async fn a_stopped_allocator_is_not_found_any_more() {
    let network = start_network().await;
    let dir = tempfile::tempdir().unwrap();
    let _reaper = InstanceReaper(dir.path().join("data"));
    let allocator = start_allocator(&network, dir.path(), "process", &[]).await;
    let asker = asker_of(&network.monitor.bootstrap, allocator.peer).await;
    assert!(allocator.daemon.process.terminate().await);
    wait_until(
        "the stopped allocator to be forgotten",
        DEADLINE,
        || async {
            !providers(&asker, control::allocator::protocol::NAMESPACE)
                .await
                .contains(&allocator.peer)
        },
    )
    .await;
    asker.shutdown().await;
}

/// A UDP echo service as a user might write one: a script, run with the port it is given.
const UDP_ECHO: &str = r#"#!/usr/bin/python3
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, sender = sock.recvfrom(65536)
    sock.sendto(data, sender)
"#;

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_a_udp_service_starts_it_behind_a_udp_sidecar() {
    let network = start_network().await;
    let dir = tempfile::tempdir().unwrap();
    let _reaper = InstanceReaper(dir.path().join("data"));
    let script = dir.path().join("echo.py");
    std::fs::write(&script, UDP_ECHO).unwrap();
    let (ok, _, err) = cli(
        &network,
        &[
            "add",
            "--exec",
            script.to_str().unwrap(),
            "--protocol",
            "udp",
            "echo-udp",
            "--",
            "echo.py",
            "$SERVICE_PORT",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let _allocator = start_allocator(
        &network,
        dir.path(),
        "process",
        &["--idle-timeout", "1h", "--port-range", "21200-21299"],
    )
    .await;

    // The original's flow: ask the local l4-proxy for the chain, then send where it says.
    let (l4, control) = start_l4_proxy(&network).await;
    let (status, body) = http_get(&control, "/udp/echo-udp").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let addr: std::net::SocketAddr = body.trim().parse().unwrap();

    // The first datagram waits for the allocation. Its sidecar must have been started in the
    // UDP role: one in the HTTP role checks its service over TCP, finds nothing listening,
    // and refuses the tunnel as down.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buffer = vec![0; 65536];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let answer = loop {
        socket.send_to(b"started on demand", addr).await.unwrap();
        let wait = Duration::from_millis(500);
        if let Ok(Ok(n)) = tokio::time::timeout(wait, socket.recv(&mut buffer)).await {
            break buffer[..n].to_vec();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer through {addr}: {}",
            l4.stderr()
        );
    };
    assert_eq!(answer, b"started on demand");
}

/// Issue 16: a service that ignores SIGTERM outlived its proxy when the proxy died (the dying
/// proxy's SIGTERM was all it got), and the allocator, seeing the instance exited, removed
/// it without stopping that service: an orphan. Now the instance's whole process group is
/// stopped, the orphan included (SIGKILL after the grace).
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_outlives_its_proxy_is_stopped_too() {
    let network = start_network().await;
    let dir = tempfile::tempdir().unwrap();
    let instances = dir.path().join("data/instances");
    let _reaper = InstanceReaper(instances.clone());
    let script = dir.path().join("stubborn");
    std::fs::write(
        &script,
        "#!/bin/sh\n# Ignores SIGTERM (and so does every child it starts).\ntrap '' TERM\n\
         while :; do sleep 1; done\n",
    )
    .unwrap();
    let (ok, _, err) = cli(
        &network,
        &["add", "--exec", script.to_str().unwrap(), "stubborn"],
    )
    .await;
    assert!(ok, "{err}");
    let (_, out, _) = cli(&network, &["get", "--json", "stubborn"]).await;
    let record = ServiceRecord::from_json(out.as_bytes()).unwrap();
    let allocator = start_allocator(
        &network,
        dir.path(),
        "process",
        &["--idle-timeout", "1h", "--port-range", "21300-21399"],
    )
    .await;
    let asker = asker_of(&network.monitor.bootstrap, allocator.peer).await;
    let request = StartRequest {
        service: record.name.clone(),
        digest: record.digest.to_string(),
    };
    let Ok(StartResponse::Started { instance, .. }) = ask(&asker, allocator.peer, &request).await
    else {
        panic!("not started: {}", allocator.daemon.process.stderr());
    };
    let instance_dir = instances.join(&instance);
    // Two command lines name the service: the proxy's (`proxy -- DIR/service`) and, once the
    // proxy has started it, the service's own.
    wait_until("the service running", DEADLINE, || async {
        processes_with(&format!("{}/service", instance_dir.display()))
            .await
            .len()
            == 2
    })
    .await;

    // The proxy dies outright; its service ignores the SIGTERM that brings it.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(instance_dir.join("instance.json")).unwrap())
            .unwrap();
    let proxy = state["pid"].as_u64().unwrap() as libc::pid_t;
    // SAFETY: kill(2) with a valid signal has no memory-safety preconditions.
    unsafe { libc::kill(proxy, libc::SIGKILL) };
    culled_and_gone(&allocator.daemon, "exited", &instance_dir).await;
}

/// Issue 16's fault suite, as a test: an allocator frozen (SIGSTOP) under requests to its
/// instance fails none of them, and resumed (SIGCONT) it still lists that instance and no
/// other, starts nothing more, and, stopped, leaves nothing behind.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_allocator_fails_no_request_and_resumes_with_its_instance() {
    let HelloNetwork {
        allocator,
        reaper: _reaper,
        dir,
        network,
        ..
    } = hello_network(&["--idle-timeout", "1h", "--port-range", "21400-21499"]).await;
    let (_ingress, addr) = start_ingress(&network).await;
    let (status, body) = http_get(&addr, "/hello-world-server/").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "Hello, world\n"));
    frozen_under_requests(&addr, &[allocator.daemon.process.child.id().unwrap()]).await;

    let text = metrics(&allocator.daemon).await;
    assert_eq!(
        value(&text, "allocator_instances{service=\"hello-world-server\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "allocator_starts_total{outcome=\"started\"}"),
        Some(1.0)
    );
    let instances = dir.path().join("data/instances");
    assert_eq!(std::fs::read_dir(&instances).unwrap().count(), 1);
    let (status, _) = http_get(&addr, "/hello-world-server/").await.unwrap();
    assert_eq!(status, 200);
    assert!(allocator.daemon.process.terminate().await);
    wait_until("nothing of its instance left", DEADLINE, || async {
        processes_with(instances.to_str().unwrap()).await.is_empty()
    })
    .await;
}

/// Freezes (SIGSTOP) the processes `pids` for three seconds (the fault, not a wait) while
/// requests to hello-world-server go through the ingress at `addr` one after the other, every
/// one of which must be served; then resumes them (SIGCONT).
async fn frozen_under_requests(addr: &str, pids: &[u32]) {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let signal = |signal: &'static str| {
        let pids = pids.clone();
        async move {
            for pid in &pids {
                assert!(
                    run_to_exit("kill", &[signal, pid], &[]).await.0,
                    "kill {signal} {pid}"
                );
            }
        }
    };
    signal("-STOP").await;
    let frozen_until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut served = 0;
    while tokio::time::Instant::now() < frozen_until {
        let (status, body) = http_get(addr, "/hello-world-server/").await.unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, "Hello, world\n"),
            "after {served}"
        );
        served += 1;
    }
    signal("-CONT").await;
}

/// Issue 16's fault suite, as a test: the control plane (the bootstrap ping-monitor and the
/// hl-service) frozen under requests to a running instance fails none of them; resumed, the
/// lookup answers and the record and artifact are intact.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_control_plane_fails_no_request_and_loses_nothing() {
    let HelloNetwork {
        allocator: _allocator,
        reaper: _reaper,
        dir: _dir,
        record,
        network,
    } = hello_network(&["--idle-timeout", "1h", "--port-range", "21500-21599"]).await;
    let (_ingress, addr) = start_ingress(&network).await;
    let (status, _) = http_get(&addr, "/hello-world-server/").await.unwrap();
    assert_eq!(status, 200);
    let pids = [
        network.monitor.process.child.id().unwrap(),
        network.service.process.child.id().unwrap(),
    ];
    frozen_under_requests(&addr, &pids).await;
    let (ok, out, err) = cli(&network, &["get", "--json", "hello-world-server"]).await;
    assert!(ok, "{err}");
    assert_eq!(ServiceRecord::from_json(out.as_bytes()).unwrap(), record);
    let blobs = control::blob::BlobStore::open(&network.data.path().join("blobs")).unwrap();
    assert!(blobs.open_verified(record.digest).await.is_ok());
}
