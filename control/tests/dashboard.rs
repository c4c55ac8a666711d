//! The Grafana dashboard (grafana/multi-tier-cloud.json) against the real programs: a network
//! of ping-monitor, hl-service, an allocator whose process instance serves a request, and an
//! ingress, scraped by a real Prometheus as prometheus.yml says (the instances found through
//! the allocator's HTTP service discovery). Every query of the dashboard must be valid PromQL,
//! and every series it names must be among those Prometheus holds.

mod support;

use std::{collections::BTreeSet, path::Path, time::Duration};

use support::*;

const DEADLINE: Duration = Duration::from_secs(90);

/// Every PromQL expression of the dashboard, with its panel's title.
fn queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.clone(), expr.to_owned()));
            }
        }
    }
    out
}

/// Grafana's variables as a query would have them.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$service", ".*")
}

/// The series names an expression selects: identifiers outside label matchers, ranges,
/// strings and grouping lists, not called as functions and not PromQL keywords.
fn series_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
    ];
    // Blank out {...}, [...] and "...".
    let mut plain = String::new();
    let (mut depth, mut quoted) = (0, false);
    for c in expr.chars() {
        match c {
            '"' if depth > 0 || quoted => quoted = !quoted,
            '{' | '[' if !quoted => depth += 1,
            '}' | ']' if !quoted => depth -= 1,
            _ if depth == 0 && !quoted => plain.push(c),
            _ => {}
        }
    }
    let chars: Vec<char> = plain.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if word == "by" || word == "without" {
                skip_group = true;
            } else if next != Some(&'(') && !KEYWORDS.contains(&word.as_str()) {
                names.insert(word);
            }
            continue;
        }
        if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c == '(' && skip_group {
            // A grouping list: label names, not series.
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_group = false;
        }
        i += 1;
    }
    names
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn the_series_of_a_query_are_found_and_nothing_else() {
    let names = series_names(
        r#"histogram_quantile(0.9, sum by (service, le) (rate(a_bucket{service=~"$service",x="}"}[$__rate_interval]))) / b == 1"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["a_bucket".to_owned(), "b".to_owned()])
    );
}

fn prometheus_config(dir: &Path, static_targets: &[(&str, &str)], allocator: &str) -> String {
    let mut config = String::from("global:\n  scrape_interval: 1s\nscrape_configs:\n");
    for (job, target) in static_targets {
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
        ));
    }
    config.push_str(&format!(
        "  - job_name: instances\n    http_sd_configs:\n      - url: http://{allocator}/targets\n        refresh_interval: 1s\n"
    ));
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, &config).unwrap();
    path.display().to_string()
}

async fn prometheus_names(web: &str) -> BTreeSet<String> {
    let Some((200, body)) = http_get(web, "/api/v1/label/__name__/values").await else {
        return BTreeSet::new();
    };
    let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    value["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|name| name.as_str().map(str::to_owned))
        .collect()
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_is_valid_and_names_series_the_programs_export() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/multi-tier-cloud.json")).unwrap(),
    )
    .unwrap();
    let queries = queries(&dashboard);
    assert!(queries.len() >= 15, "{} queries", queries.len());
    let wanted: BTreeSet<String> = queries
        .iter()
        .flat_map(|(_, expr)| series_names(expr))
        .collect();

    let network = start_network().await;
    let dir = tempfile::tempdir().unwrap();
    let _reaper = InstanceReaper(dir.path().join("allocator"));
    let allocator = start_allocator(&network, &dir.path().join("allocator"), "process", &[]).await;
    register_hello(&network, "hello-world-server").await;
    let boot = network.monitor.bootstrap.to_string();
    let perf = root.join("perf.conf");
    let ingress = start_daemon(
        sibling("proxy").to_str().unwrap(),
        &[
            "--bootstrap",
            &boot,
            "--ephemeral",
            "--prom-listen-addr",
            "127.0.0.1:0",
            "--perf-conf",
            perf.to_str().unwrap(),
            "0",
        ],
    )
    .await;
    let line = ingress
        .process
        .line_containing("ingress: http://", DEADLINE)
        .await;
    let addr = line["ingress: http://".len()..].to_owned();
    // A request: an allocation, a cold start, an instance measured and serving.
    wait_until("hello-world-server to answer", DEADLINE, || async {
        matches!(http_get(&addr, "/hello-world-server").await, Some((200, _)))
    })
    .await;

    let web = format!("127.0.0.1:{}", free_port());
    let config = prometheus_config(
        dir.path(),
        &[
            ("ping-monitor", &network.monitor.metrics),
            ("hl-service", &network.service.metrics),
            ("allocator", &allocator.daemon.metrics),
            ("ingress", &ingress.metrics),
        ],
        &allocator.daemon.metrics,
    );
    let _prometheus = Process::spawn(
        "prometheus",
        &[
            &format!("--config.file={config}"),
            &format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()),
            &format!("--web.listen-address={web}"),
        ],
        &[],
    );
    let missing = std::sync::Mutex::new(wanted.clone());
    let result = tokio::time::timeout(DEADLINE, async {
        loop {
            // Traffic, so that rates and RTTs have samples.
            let _ = http_get(&addr, "/hello-world-server").await;
            let have = prometheus_names(&web).await;
            let left: BTreeSet<String> = wanted.difference(&have).cloned().collect();
            let done = left.is_empty();
            *missing.lock().unwrap() = left;
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "series the dashboard names that Prometheus never got: {:?}",
        missing.lock().unwrap()
    );
    // The sidecar of the instance is scraped too, found through the allocator.
    wait_until("the instance's sidecar scraped", DEADLINE, || async {
        http_get(&web, "/api/v1/query?query=proxy_service_up")
            .await
            .is_some_and(|(_, up)| up.contains("\"job\":\"instances\""))
    })
    .await;

    for (title, expr) in &queries {
        let path = format!("/api/v1/query?query={}", url_encode(&expand(expr)));
        let (status, body) = http_get(&web, &path).await.unwrap();
        assert!(
            status == 200 && body.contains("\"status\":\"success\""),
            "panel '{title}': {expr}: {status} {body}"
        );
    }
}
