//! Lookup services over a real etcd cluster (Debian's etcd-server, started by hl-service on
//! loopback ports): one creates the cluster, two more join it through the overlay, all three
//! agree, and losing one loses nothing.

mod support;

use std::{path::Path, time::Duration};

use control::lookup::{
    archive::write_synthetic_archive,
    protocol::{LookupProtocol, LookupRequest, LookupResponse},
};
use support::*;

const DEADLINE: Duration = Duration::from_secs(60);

async fn start_member(monitor: &Daemon, data: &Path, new_cluster: bool) -> (Daemon, String) {
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

#[tokio::test]
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
