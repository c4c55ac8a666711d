//! The ping-monitor binary as users run it: its metrics scraped by a real Prometheus, as a
//! redundant bootstrap, with a stable identity, and refusing bad input with clear errors.

mod support;

use std::{process::Stdio, time::Duration};

use support::*;
use tokio::io::AsyncWriteExt;

const DEADLINE: Duration = Duration::from_secs(30);

#[testkit::deadline_test]
async fn metrics_cover_every_peer_and_a_real_prometheus_scrapes_them() {
    let monitor = start_monitor(&["--ephemeral", "--hostname", "monitor-host"]).await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(start_node(std::slice::from_ref(&monitor.bootstrap), None).await);
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.peer_id().to_string()).collect();

    let last_scrape = std::sync::Mutex::new(String::new());
    let last = &last_scrape;
    wait_until("a ping_rtt series for every peer", DEADLINE, || {
        let addr = monitor.metrics.clone();
        let ids = ids.clone();
        async move {
            let Some((200, body)) = http_get(&addr, "/metrics").await else {
                return false;
            };
            let complete = ids.iter().all(|id| {
                body.contains(&format!(
                    "ping_rtt{{host=\"monitor-host\",targetHost=\"{id}\"}}"
                )) && body.contains(&format!(
                    "ping_ewma_rtt{{host=\"monitor-host\",targetHost=\"{id}\"}}"
                )) && body.contains(&format!(
                    "ping_rtt_window_count{{host=\"monitor-host\",targetHost=\"{id}\"}}"
                ))
            });
            *last.lock().unwrap() = body;
            complete
        }
    })
    .await;
    let metrics = last_scrape.into_inner().unwrap();

    // promtool, Prometheus's own linter: the seed's camelCase `targetHost` is its only
    // complaint, and no parse error; with snake_case labels it passes outright.
    let (code, lint) = promtool_check_metrics(&metrics).await;
    assert!(
        code == 0 || code == 3,
        "promtool found errors (exit {code}):\n{lint}"
    );
    assert!(
        lint.lines()
            .all(|l| l.contains("label names should be written in 'snake_case'")),
        "{lint}"
    );
    let snake = start_monitor(&["--ephemeral", "--metric-labels", "snake"]).await;
    let node = start_node(std::slice::from_ref(&snake.bootstrap), None).await;
    let id = node.peer_id().to_string();
    let scrape = std::sync::Mutex::new(String::new());
    let scrape_ref = &scrape;
    wait_until("snake_case series", DEADLINE, || {
        let (addr, id) = (snake.metrics.clone(), id.clone());
        async move {
            let text = http_get(&addr, "/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default();
            let found = text.contains("ping_rtt_window_count{")
                && text.contains(&format!("target_host=\"{id}\""));
            *scrape_ref.lock().unwrap() = text;
            found
        }
    })
    .await;
    let body = scrape.into_inner().unwrap();
    let (code, lint) = promtool_check_metrics(&body).await;
    assert_eq!(code, 0, "{lint}");

    // The JSON view lists the same peers, connected.
    let (status, peers) = http_get(&monitor.metrics, "/peers").await.unwrap();
    assert_eq!(status, 200);
    let peers: serde_json::Value = serde_json::from_str(&peers).unwrap();
    for id in &ids {
        let row = peers["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["peer"] == *id);
        assert_eq!(
            row.map(|r| r["connected"].clone()),
            Some(true.into()),
            "{peers:#}"
        );
    }

    // A real Prometheus, scraping every second, serves the series through its query API.
    let dir = tempfile::tempdir().unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ping-monitor\n    \
             static_configs:\n      - targets: ['{}']\n",
            monitor.metrics
        ),
    )
    .unwrap();
    let _prometheus = Process::spawn(
        "prometheus",
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            &format!("--web.listen-address={web}"),
        ],
        &[],
    );
    wait_until(
        "Prometheus to return ping_rtt for every peer",
        Duration::from_secs(60),
        || {
            let web = web.clone();
            let ids = ids.clone();
            async move {
                match http_get(&web, "/api/v1/query?query=ping_rtt").await {
                    Some((200, body)) => ids.iter().all(|id| body.contains(id.as_str())),
                    _ => false,
                }
            }
        },
    )
    .await;
    assert!(
        monitor.process.terminate().await,
        "graceful exit on SIGTERM"
    );
}

#[testkit::deadline_test]
async fn a_peer_unseen_for_the_expiry_leaves_the_metrics() {
    let monitor = start_monitor(&["--ephemeral", "--peer-expiry", "1s"]).await;
    let node = start_node(std::slice::from_ref(&monitor.bootstrap), None).await;
    let series = format!("targetHost=\"{}\"", node.peer_id());
    // Some(whether the series is there) from a scrape that worked; None when it failed (a
    // crashed monitor is not a monitor whose series expired).
    let has_series = || {
        let (addr, series) = (monitor.metrics.clone(), series.clone());
        async move {
            http_get(&addr, "/metrics")
                .await
                .filter(|(status, _)| *status == 200)
                .map(|(_, body)| body.contains(&series))
        }
    };
    wait_until("the peer's series", DEADLINE, || async {
        has_series().await == Some(true)
    })
    .await;
    node.shutdown().await;
    wait_until("the series to expire", DEADLINE, || async {
        has_series().await == Some(false)
    })
    .await;
}

#[testkit::deadline_test]
async fn a_redundant_bootstrap_keeps_the_network_joinable_and_the_first_one_is_rejoined() {
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("first.key");
    let keyfile = keyfile.to_str().unwrap();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let first_args = [
        "--keyfile",
        keyfile,
        "--p2p-listen-addr",
        &listen,
        "--prom-listen-addr",
        "127.0.0.1:0",
    ];
    let first = Process::spawn(PING_MONITOR, &first_args, &[]);
    let first_addr: control::overlay::BootstrapAddr = first
        .line_containing("/p2p/", DEADLINE)
        .await
        .parse()
        .unwrap();
    let second = start_monitor(&["--ephemeral", "--bootstrap", &first_addr.to_string()]).await;

    // A provider that knows only the first bootstrap.
    let provider = start_node(std::slice::from_ref(&first_addr), None).await;
    provider.advertise("svc").await;
    let check = start_node(std::slice::from_ref(&second.bootstrap), None).await;
    wait_until(
        "the record to spread to the second bootstrap",
        DEADLINE,
        || async { providers(&check, "svc").await.contains(&provider.peer_id()) },
    )
    .await;
    check.shutdown().await;

    drop(first); // killed
    let newcomer = start_node(std::slice::from_ref(&second.bootstrap), None).await;
    wait_until(
        "a newcomer via the second bootstrap to find the provider",
        DEADLINE,
        || async {
            providers(&newcomer, "svc")
                .await
                .contains(&provider.peer_id())
        },
    )
    .await;

    // The first comes back with the same identity and port: the provider reconnects to it.
    let first = Process::spawn(PING_MONITOR, &first_args, &[]);
    let metrics = first.line_containing("metrics: http://", DEADLINE).await;
    let metrics = metrics["metrics: http://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let provider_id = provider.peer_id().to_string();
    wait_until(
        "the provider to reconnect to the restarted bootstrap",
        DEADLINE,
        || {
            let metrics = metrics.clone();
            let provider_id = provider_id.clone();
            async move {
                http_get(&metrics, "/peers")
                    .await
                    .is_some_and(|(_, body)| body.contains(&provider_id))
            }
        },
    )
    .await;
    let late = start_node(std::slice::from_ref(&first_addr), None).await;
    wait_until(
        "a node via the restarted bootstrap to find the provider",
        DEADLINE,
        || async { providers(&late, "svc").await.contains(&provider.peer_id()) },
    )
    .await;
}

#[testkit::deadline_test]
async fn the_same_key_file_keeps_the_peer_id_and_a_corrupt_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("ping.key");
    let args = ["--keyfile", keyfile.to_str().unwrap()];
    let first = start_monitor(&args).await;
    assert!(first.process.terminate().await);
    let second = start_monitor(&args).await;
    assert_eq!(first.bootstrap.peer, second.bootstrap.peer);
    assert!(second.process.terminate().await);

    std::fs::write(&keyfile, b"garbage that is not a key\n").unwrap();
    let (ok, _, stderr) = run_to_exit(PING_MONITOR, &args, &[]).await;
    assert!(!ok);
    assert!(stderr.contains(keyfile.to_str().unwrap()), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        std::fs::read(&keyfile).unwrap(),
        b"garbage that is not a key\n"
    );
}

#[testkit::deadline_test]
async fn bad_input_is_refused_naming_the_value() {
    /// Flags and environment that must be refused, and what the error must name.
    struct Case<'a> {
        args: Vec<&'a str>,
        env: Vec<(&'a str, &'a str)>,
        names: Vec<&'a str>,
    }
    let case = |args, env, names| Case { args, env, names };
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let bad_config = dir.path().join("bad.toml");
    std::fs::write(
        &bad_config,
        "prom-listen-addr = \":9100\"\nno-such-key = 1\n",
    )
    .unwrap();
    let bad_config = bad_config.to_str().unwrap().to_owned();
    let env_bootstrap = ("P2P_BOOTSTRAPS", "  /ip4/127.0.0.1/tcp/1/p2p/x  ");
    let cases = [
        case(
            vec!["--bootstrap", "/ip4/nonsense"],
            vec![],
            vec!["/ip4/nonsense"],
        ),
        case(
            vec!["-bootstrap", "/ip4/127.0.0.1/tcp/1"],
            vec![],
            vec!["/ip4/127.0.0.1/tcp/1", "/p2p/"],
        ),
        case(
            vec![],
            vec![env_bootstrap],
            vec!["P2P_BOOTSTRAPS", "/p2p/x"],
        ),
        case(
            vec!["--config", "/nonexistent/ping.toml"],
            vec![],
            vec!["/nonexistent/ping.toml"],
        ),
        case(
            vec!["--config", &bad_config],
            vec![],
            vec![&bad_config, "line 2", "no-such-key"],
        ),
        case(vec!["--p2p-listen-addr", &busy], vec![], vec![&busy]),
        case(vec!["--prom-listen-addr", &busy], vec![], vec![&busy]),
        case(
            vec!["--prom-listen-addr", "nine-one-hundred"],
            vec![],
            vec!["nine-one-hundred"],
        ),
    ];
    for Case { args, env, names } in cases {
        let mut all = vec!["--ephemeral"];
        if !args.contains(&"--p2p-listen-addr") {
            all.extend(["--p2p-listen-addr", "127.0.0.1:0"]);
        }
        if !args.contains(&"--prom-listen-addr") && !args.contains(&"--config") {
            all.extend(["--prom-listen-addr", "127.0.0.1:0"]);
        }
        all.extend(&args);
        let (ok, _, stderr) = run_to_exit(PING_MONITOR, &all, &env).await;
        assert!(!ok, "{all:?} {env:?} should fail");
        assert!(!stderr.contains("panicked"), "{all:?}: {stderr}");
        for name in names {
            assert!(
                stderr.contains(name),
                "{all:?} {env:?}: error should name {name}: {stderr}"
            );
        }
    }
}

/// Runs `promtool check metrics` on an exposition; returns its exit code and output.
async fn promtool_check_metrics(exposition: &str) -> (i32, String) {
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by scripts/setup.sh");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .await
        .unwrap();
    let output = promtool.wait_with_output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}
