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

#[testkit::deadline_test]
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

#[testkit::deadline_test]
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

#[testkit::deadline_test]
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

#[testkit::deadline_test]
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

#[testkit::deadline_test]
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

// Issue 16: blob uploads as a peer sees them. Every await below is under DEADLINE.

/// Awaits `future` for at most [`DEADLINE`]; panics naming `what` if it takes longer.
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} took over {DEADLINE:?}"))
}

/// A node serving blobs from a store, its metrics, and a node joined to it to upload from.
struct BlobPeers {
    holder: control::overlay::Node,
    uploader: control::overlay::Node,
    registry: prometheus::Registry,
}

async fn serve_blobs(store: BlobStore) -> BlobPeers {
    let holder = start_node(&[], None).await;
    let registry = prometheus::Registry::new();
    let counters = transfer::BlobCounters::register(&registry).unwrap();
    transfer::serve(&holder, Arc::new(store), counters).await;
    let uploader = start_node(&[bootstrap_of(&holder).await], None).await;
    BlobPeers {
        holder,
        uploader,
        registry,
    }
}

impl BlobPeers {
    /// Uploads `bytes` to the holder; returns the result and how many bytes were sent.
    async fn upload(&self, bytes: &[u8]) -> (Result<(), transfer::TransferError>, u64) {
        let mut source = futures::io::Cursor::new(bytes.to_vec());
        self.upload_from(Digest::of(bytes), bytes.len() as u64, &mut source)
            .await
    }

    async fn upload_from(
        &self,
        digest: Digest,
        size: u64,
        source: &mut (impl futures::AsyncRead + Unpin),
    ) -> (Result<(), transfer::TransferError>, u64) {
        let mut sent = 0;
        let peer = self.holder.peer_id();
        let result = within(
            "an upload",
            transfer::upload(&self.uploader, peer, digest, size, source, |n| sent = n),
        )
        .await;
        (result, sent)
    }

    /// The holder's metrics, as its /metrics endpoint would show them.
    fn metrics(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap()
    }
}

fn blob_bytes(len: u32) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 251) as u8).collect()
}

async fn store_blob(store: &BlobStore, bytes: &[u8]) {
    let mut source = futures::io::Cursor::new(bytes.to_vec());
    let size = bytes.len() as u64;
    within(
        "storing a blob",
        store.write_from(Digest::of(bytes), size, &mut source, DEADLINE, |_| {}),
    )
    .await
    .unwrap();
}

/// Files left in the store's `tmp/`.
fn temporary_files(root: &Path) -> Vec<std::path::PathBuf> {
    let entries = std::fs::read_dir(root.join("tmp")).unwrap();
    entries.flatten().map(|entry| entry.path()).collect()
}

#[testkit::deadline_test]
async fn an_upload_over_a_damaged_copy_of_the_right_size_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    let bytes = blob_bytes(300_000);
    let digest = Digest::of(&bytes);
    store_blob(&store, &bytes).await;
    let path = dir.path().join("sha256").join(digest.hex());
    let mut damaged = bytes.clone();
    damaged[123_456] ^= 0xff;
    std::fs::write(&path, &damaged).unwrap();
    let peers = within("starting the nodes", serve_blobs(store)).await;

    // Not taken for stored: the damaged copy is set aside and the upload stored instead.
    let (result, sent) = peers.upload(&bytes).await;
    result.unwrap();
    assert_eq!(sent, bytes.len() as u64);
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "the damaged copy was kept"
    );
    let set_aside = std::fs::read(dir.path().join("corrupt").join(digest.hex())).unwrap();
    assert!(set_aside == damaged);
    let received = format!("blob_bytes_received_total {}", bytes.len());
    assert!(peers.metrics().contains(&received), "{}", peers.metrics());
    // The intact copy is already stored: nothing more is received.
    let (result, _) = peers.upload(&bytes).await;
    result.unwrap();
    assert!(peers.metrics().contains(&received), "{}", peers.metrics());
    assert!(temporary_files(dir.path()).is_empty());
}

#[testkit::deadline_test]
async fn an_upload_over_the_size_limit_is_refused_before_any_byte_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path())
        .unwrap()
        .with_max_blob_bytes(100_000);
    let peers = within("starting the nodes", serve_blobs(store)).await;
    let bytes = blob_bytes(100_001);
    let (result, sent) = peers.upload(&bytes).await;
    let Err(transfer::TransferError::Refused { reason, .. }) = result else {
        panic!("{result:?}")
    };
    assert!(
        reason.contains("100001 bytes") && reason.contains("limit of 100000 bytes"),
        "{reason}"
    );
    assert_eq!(sent, 0, "bytes were sent before the refusal");
    let refused = r#"blob_uploads_refused_total{reason="too_large"} 1"#;
    assert!(peers.metrics().contains(refused), "{}", peers.metrics());
    assert!(BlobStore::open(dir.path()).unwrap().list().is_empty());
    // A blob of exactly the limit is taken.
    let (result, _) = peers.upload(&bytes[..100_000]).await;
    result.unwrap();
}

/// A tmpfs of a given size mounted on a new directory; unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

/// Why a small disk cannot be had here (the test is then skipped, saying so).
#[derive(Debug, thiserror::Error)]
enum MountError {
    /// The `mount` program cannot be run.
    #[error("cannot run mount: {0}")]
    CannotRun(std::io::Error),
    /// `mount` refused (no root, no CAP_SYS_ADMIN); its message.
    #[error("cannot mount a tmpfs: {0}")]
    Refused(String),
}

impl SmallDisk {
    /// Mounts it, or says why it cannot be (mounting needs root, or CAP_SYS_ADMIN).
    async fn mount(bytes: u64) -> Result<SmallDisk, MountError> {
        let dir = tempfile::tempdir().unwrap();
        let size = format!("size={bytes}");
        let mounted = tokio::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "mtc-small-disk"])
            .arg(dir.path())
            .output()
            .await
            .map_err(MountError::CannotRun)?;
        if !mounted.status.success() {
            let why = String::from_utf8_lossy(&mounted.stderr).trim().to_owned();
            return Err(MountError::Refused(why));
        }
        Ok(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The bytes still free on it.
    fn free(&self) -> u64 {
        let path = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs is plain data, for which all zeroes is a valid value.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a statvfs to fill, both alive for the call.
        let result = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
        assert_eq!(result, 0, "statvfs: {}", std::io::Error::last_os_error());
        stats.f_bavail * stats.f_frsize
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.path())
            .status();
    }
}

#[testkit::deadline_test]
async fn an_upload_that_fills_the_disk_is_refused_and_loses_nothing() {
    let disk = match within("mounting a tmpfs", SmallDisk::mount(1 << 20)).await {
        Ok(disk) => disk,
        Err(reason) => return skipped(&reason.to_string()),
    };
    let root = disk.path().join("blobs");
    let store = BlobStore::open(&root).unwrap();
    let earlier = blob_bytes(256 * 1024);
    store_blob(&store, &earlier).await;
    let peers = within("starting the nodes", serve_blobs(store)).await;
    // Full in the middle of the blob, with far more to come than the stream buffers (the
    // uploader must hear the refusal while still sending), and full at its very last byte
    // (the write a sync alone does not report).
    for (round, over) in [16 << 20, 1].into_iter().enumerate() {
        let bytes = blob_bytes((disk.free() + over) as u32);
        let (result, _) = peers.upload(&bytes).await;
        let Err(transfer::TransferError::Refused { reason, .. }) = result else {
            panic!("{} bytes over the free space: {result:?}", over)
        };
        assert!(reason.contains("the disk is full"), "{reason}");
        let refused = format!(
            r#"blob_uploads_refused_total{{reason="no_space"}} {}"#,
            round + 1
        );
        assert!(peers.metrics().contains(&refused), "{}", peers.metrics());
        let store = BlobStore::open(&root).unwrap();
        assert_eq!(store.list(), [Digest::of(&earlier)]);
        assert!(
            within("verifying", store.open_verified(Digest::of(&earlier)))
                .await
                .is_ok()
        );
        assert!(temporary_files(&root).is_empty());
    }
}

#[testkit::deadline_test]
async fn a_failing_local_source_is_not_blamed_on_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let peers = within(
        "starting the nodes",
        serve_blobs(BlobStore::open(dir.path()).unwrap()),
    )
    .await;
    let bytes = blob_bytes(600_000);
    let chunks = vec![
        Ok(bytes[..300_000].to_vec()),
        Err(std::io::Error::other("the local disk failed")),
    ];
    let mut source = futures::TryStreamExt::into_async_read(futures::stream::iter(chunks));
    let (result, _) = peers
        .upload_from(Digest::of(&bytes), bytes.len() as u64, &mut source)
        .await;
    let Err(error) = result else {
        panic!("uploaded from a failing source")
    };
    assert!(
        matches!(error, transfer::TransferError::Source { sent: 300_000, .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains("the local disk failed")
            && !text.contains(&peers.holder.peer_id().to_string()),
        "{text}"
    );
    // The holder drops the part it received.
    wait_until("the partial upload to be dropped", DEADLINE, || async {
        temporary_files(dir.path()).is_empty()
    })
    .await;
    assert!(BlobStore::open(dir.path()).unwrap().list().is_empty());
}

/// The records a lookup service holds, asked of it directly.
async fn records_at(asker: &control::overlay::Node, service: libp2p::PeerId) -> Vec<String> {
    use control::lookup::protocol::{LookupProtocol, LookupRequest, LookupResponse};
    match within(
        "a list request",
        asker.request::<LookupProtocol>(service, &LookupRequest::List),
    )
    .await
    {
        Ok(LookupResponse::Services(records)) => records.into_iter().map(|r| r.name).collect(),
        other => panic!("list at {service}: {other:?}"),
    }
}

/// Issue 16: `hl-cli add --copies 2` with two lookup services, one of them on a full disk:
/// that one refuses the upload cleanly (its earlier records and blobs intact, nothing left
/// in `tmp/`), the other takes it, and the add succeeds saying one copy of the two asked for
/// was stored, and why.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_service_on_a_full_disk_is_passed_over_for_another() {
    let disk = match within("mounting a tmpfs", SmallDisk::mount(4 << 20)).await {
        Ok(disk) => disk,
        Err(reason) => return skipped(&reason.to_string()),
    };
    let network = start_network().await;
    let full = start_service(&network.monitor, disk.path()).await;
    let files = tempfile::tempdir().unwrap();
    let script = |name: &str, len: usize| {
        let path = files.path().join(name);
        let mut bytes = format!("#!/bin/sh\n# {name}\n").into_bytes();
        bytes.resize(len.max(bytes.len()), b'#');
        std::fs::write(&path, &bytes).unwrap();
        (path.to_str().unwrap().to_owned(), Digest::of(&bytes))
    };
    let (earlier, earlier_digest) = script("earlier", 1000);
    let (ok, out, err) = cli(
        &network,
        &["add", "--copies", "2", "--exec", &earlier, "earlier"],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("copies:   2 "), "{out}");
    let asker = start_node(std::slice::from_ref(&network.monitor.bootstrap), None).await;
    wait_until(
        "the lookup service found on the overlay",
        DEADLINE,
        || async {
            providers(&asker, "lookup")
                .await
                .contains(&full.bootstrap.peer)
        },
    )
    .await;
    let before = records_at(&asker, full.bootstrap.peer).await;

    let (big, big_digest) = script("big", (disk.free() + (1 << 20)) as usize);
    let (ok, out, err) = cli(&network, &["add", "--copies", "2", "--exec", &big, "big"]).await;
    assert!(ok, "one lookup service could take it: {out}{err}");
    assert!(out.contains("copies:   1 "), "{out}");
    assert!(
        err.contains("stored 1 of the 2 copies") && err.contains("the disk is full"),
        "{err}"
    );
    assert!(temporary_files(&disk.path().join("blobs")).is_empty());
    let blobs = BlobStore::open(&disk.path().join("blobs")).unwrap();
    assert_eq!(
        blobs.list(),
        [earlier_digest],
        "nothing of the refused upload kept"
    );
    assert!(
        within("verifying", blobs.open_verified(earlier_digest))
            .await
            .is_ok()
    );
    assert_eq!(records_at(&asker, full.bootstrap.peer).await, before);
    let other = BlobStore::open(&network.data.path().join("blobs")).unwrap();
    assert!(other.size_of(&big_digest).is_some(), "the other took it");
    drop((full, network));
}

/// Issue 16: a node takes at most `MAX_UPLOADS` uploads at once; the next is refused as busy
/// before any byte moves (its uploader goes on to another holder), and counted.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_past_the_limit_are_refused_as_busy_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let peers = within(
        "starting the nodes",
        serve_blobs(BlobStore::open(dir.path()).unwrap()),
    )
    .await;
    let holder = peers.holder.peer_id();
    // Uploads whose source never yields a byte: each holds its place until aborted.
    let stalled: Vec<_> = (0..transfer::MAX_UPLOADS as u32)
        .map(|i| {
            let uploader = peers.uploader.clone();
            let digest = Digest::of(&i.to_be_bytes());
            tokio::spawn(async move {
                let mut never = futures::TryStreamExt::into_async_read(futures::stream::pending::<
                    std::io::Result<Vec<u8>>,
                >());
                transfer::upload(&uploader, holder, digest, 1000, &mut never, |_| {}).await
            })
        })
        .collect();
    wait_until("every stalled upload taken", DEADLINE, || async {
        temporary_files(dir.path()).len() == transfer::MAX_UPLOADS
    })
    .await;
    let (result, sent) = peers.upload(&blob_bytes(1000)).await;
    let Err(transfer::TransferError::Refused { reason, .. }) = result else {
        panic!("an upload past the limit: {result:?}")
    };
    assert!(reason.contains("busy"), "{reason}");
    assert_eq!(sent, 0);
    assert!(
        peers
            .metrics()
            .contains(r#"blob_uploads_refused_total{reason="busy"} 1"#),
        "{}",
        peers.metrics()
    );
    for upload in stalled {
        upload.abort();
    }
    // Their places are free again once they are gone.
    wait_until("the stalled uploads gone", DEADLINE, || async {
        temporary_files(dir.path()).is_empty()
    })
    .await;
    let (result, _) = peers.upload(&blob_bytes(1000)).await;
    assert!(result.is_ok(), "{result:?}");
}
