//! The original system's walkthrough (../shared/seed/walkthrough.md) with this project's
//! binaries and the seed's single-dash flags, as processes on one machine: a bootstrap
//! ping-monitor, an allocator, hl-service, the hello-world image built and saved, `hl-cli add`,
//! an anonymous proxy on 4200 and `curl 127.0.0.1:4200/hello-world-server` -> "Hello, world";
//! the instance carries the project's labels and is culled after the idle timeout. Once with
//! Docker (when an engine answers here), once with the process runtime.

mod support;

use std::time::Duration;

use support::*;

const DEADLINE: Duration = Duration::from_secs(60);

async fn walk(docker_runtime: bool) {
    // $ ./ping-monitor
    let monitor = start_daemon(
        PING_MONITOR,
        &[
            "-ephemeral",
            "-p2p-listen-addr",
            "127.0.0.1:0",
            "-prom-listen-addr",
            "127.0.0.1:0",
        ],
    )
    .await;
    let boot = monitor.bootstrap.to_string();
    let dir = tempfile::tempdir().unwrap();
    let _reaper = InstanceReaper(dir.path().join("allocator"));

    // $ ./allocator -configfile ../conf/conf.json, the bootstrap in the original's conf.json
    // rather than a flag (what the original read it for).
    let conf = dir.path().join("conf.json");
    std::fs::write(
        &conf,
        format!(r#"{{"Perf":{{"SoftReq":{{"RTT":100}},"HardReq":{{"RTT":1000}}}},"Bootstraps":["{boot}"]}}"#),
    )
    .unwrap();
    let runtime = if docker_runtime { "docker" } else { "process" };
    let proxy = sibling("proxy");
    let data = dir.path().join("allocator");
    let allocator = start_daemon(
        ALLOCATOR,
        &[
            "-configfile",
            conf.to_str().unwrap(),
            "-ephemeral",
            "-runtime",
            runtime,
            "-proxy-binary",
            proxy.to_str().unwrap(),
            "-data-dir",
            data.to_str().unwrap(),
            "-p2p-listen-addr",
            "127.0.0.1:0",
            "-prom-listen-addr",
            "127.0.0.1:0",
            "-host-ip",
            "127.0.0.1",
            "-idle-timeout",
            "2s",
            "-boot-grace",
            "1s",
            "-check-interval",
            "200ms",
            "-port-range",
            "21400-21499",
        ],
    )
    .await;
    let containers = Containers(allocator.bootstrap.peer.to_string());

    // $ ./hl-service -bootstrap <bootstrap-p2p-addr>
    let lookup_data = dir.path().join("hl-service");
    let _hl_service = start_daemon(
        HL_SERVICE,
        &[
            "-bootstrap",
            &boot,
            "-ephemeral",
            "-data-dir",
            lookup_data.to_str().unwrap(),
            "-p2p-listen-addr",
            "127.0.0.1:0",
            "-prom-listen-addr",
            "127.0.0.1:0",
        ],
    )
    .await;

    // $ docker build ... && docker save ... && ./hl-cli -bootstrap <addr> add ... (or the
    // executable for the process runtime)
    // $ ./hl-cli add --file hello-world-server.1.0.tar \
    //     <DockerHub username>/hello-world-server@sha256:<image digest/hash> hello-world-server
    // with the digest `docker push` would have printed: a registry's, not the image ID.
    let hello = sibling("helloworldserver");
    let tarball = docker_runtime.then(test_image);
    let pushed = format!("walker/hello-world-server@sha256:{}", "5e".repeat(32));
    let add: Vec<&str> = match &tarball {
        Some(tar) => vec![
            "add",
            "--file",
            tar.to_str().unwrap(),
            &pushed,
            "hello-world-server",
        ],
        None => vec![
            "add",
            "--exec",
            hello.to_str().unwrap(),
            "hello-world-server",
            "--",
            "helloworldserver",
            "$SERVICE_PORT",
        ],
    };
    // The bootstrap from the environment, as the walkthrough's line has no flag for it.
    let (ok, out, err) = run_to_exit(HL_CLI, &add, &[("P2P_BOOTSTRAPS", &boot)]).await;
    assert!(ok, "{err}");
    if docker_runtime {
        assert!(
            err.contains("taken as a registry digest") && out.contains(&pushed),
            "the output says how the digest was taken: {err} / {out}"
        );
    }

    // $ ./proxy -bootstrap <bootstrap-p2p-addr> 4200
    let ingress = Process::spawn(
        proxy.to_str().unwrap(),
        &[
            "-bootstrap",
            &boot,
            "-ephemeral",
            "-metrics-addr",
            "127.0.0.1:0",
            "4200",
        ],
        &[("RUST_LOG", "warn")],
    );
    ingress
        .line_containing("ingress: http://127.0.0.1:4200", DEADLINE)
        .await;

    // $ curl 127.0.0.1:4200/hello-world-server
    let (status, body) = http_get("127.0.0.1:4200", "/hello-world-server")
        .await
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "Hello, world\n"),
        "{runtime}"
    );

    // The instance, with the project's labels, is culled after the idle timeout.
    let instances = data.join("instances");
    if docker_runtime {
        let ids = containers.ids();
        assert_eq!(ids.len(), 1);
        let (_, service) = docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"mtc.service\"}}",
            &ids[0],
        ]);
        assert_eq!(service, "hello-world-server");
    } else {
        assert_eq!(std::fs::read_dir(&instances).unwrap().count(), 1);
    }
    wait_until("the idle instance culled", DEADLINE, || async {
        if docker_runtime {
            containers.ids().is_empty()
        } else {
            std::fs::read_dir(&instances).unwrap().count() == 0
        }
    })
    .await;
    assert!(ingress.terminate().await);
    assert!(allocator.process.terminate().await);
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_walkthrough_works_with_docker_and_with_processes() {
    if docker_engine() {
        walk(true).await;
    }
    walk(false).await;
}

/// The scrape configuration README points to is one Prometheus accepts.
#[testkit::deadline_test]
async fn the_repositorys_prometheus_config_is_valid() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("prometheus.yml");
    let (ok, out, err) = run_to_exit(
        "promtool",
        &["check", "config", config.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(ok, "{out}{err}");
    for job in [
        "ping-monitor",
        "allocator",
        "hl-service",
        "ingress",
        "instances",
    ] {
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains(&format!("job_name: {job}")), "{job}");
    }
}
