//! `check` on a healthy network and on broken ones: the right verdict, what to do, the exit
//! code, and JSON for scripts.

mod support;

use support::*;

async fn check(args: &[&str]) -> (bool, String, String) {
    run_to_exit(CHECK, args, &[]).await
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_healthy_network_and_each_kind_of_breakage() {
    let HelloNetwork {
        allocator,
        reaper: _reaper,
        dir: _dir,
        network,
        ..
    } = hello_network(&["--port-range", "21300-21399"]).await;
    let boot = network.monitor.bootstrap.to_string();

    // Healthy: everything found, with RTTs; the service resolves.
    let (ok, out, err) = check(&["--bootstrap", &boot, "--service", "hello-world-server"]).await;
    assert!(ok, "{out}{err}");
    for line in [
        "ok   overlay",
        "ok   lookup",
        "ok   allocators",
        "ok   service",
    ] {
        assert!(out.contains(line), "{line} missing:\n{out}");
    }
    assert!(
        out.contains(&allocator.peer.to_string()) && out.contains(" ms)"),
        "{out}"
    );
    assert!(out.contains("0 instance(s) running"), "{out}");
    let (ok, out, _) = check(&["--bootstrap", &boot, "--json"]).await;
    assert!(ok);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["checks"].as_array().unwrap().len(), 3);

    // An unknown service.
    let (ok, out, err) = check(&["--bootstrap", &boot, "--service", "nope"]).await;
    assert!(!ok);
    assert!(
        out.contains("FAIL service") && out.contains("no service named 'nope'"),
        "{out}"
    );
    assert!(out.contains("hl-cli add"), "{out}");
    assert!(err.contains("failed: service"), "{err}");

    // The wrong network key: the bootstrap never completes the handshake.
    let (ok, out, _) = check(&["--bootstrap", &boot, "--psk", "not ours", "--timeout", "2s"]).await;
    assert!(!ok);
    assert!(
        out.contains("FAIL overlay") && out.contains("--psk"),
        "{out}"
    );

    // The bootstrap down.
    let dead = format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
        free_port(),
        network.monitor.bootstrap.peer
    );
    let (ok, out, _) = check(&["--bootstrap", &dead, "--json"]).await;
    assert!(!ok);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["checks"][0]["check"], "overlay");
    assert!(
        report["checks"][0]["fix"]
            .as_str()
            .unwrap()
            .contains("bootstrap"),
        "{out}"
    );
}
