//! Lookup services over a real etcd cluster (Debian's etcd-server, started by hl-service on
//! loopback ports): one creates the cluster, two more join it through the overlay, all three
//! agree, and losing one loses nothing: neither a record nor the artifact it names.

mod support;

use std::{path::Path, time::Duration};

use control::lookup::{
    archive::write_synthetic_archive,
    protocol::{LookupProtocol, LookupRequest, LookupResponse},
};
use support::*;

const DEADLINE: Duration = Duration::from_secs(60);

async fn start_member(monitor: &Daemon, data: &Path, new_cluster: bool) -> (Daemon, String) {
    start_member_with(monitor, data, new_cluster, &[]).await
}

async fn start_member_with(
    monitor: &Daemon,
    data: &Path,
    new_cluster: bool,
    extra: &[&str],
) -> (Daemon, String) {
    let ports = free_ports(2);
    let (client, peer) = (ports[0].to_string(), ports[1].to_string());
    let bootstrap = monitor.bootstrap.to_string();
    let data_dir = data.to_str().unwrap().to_owned();
    let mut args = vec![
        "-bootstrap",
        &bootstrap,
        "--data-dir",
        &data_dir,
        "--ephemeral",
        "--p2p-listen-addr",
        "127.0.0.1:0",
        "--prom-listen-addr",
        "127.0.0.1:0",
        "-etcd-ip",
        "127.0.0.1",
        "--etcd-client-port",
        &client,
        "--etcd-peer-port",
        &peer,
    ];
    if new_cluster {
        args.push("-new-etcd-cluster");
    }
    args.extend_from_slice(extra);
    let daemon = start_daemon(HL_SERVICE, &args).await;
    (daemon, format!("http://127.0.0.1:{client}"))
}

/// `etcdctl member list` through `endpoint`: one line per member.
async fn members(endpoint: &str) -> Vec<String> {
    let (ok, out, _) = run_to_exit(
        "etcdctl",
        &["--endpoints", endpoint, "member", "list"],
        &[("ETCDCTL_API", "3")],
    )
    .await;
    if ok {
        out.lines().map(str::to_owned).collect()
    } else {
        Vec::new()
    }
}

async fn wait_for_started_members(endpoint: &str, count: usize) {
    wait_until(
        &format!("{count} started etcd members"),
        DEADLINE,
        || async {
            let list = members(endpoint).await;
            list.len() == count && list.iter().all(|m| m.contains(", started, "))
        },
    )
    .await;
}

#[testkit::deadline_test]
async fn three_lookup_services_share_one_etcd_cluster_and_survive_losing_one() {
    let monitor = start_monitor(&["--ephemeral"]).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (first, endpoint) = start_member(&monitor, dirs[0].path(), true).await;
    wait_for_started_members(&endpoint, 1).await;
    let (second, _) = start_member(&monitor, dirs[1].path(), false).await;
    wait_for_started_members(&endpoint, 2).await;
    let (third, _) = start_member(&monitor, dirs[2].path(), false).await;
    wait_for_started_members(&endpoint, 3).await;
    let services = [
        first.bootstrap.peer,
        second.bootstrap.peer,
        third.bootstrap.peer,
    ];

    let files = tempfile::tempdir().unwrap();
    let add = |name: &'static str| {
        let bootstrap = monitor.bootstrap.to_string();
        let tar = files.path().join(format!("{name}.tar"));
        write_synthetic_archive(
            std::fs::File::create(&tar).unwrap(),
            name.as_bytes(),
            4096,
            true,
        )
        .unwrap();
        async move {
            let tar = tar.to_str().unwrap().to_owned();
            run_to_exit(
                HL_CLI,
                &["--bootstrap", &bootstrap, "add", "--file", &tar, name],
                &[],
            )
            .await
        }
    };
    let (ok, out, err) = add("before").await;
    assert!(ok, "{out}{err}");

    // Every lookup service answers the same, whichever took the record.
    let client = start_node(std::slice::from_ref(&monitor.bootstrap), None).await;
    let get = |peer, name: &'static str| {
        let client = client.clone();
        async move {
            client
                .request::<LookupProtocol>(peer, &LookupRequest::Get(name.into()))
                .await
        }
    };
    for peer in services {
        wait_until("every service to see the record", DEADLINE, || async {
            matches!(get(peer, "before").await, Ok(LookupResponse::Found(_)))
        })
        .await;
    }

    // Issue 16's fault suite found an etcd member killed under its hl-service left for good
    // (a zombie, never restarted) and that hl-service answering every request with the
    // store's error. Now: lookups go on (through another lookup service, or another member),
    // the member is restarted and the old process reaped.
    let pid = second.process.child.id().unwrap();
    let (ok, etcd, _) = run_to_exit("pgrep", &["-P", &pid.to_string(), "-x", "etcd"], &[]).await;
    assert!(ok, "the second lookup service supervises an etcd");
    let etcd = etcd.trim().to_owned();
    assert!(run_to_exit("kill", &["-9", &etcd], &[]).await.0);
    // Asked directly, it says its store failed (not that the request is bad: clients ask
    // another), and it is not restarted within the first second.
    let answer = get(services[1], "before").await;
    assert!(
        matches!(answer, Ok(LookupResponse::Unavailable(_))),
        "{answer:?}"
    );
    for _ in 0..5 {
        let (ok, out, err) = hl_cli(&monitor, &["list"]).await;
        assert!(ok && out.contains("before"), "{out}{err}");
    }
    wait_for_started_members(&endpoint, 3).await;
    wait_until("the killed member reaped", DEADLINE, || async {
        !std::path::Path::new(&format!("/proc/{etcd}")).exists()
    })
    .await;
    wait_until(
        "the second lookup service reads its store again",
        DEADLINE,
        || async {
            matches!(
                get(services[1], "before").await,
                Ok(LookupResponse::Found(_))
            )
        },
    )
    .await;
    // Frozen (SIGSTOP) instead: lookups go on (hl-cli, whose requests wait 10 s, hears
    // `Unavailable` from that lookup service once etcd's own timeout, 5 s, has passed, and
    // asks another), and resumed (SIGCONT) the member serves again.
    let (ok, etcd, _) = run_to_exit("pgrep", &["-P", &pid.to_string(), "-x", "etcd"], &[]).await;
    assert!(
        ok,
        "the restarted member runs under the second lookup service"
    );
    let etcd = etcd.trim().to_owned();
    assert!(run_to_exit("kill", &["-STOP", &etcd], &[]).await.0);
    let (ok, out, err) = hl_cli(&monitor, &["list"]).await;
    assert!(ok && out.contains("before"), "{out}{err}");
    assert!(run_to_exit("kill", &["-CONT", &etcd], &[]).await.0);
    wait_until("the resumed member serving again", DEADLINE, || async {
        matches!(
            get(services[1], "before").await,
            Ok(LookupResponse::Found(_))
        )
    })
    .await;

    // Lose one member (its etcd goes with it): the other two keep quorum.
    assert!(third.process.terminate().await);
    let (ok, out, err) = add("after").await;
    assert!(ok, "add with one member down: {out}{err}");
    for peer in &services[..2] {
        for name in ["before", "after"] {
            let answer = get(*peer, name).await.unwrap();
            assert!(
                matches!(answer, LookupResponse::Found(_)),
                "{name} at {peer}: {answer:?}"
            );
        }
    }
    // And through hl-cli: list sees both, delete removes one for everybody.
    let bootstrap = monitor.bootstrap.to_string();
    let hl_cli = |args: &'static [&'static str]| {
        let bootstrap = bootstrap.clone();
        async move {
            let mut all = vec!["--bootstrap", bootstrap.as_str()];
            all.extend_from_slice(args);
            run_to_exit(HL_CLI, &all, &[]).await
        }
    };
    let (ok, out, err) = hl_cli(&["list"]).await;
    assert!(
        ok && out.contains("before") && out.contains("after"),
        "{out}{err}"
    );
    let (ok, out, err) = hl_cli(&["delete", "before"]).await;
    assert!(ok, "{out}{err}");
    for peer in &services[..2] {
        assert_eq!(
            get(*peer, "before").await.unwrap(),
            LookupResponse::NotFound
        );
    }
    drop((first, second));
}

/// hl-cli against the network of `monitor`: (success, stdout, stderr).
async fn hl_cli(monitor: &Daemon, args: &[&str]) -> (bool, String, String) {
    let bootstrap = monitor.bootstrap.to_string();
    let mut all = vec!["--bootstrap", bootstrap.as_str()];
    all.extend_from_slice(args);
    run_to_exit(HL_CLI, &all, &[]).await
}

/// The number on `hl-cli get`'s `copies:` line.
fn copies(get: &str) -> Option<usize> {
    let line = get.lines().find(|l| l.starts_with("copies:"))?;
    line["copies:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Issue 16's "no single copy": an artifact uploaded through one of three lookup services
/// sharing an etcd cluster is on all three before `hl-cli add` reports success; that one
/// killed (SIGKILL) with its data directory deleted, the others make a new copy on a lookup
/// service that joins, and a new allocator, which has never seen the artifact, starts the
/// service from a surviving copy.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_outlives_the_lookup_service_it_was_uploaded_through() {
    let monitor = start_monitor(&["--ephemeral"]).await;
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let fast = ["--replication-interval", "1s"];
    let mut members = Vec::new();
    for (i, dir) in dirs[..3].iter().enumerate() {
        let (member, endpoint) = start_member_with(&monitor, dir.path(), i == 0, &fast).await;
        wait_for_started_members(&endpoint, i + 1).await;
        members.push((member, endpoint));
    }

    let hello = sibling("helloworldserver");
    let (ok, out, err) = hl_cli(
        &monitor,
        &[
            "add",
            "--exec",
            hello.to_str().unwrap(),
            "hello",
            "--",
            "helloworldserver",
            "$SERVICE_PORT",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert_eq!(
        copies(&out),
        Some(3),
        "stored on every lookup service: {out}"
    );
    let at: libp2p::PeerId = out
        .lines()
        .find_map(|l| l.strip_prefix("Added hello at "))
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    let (ok, json, err) = hl_cli(&monitor, &["get", "--json", "hello"]).await;
    assert!(ok, "{err}");
    let record = control::lookup::ServiceRecord::from_json(json.as_bytes()).unwrap();

    // The one it went through is killed and its data directory deleted.
    let index = members
        .iter()
        .position(|(member, _)| member.bootstrap.peer == at)
        .expect("the record went to one of the three");
    let (mut uploader, _) = members.remove(index);
    uploader.process.child.kill().await.unwrap();
    std::fs::remove_dir_all(dirs[index].path()).unwrap();
    let (ok, out, err) = hl_cli(&monitor, &["get", "hello"]).await;
    assert!(ok, "the record survives in etcd: {out}{err}");
    assert_eq!(copies(&out), Some(2), "{out}");

    // A fourth lookup service on the same records gets a copy from the survivors.
    let bootstrap = monitor.bootstrap.to_string();
    let fourth = start_daemon(
        HL_SERVICE,
        &[
            "--bootstrap",
            &bootstrap,
            "--data-dir",
            dirs[3].path().to_str().unwrap(),
            "--ephemeral",
            "--p2p-listen-addr",
            "127.0.0.1:0",
            "--prom-listen-addr",
            "127.0.0.1:0",
            "--etcd-endpoints",
            &members[0].1,
            "--replication-interval",
            "1s",
        ],
    )
    .await;
    let copy = dirs[3]
        .path()
        .join("blobs/sha256")
        .join(record.digest.hex());
    wait_until("a copy on the fourth lookup service", DEADLINE, || async {
        copy.exists()
    })
    .await;
    let (ok, out, err) = hl_cli(&monitor, &["get", "hello"]).await;
    assert!(ok, "{err}");
    assert_eq!(copies(&out), Some(3), "{out}");
    assert!(
        out.contains(&fourth.bootstrap.peer.to_string()),
        "the fourth holds a copy: {out}"
    );

    // A new allocator, which has never held the artifact, starts the service.
    let dir = tempfile::tempdir().unwrap();
    let _reaper = InstanceReaper(dir.path().join("data"));
    let allocator = start_allocator_at(
        &monitor.bootstrap,
        dir.path(),
        "process",
        &["--boot-grace", "1s", "--port-range", "21200-21299"],
    )
    .await;
    let asker = asker_of(&monitor.bootstrap, allocator.peer).await;
    let request = control::allocator::protocol::StartRequest {
        service: "hello".into(),
        digest: record.digest.to_string(),
    };
    match ask(&asker, allocator.peer, &request).await {
        Ok(control::allocator::protocol::StartResponse::Started { .. }) => {}
        other => panic!(
            "{other:?}; the allocator said: {}",
            allocator.daemon.process.stderr()
        ),
    }
    assert!(allocator.daemon.process.terminate().await);
    drop((members, fourth));
}
