//! One flag vocabulary (issue 15): every daemon's `--help` lists the same shared flags under
//! one heading, the clients a subset of them, and `--log-format json` writes JSON lines.

mod support;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use control::common::program::HEADING;
use support::*;

/// The long flags listed under the shared heading of `program --help`.
fn shared_flags(program: &str) -> BTreeSet<String> {
    let output = Command::new(program).arg("--help").output().unwrap();
    assert!(output.status.success(), "{program} --help");
    let help = String::from_utf8(output.stdout).unwrap();
    let section = help
        .split_once(&format!("{HEADING}:"))
        .unwrap_or_else(|| panic!("{program} --help has no '{HEADING}' section:\n{help}"))
        .1;
    section
        .lines()
        .take_while(|line| line.is_empty() || line.starts_with(' '))
        .filter_map(|line| {
            let flag = line
                .trim_start()
                .split([' ', ',', '='])
                .find(|w| w.starts_with("--"))?;
            line.trim_start().starts_with('-').then(|| flag.to_owned())
        })
        .collect()
}

#[test]
fn every_daemon_shows_the_same_shared_flags_and_every_client_a_subset() {
    let daemons = [
        PING_MONITOR.to_owned(),
        ALLOCATOR.to_owned(),
        HL_SERVICE.to_owned(),
        sibling("proxy").display().to_string(),
        sibling("l4-proxy").display().to_string(),
    ];
    let expected = shared_flags(&daemons[0]);
    for flag in [
        "--prom-listen-addr",
        "--p2p-listen-addr",
        "--config",
        "--log-format",
        "--debug",
        "--bootstrap",
        "--psk",
        "--keyfile",
    ] {
        assert!(expected.contains(flag), "{flag} is shared: {expected:?}");
    }
    for daemon in &daemons[1..] {
        assert_eq!(shared_flags(daemon), expected, "{daemon}");
    }
    for client in [HL_CLI, CHECK] {
        let flags = shared_flags(client);
        assert!(flags.is_subset(&expected), "{client}: {flags:?}");
        assert!(flags.contains("--log-format") && flags.contains("--bootstrap"));
    }
}

#[test]
fn each_daemon_keeps_its_own_defaults_of_the_shared_flags() {
    let help = |program: &str| {
        String::from_utf8(Command::new(program).arg("--help").output().unwrap().stdout).unwrap()
    };
    for (program, needles) in [
        (
            PING_MONITOR,
            [
                "[default: :4001]",
                "[default: :9100]",
                "PING_MONITOR_CONFIG",
            ],
        ),
        (
            ALLOCATOR,
            ["[default: :0]", "[default: :9101]", "ALLOCATOR_CONFIG"],
        ),
        (
            HL_SERVICE,
            ["[default: :0]", "[default: :9102]", "HL_SERVICE_CONFIG"],
        ),
    ] {
        let text = help(program);
        for needle in needles {
            assert!(
                text.contains(needle),
                "{program} --help lacks {needle}:\n{text}"
            );
        }
    }
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let mut monitor = Command::new(PING_MONITOR)
        .args([
            "--ephemeral",
            "--p2p-listen-addr",
            "127.0.0.1:0",
            "--prom-listen-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = monitor.stderr.take().unwrap();
    // The first log line (the node's start), read on a thread so that a silent program fails
    // the test at the deadline instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stderr).read_line(&mut line);
        let _ = tx.send(line);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = rx
        .recv_timeout(deadline - Instant::now())
        .expect("a log line within 30 s");
    let _ = monitor.kill();
    let _ = monitor.wait();
    let object: serde_json::Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    assert_eq!(object["level"], "INFO", "{object}");
    assert!(object["fields"].is_object(), "{object}");
    assert!(object["target"].is_string(), "{object}");
    assert!(object["timestamp"].is_string(), "{object}");
}

/// Where `ping-monitor`, given `args` and `env`, serves /metrics (the address it prints).
async fn metrics_address(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["--ephemeral", "--p2p-listen-addr", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let monitor = Process::spawn(PING_MONITOR, &all, env);
    let prefix = "metrics: http://";
    let line = monitor
        .line_containing(prefix, Duration::from_secs(30))
        .await;
    line[line.find(prefix).unwrap() + prefix.len()..]
        .trim_end_matches("/metrics")
        .rsplit_once(':')
        .unwrap()
        .0
        .to_owned()
}

/// Issue 16: the environment layer of the configuration, untested until now. A setting comes
/// from the flag, else the config file, else the environment, else the default; loopback
/// addresses tell the layers apart.
#[testkit::deadline_test]
async fn flag_beats_file_beats_environment_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("monitor.toml");
    std::fs::write(&file, "prom-listen-addr = \"127.0.0.3:0\"\n").unwrap();
    let file = file.to_str().unwrap();
    let env = [("MTC_PROM_LISTEN_ADDR", "127.0.0.2:0")];
    assert_eq!(metrics_address(&[], &env).await, "127.0.0.2");
    assert_eq!(
        metrics_address(&["--config", file], &env).await,
        "127.0.0.3"
    );
    assert_eq!(
        metrics_address(
            &["--config", file, "--prom-listen-addr", "127.0.0.4:0"],
            &env
        )
        .await,
        "127.0.0.4"
    );
}
