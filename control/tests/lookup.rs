//! hl-service and hl-cli as users run them, with the embedded store: records added, read,
//! listed, deleted; kept across a restart; bad input refused with nothing stored. And blobs
//! moving between nodes: fetched from a holder, verified, a corrupt copy never served.

mod support;

use std::{path::Path, sync::Arc, time::Duration};

use control::{
    blob::{BlobStore, Digest, transfer},
    lookup::archive::write_synthetic_archive,
};
use support::*;

const DEADLINE: Duration = Duration::from_secs(30);

fn archive(dir: &Path, name: &str, layer_size: u64) -> (String, Digest) {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).unwrap();
    let image_id = write_synthetic_archive(file, name.as_bytes(), layer_size, true).unwrap();
    (path.to_str().unwrap().to_owned(), image_id)
}

#[tokio::test]
async fn records_are_added_read_listed_deleted_and_survive_a_restart() {
    let mut network = start_network().await;
    let files = tempfile::tempdir().unwrap();
    let (tar, image_id) = archive(files.path(), "hello.tar", 200_000);
    let image = format!("me/hello-world-server:1.0@{image_id}");

    let (ok, out, err) = cli(
        &network,
        &[
            "add",
            "--file",
            &tar,
            &image,
            "hello-world-server",
            "--soft-rtt",
            "20ms",
            "--hard-rtt",
            "100ms",
            "--cpu",
            "0.5",
            "--memory",
            "64MiB",
        ],
    )
    .await;
    assert!(ok, "add failed: {out}{err}");
    assert!(out.contains("Added hello-world-server"), "{out}");

    let exe = files.path().join("server");
    std::fs::write(&exe, b"\x7fELF pretend static binary").unwrap();
    let (ok, out, err) = cli(
        &network,
        &[
            "add",
            "--exec",
            exe.to_str().unwrap(),
            "hello-proc",
            "--",
            "server",
            "$SERVICE_PORT",
        ],
    )
    .await;
    assert!(ok, "add --exec failed: {out}{err}");
    // Issue 16: what no start could run is refused when it is added, saying why; nothing is
    // stored.
    let empty = files.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let text = files.path().join("notes.txt");
    std::fs::write(&text, b"not a program").unwrap();
    for (file, why) in [(&empty, "is empty"), (&text, "is not an executable")] {
        let (ok, _, err) = cli(
            &network,
            &["add", "--exec", file.to_str().unwrap(), "never-runs"],
        )
        .await;
        assert!(!ok && err.contains(why), "{err}");
    }

    // The archive can come on standard input too, as `docker save IMAGE | hl-cli add --stdin`.
    let bootstrap = network.monitor.bootstrap.to_string();
    let piped = std::process::Command::new(HL_CLI)
        .args(["-bootstrap", &bootstrap, "add", "--stdin", "from-stdin"])
        .env_remove("P2P_BOOTSTRAPS")
        .stdin(std::fs::File::open(&tar).unwrap())
        .output()
        .unwrap();
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );

    let (ok, out, _) = cli(&network, &["--json", "get", "hello-world-server"]).await;
    assert!(ok, "{out}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(record["artifact"]["image_id"], image_id.to_string());
    assert_eq!(record["artifact"]["image"], "me/hello-world-server:1.0");
    assert_eq!(record["limits"]["soft_rtt"], "20ms");
    assert_eq!(record["limits"]["memory_bytes"], 64 << 20);
    let digest = record["digest"].as_str().unwrap().to_owned();
    assert_eq!(
        digest,
        control::blob::hash_file(Path::new(&tar))
            .unwrap()
            .to_string()
    );

    let (ok, out, _) = cli(&network, &["list"]).await;
    assert!(
        ok && out.contains("hello-world-server") && out.contains("hello-proc"),
        "{out}"
    );
    assert!(out.contains("from-stdin"), "{out}");
    assert!(!out.contains("never-runs"), "{out}");

    // Restart the lookup service on the same data: records and blobs are still there.
    assert!(network.service.process.terminate().await);
    network.service = start_service(&network.monitor, network.data.path()).await;
    let (ok, out, _) = cli(&network, &["--json", "get", "hello-proc"]).await;
    assert!(ok, "{out}");
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        record["artifact"]["command"],
        serde_json::json!(["server", "$SERVICE_PORT"])
    );
    let fetcher = start_node(std::slice::from_ref(&network.monitor.bootstrap), None).await;
    let store = tempfile::tempdir().unwrap();
    let store = BlobStore::open(store.path()).unwrap();
    let from = transfer::fetch(&fetcher, digest.parse().unwrap(), &store)
        .await
        .unwrap();
    assert_eq!(from, network.service.bootstrap.peer);
    assert!(store.open_verified(digest.parse().unwrap()).await.is_ok());

    let (ok, out, _) = cli(&network, &["delete", "hello-world-server"]).await;
    assert!(ok, "{out}");
    let (ok, _, err) = cli(&network, &["get", "hello-world-server"]).await;
    assert!(
        !ok && err.contains("no service named 'hello-world-server'"),
        "{err}"
    );
    let (ok, _, err) = cli(&network, &["delete", "hello-world-server"]).await;
    assert!(!ok && err.contains("no service named"), "{err}");
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_stored() {
    let network = start_network().await;
    let files = tempfile::tempdir().unwrap();
    let (tar, image_id) = archive(files.path(), "app.tar", 10_000);
    let not_archive = files.path().join("notes.txt");
    std::fs::write(&not_archive, "not an image").unwrap();
    let wrong = format!("me/app@{}", Digest::of(b"another image"));

    // A digest that is not the archive's image ID is the registry's (the original's
    // walkthrough passes what `docker push` printed): taken as the image reference, and said
    // so. --no-add: checked and printed, nothing sent.
    let (ok, out, err) = cli(
        &network,
        &["add", "--no-add", "--file", &tar, &wrong, "app"],
    )
    .await;
    assert!(
        ok && err.contains(&image_id.to_string())
            && err.contains("taken as a registry digest")
            && out.contains(&wrong)
            && out.contains("Hashed file: sha256:"),
        "{out}\n{err}"
    );
    let (ok, _, err) = cli(
        &network,
        &["add", "--file", not_archive.to_str().unwrap(), "app"],
    )
    .await;
    assert!(
        !ok && err.contains("notes.txt") && err.contains("not an image archive"),
        "{err}"
    );
    for bad_name in ["", "has space", "bad/name"] {
        let (ok, _, err) = cli(&network, &["add", "--file", &tar, bad_name]).await;
        assert!(!ok && err.contains("service name"), "{bad_name:?}: {err}");
    }
    let (ok, _, err) = cli(&network, &["add", "--file", "/nonexistent.tar", "app"]).await;
    assert!(!ok && err.contains("/nonexistent.tar"), "{err}");
    let (ok, out, _) = cli(&network, &["--json", "list"]).await;
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!([])
    );
    let blobs = std::fs::read_dir(network.data.path().join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0, "no blob was uploaded for refused input");
}

#[tokio::test]
async fn an_unreachable_lookup_is_reported_with_the_bootstraps_tried() {
    // A bootstrap with no lookup service behind it.
    let monitor = start_monitor(&["--ephemeral"]).await;
    let bootstrap = monitor.bootstrap.to_string();
    let (ok, _, err) = run_to_exit(HL_CLI, &["--bootstrap", &bootstrap, "list"], &[]).await;
    assert!(
        !ok && err.contains("no lookup service") && err.contains(&bootstrap),
        "{err}"
    );
    // No bootstrap at all answering.
    let dead = format!(
        "/ip4/127.0.0.1/tcp/{}/p2p/{}",
        free_port(),
        monitor.bootstrap.peer
    );
    let (ok, _, err) = run_to_exit(HL_CLI, &["--bootstrap", &dead, "list"], &[]).await;
    assert!(!ok && err.contains(&dead), "{err}");
    let (ok, _, err) = run_to_exit(HL_CLI, &["list"], &[]).await;
    assert!(!ok && err.contains("no bootstrap given"), "{err}");
}

#[tokio::test]
async fn a_corrupt_holder_is_skipped_and_the_blob_fetched_from_another() {
    let bootstrap = start_node(&[], None).await;
    let addr = bootstrap_of(&bootstrap).await;
    let bytes: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = Digest::of(&bytes);
    let mut holders = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(dir.path()).unwrap());
        let mut source = futures::io::Cursor::new(bytes.clone());
        store
            .write_from(digest, bytes.len() as u64, &mut source, DEADLINE, |_| {})
            .await
            .unwrap();
        let node = start_node(std::slice::from_ref(&addr), None).await;
        let registry = prometheus::Registry::new();
        transfer::serve(
            &node,
            Arc::clone(&store),
            transfer::BlobCounters::register(&registry).unwrap(),
        )
        .await;
        holders.push((node, dir));
    }
    // Flip bytes of the first holder's copy.
    let path = holders[0].1.path().join("sha256").join(digest.hex());
    let mut on_disk = std::fs::read(&path).unwrap();
    on_disk[500_000] ^= 0xff;
    std::fs::write(&path, on_disk).unwrap();

    let fetcher = start_node(std::slice::from_ref(&addr), None).await;
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    wait_until("both holders to be findable", DEADLINE, || async {
        providers(&fetcher, &transfer::namespace(&digest))
            .await
            .len()
            == 2
    })
    .await;
    // The corrupt holder tried first (as if nearest): skipped, the blob comes intact from the
    // good one.
    let order = vec![holders[0].0.peer_id(), holders[1].0.peer_id()];
    let from = transfer::fetch_from(&fetcher, order, digest, &store)
        .await
        .unwrap();
    assert_eq!(from, holders[1].0.peer_id());
    assert!(store.open_verified(digest).await.is_ok());
    // The corrupt holder set its copy aside, refuses it from now on and stops advertising it.
    assert!(
        holders[0]
            .1
            .path()
            .join("corrupt")
            .join(digest.hex())
            .exists()
    );
    let result = transfer::download_from(
        &fetcher,
        holders[0].0.peer_id(),
        digest,
        &BlobStore::open(tempfile::tempdir().unwrap().path()).unwrap(),
    )
    .await;
    assert!(result.is_err(), "{result:?}");
    let blob = transfer::namespace(&digest);
    assert!(!holders[0].0.advertised().await.contains(&blob));
    assert!(holders[1].0.advertised().await.contains(&blob));
    // And a plain fetch, in whatever order, finds and uses the good holders only.
    let again_dir = tempfile::tempdir().unwrap();
    let again = BlobStore::open(again_dir.path()).unwrap();
    let from = transfer::fetch(&fetcher, digest, &again).await.unwrap();
    assert_ne!(from, holders[0].0.peer_id());
}

#[tokio::test]
async fn the_service_survives_bad_messages_and_refuses_records_without_blobs() {
    use control::{
        lookup::{
            Artifact, Limits, ServiceRecord,
            protocol::{LookupProtocol, LookupRequest, LookupResponse},
            record::RECORD_VERSION,
        },
        rpc::Protocol,
    };
    use futures::{AsyncReadExt, AsyncWriteExt};

    let network = start_network().await;
    let client = start_node(std::slice::from_ref(&network.monitor.bootstrap), None).await;
    let service = network.service.bootstrap.peer;
    // Found the way every client finds it (which also connects to it).
    let found = control::lookup::client::lookup_services(&client)
        .await
        .unwrap();
    assert_eq!(found, [service]);

    // A length over the limit, then garbage that is not CBOR: each stream is dropped unread.
    for frame in [
        vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        vec![0, 0, 0, 4, 0xff, 0xfe, 0xfd, 0xfc],
    ] {
        let mut stream = client
            .streams()
            .open_stream(service, LookupProtocol::ID)
            .await
            .unwrap();
        stream.write_all(&frame).await.unwrap();
        stream.close().await.unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        assert!(
            answer.is_empty(),
            "no answer to a bad frame, got {answer:?}"
        );
    }

    // A record whose blob was never uploaded is refused: no record without its blob.
    let record = ServiceRecord {
        version: RECORD_VERSION,
        name: "ghost".into(),
        digest: Digest::of(b"never uploaded"),
        size: 14,
        artifact: Artifact::Executable {
            command: vec!["ghost".into()],
        },
        limits: Limits::default(),
        protocol: Default::default(),
        unknown: Default::default(),
    };
    let answer = client
        .request::<LookupProtocol>(service, &LookupRequest::Add(record))
        .await
        .unwrap();
    let LookupResponse::Failed(reason) = answer else {
        panic!("{answer:?}")
    };
    assert!(
        reason.contains("not stored") && reason.contains("upload it first"),
        "{reason}"
    );
    // Still serving, and nothing was stored.
    let answer = client
        .request::<LookupProtocol>(service, &LookupRequest::List)
        .await
        .unwrap();
    assert_eq!(answer, LookupResponse::Services(vec![]));

    // Every outcome is counted by operation.
    let (_, metrics) = http_get(&network.service.metrics, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"lookup_requests_total{op="add",outcome="error"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"lookup_requests_total{op="list",outcome="ok"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("lookup_request_duration_seconds_bucket"),
        "{metrics}"
    );
}
