//! The control crate's test helpers: the shared ones from `testkit`, and how to start this
//! crate's binaries.

#![allow(dead_code, unused_imports)] // Each test file uses its own subset.

pub use testkit::*;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use control::lookup::ServiceRecord;

pub const PING_MONITOR: &str = env!("CARGO_BIN_EXE_ping-monitor");
pub const HL_SERVICE: &str = env!("CARGO_BIN_EXE_hl-service");
pub const HL_CLI: &str = env!("CARGO_BIN_EXE_hl-cli");
pub const ALLOCATOR: &str = env!("CARGO_BIN_EXE_allocator");
pub const CHECK: &str = env!("CARGO_BIN_EXE_check");

/// Starts a ping-monitor on loopback with `extra` flags.
pub async fn start_monitor(extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--p2p-listen-addr",
        "127.0.0.1:0",
        "--prom-listen-addr",
        "127.0.0.1:0",
        "--ping-interval",
        "200ms",
    ];
    args.extend_from_slice(extra);
    start_daemon(PING_MONITOR, &args).await
}

/// A ping-monitor and an hl-service (embedded store) as processes.
pub struct Network {
    pub monitor: Daemon,
    pub service: Daemon,
    pub data: tempfile::TempDir,
}

pub async fn start_network() -> Network {
    let monitor = start_monitor(&["--ephemeral"]).await;
    let data = tempfile::tempdir().unwrap();
    let service = start_service(&monitor, data.path()).await;
    Network {
        monitor,
        service,
        data,
    }
}

pub async fn start_service(monitor: &Daemon, data: &Path) -> Daemon {
    let bootstrap = monitor.bootstrap.to_string();
    let keyfile = data.join("key");
    start_daemon(
        HL_SERVICE,
        &[
            "--bootstrap",
            &bootstrap,
            "--data-dir",
            data.to_str().unwrap(),
            "--keyfile",
            keyfile.to_str().unwrap(),
            "--p2p-listen-addr",
            "127.0.0.1:0",
            "--prom-listen-addr",
            "127.0.0.1:0",
        ],
    )
    .await
}

/// Runs hl-cli against the network; returns (success, stdout, stderr). It never panics,
/// whatever the input.
pub async fn cli(network: &Network, args: &[&str]) -> (bool, String, String) {
    let bootstrap = network.monitor.bootstrap.to_string();
    let mut all = vec!["-bootstrap", bootstrap.as_str()];
    all.extend_from_slice(args);
    let (ok, out, err) = run_to_exit(HL_CLI, &all, &[]).await;
    assert!(!err.contains("panicked"), "hl-cli {args:?} panicked: {err}");
    (ok, out, err)
}

/// A node on the network of `bootstrap` that has found `allocator` as proxies find it: a
/// provider of the allocator namespace (which dials it). For asking it to start instances.
pub async fn asker_of(
    bootstrap: &control::overlay::BootstrapAddr,
    allocator: libp2p::PeerId,
) -> control::overlay::Node {
    let asker = start_node(std::slice::from_ref(bootstrap), None).await;
    wait_until(
        "the allocator found on the overlay",
        std::time::Duration::from_secs(60),
        || async {
            providers(&asker, control::allocator::protocol::NAMESPACE)
                .await
                .contains(&allocator)
        },
    )
    .await;
    asker
}

/// Sends a start request to `allocator`, again (twice at most) if the overlay connection
/// failed under it: a loaded machine can drop one, and proxies ask again too. A refusal is an
/// answer and is returned at once.
pub async fn ask(
    node: &control::overlay::Node,
    allocator: libp2p::PeerId,
    request: &control::allocator::protocol::StartRequest,
) -> Result<control::allocator::protocol::StartResponse, control::rpc::RpcError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match node
            .request::<control::allocator::protocol::StartProtocol>(allocator, request)
            .await
        {
            Err(error) if attempt < 3 => {
                eprintln!("start request failed, asking again: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            }
            answer => return answer,
        }
    }
}

/// A binary of another package of the workspace, built beside this one by
/// `cargo test --workspace`.
pub fn sibling(name: &str) -> PathBuf {
    let path = PathBuf::from(ALLOCATOR).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p proxy -p helloworld`)",
        path.display()
    );
    path
}

/// Registers helloworldserver as the executable of `name`; returns its record.
pub async fn register_hello(network: &Network, name: &str) -> ServiceRecord {
    register_executable(network, name, &sibling("helloworldserver")).await
}

/// A copy of helloworldserver with `tag` appended: it runs the same, but its digest (so its
/// instances) is its own.
pub fn variant(dir: &std::path::Path, tag: &str) -> PathBuf {
    let path = dir.join(tag);
    let mut bytes = std::fs::read(sibling("helloworldserver")).unwrap();
    bytes.extend_from_slice(tag.as_bytes());
    std::fs::write(&path, bytes).unwrap();
    path
}

pub async fn register_executable(
    network: &Network,
    name: &str,
    hello: &std::path::Path,
) -> ServiceRecord {
    let (ok, _, err) = cli(
        network,
        &[
            "add",
            "--exec",
            hello.to_str().unwrap(),
            name,
            "--",
            "helloworldserver",
            "$SERVICE_PORT",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let (ok, out, err) = cli(network, &["get", "--json", name]).await;
    assert!(ok, "{err}");
    ServiceRecord::from_json(out.as_bytes()).unwrap()
}

pub struct Allocator {
    pub daemon: Daemon,
    pub peer: libp2p::PeerId,
}

/// Kills, when dropped, every process started from under `dir` (the instances a process
/// allocator with that data directory started), so that a failing test leaves none behind:
/// instances run in sessions of their own and outlive a killed allocator by design.
pub struct InstanceReaper(pub PathBuf);

impl Drop for InstanceReaper {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .arg("-f")
            .arg(self.0.as_os_str())
            .status();
    }
}

/// Starts an allocator with the `runtime` ("process" or "docker") and short timers; `dir`
/// holds its key and data, so a restart with the same `dir` is the same allocator.
pub async fn start_allocator(
    network: &Network,
    dir: &std::path::Path,
    runtime: &str,
    extra: &[&str],
) -> Allocator {
    start_allocator_at(&network.monitor.bootstrap, dir, runtime, extra).await
}

/// [`start_allocator`] on the network `bootstrap` belongs to.
pub async fn start_allocator_at(
    bootstrap: &control::overlay::BootstrapAddr,
    dir: &std::path::Path,
    runtime: &str,
    extra: &[&str],
) -> Allocator {
    let bootstrap = bootstrap.to_string();
    let (key, data) = (dir.join("key"), dir.join("data"));
    let proxy = sibling("proxy");
    let common = allocator_args(
        &bootstrap,
        runtime,
        proxy.to_str().unwrap(),
        data.to_str().unwrap(),
    );
    let mut args: Vec<&str> = common.iter().map(String::as_str).collect();
    args.extend_from_slice(&["--keyfile", key.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let daemon = start_daemon(ALLOCATOR, &args).await;
    let peer = daemon.bootstrap.peer;
    Allocator { daemon, peer }
}

/// A network (a ping-monitor and an hl-service) with helloworldserver registered as
/// `hello-world-server`, and a process allocator on it started with `flags`. Fields drop in
/// order: the allocator, then its instances (the reaper), then the network.
pub struct HelloNetwork {
    pub allocator: Allocator,
    pub reaper: InstanceReaper,
    /// The allocator's key and data (its instances under `data/instances`).
    pub dir: tempfile::TempDir,
    pub record: ServiceRecord,
    pub network: Network,
}

/// Starts a [`HelloNetwork`].
pub async fn hello_network(flags: &[&str]) -> HelloNetwork {
    let network = start_network().await;
    let record = register_hello(&network, "hello-world-server").await;
    let dir = tempfile::tempdir().unwrap();
    let reaper = InstanceReaper(dir.path().join("data"));
    let allocator = start_allocator(&network, dir.path(), "process", flags).await;
    HelloNetwork {
        allocator,
        reaper,
        dir,
        record,
        network,
    }
}

/// An anonymous (ingress) proxy joined to `network`; the process and its ingress HOST:PORT.
pub async fn start_ingress(network: &Network) -> (Process, String) {
    let bootstrap = network.monitor.bootstrap.to_string();
    let ingress = Process::spawn(
        sibling("proxy").to_str().unwrap(),
        &[
            "--bootstrap",
            &bootstrap,
            "--ephemeral",
            "--metrics-addr",
            "127.0.0.1:0",
            "0",
        ],
        &[("RUST_LOG", "warn")],
    );
    let line = ingress
        .line_containing("ingress: http://", std::time::Duration::from_secs(30))
        .await;
    let addr = line["ingress: http://".len()..].to_owned();
    (ingress, addr)
}

/// An `l4-proxy` on `network`, as a client machine runs it; returns it and its control API's
/// HOST:PORT.
pub async fn start_l4_proxy(network: &Network) -> (Process, String) {
    let bootstrap = network.monitor.bootstrap.to_string();
    // The original's single-dash spellings.
    let l4 = Process::spawn(
        sibling("l4-proxy").to_str().unwrap(),
        &[
            "-bootstrap",
            &bootstrap,
            "-ephemeral",
            "-metrics-addr",
            "127.0.0.1:0",
            "0",
        ],
        &[("RUST_LOG", "warn")],
    );
    let prefix = "l4 control API: http://";
    let line = l4
        .line_containing(prefix, std::time::Duration::from_secs(30))
        .await;
    let control = line[line.find(prefix).unwrap() + prefix.len()..].to_owned();
    (l4, control)
}

/// `docker ARGS...`: whether it succeeded, and its output. Panics (naming the command) when
/// the `docker` program cannot be run at all, so no check reads "cannot ask" as "nothing
/// there".
pub fn docker(args: &[&str]) -> (bool, String) {
    let output = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run `docker {}`: {error}", args.join(" ")));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
    )
}

/// `docker ARGS...` that must succeed: its output; panics with its error output otherwise.
pub fn docker_ok(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run `docker {}`: {error}", args.join(" ")));
    assert!(
        output.status.success(),
        "`docker {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// The test image's tarball: `MTC_TEST_IMAGE_TAR` if set (scripts/test.sh builds it once),
/// else built now.
pub fn test_image() -> PathBuf {
    if let Ok(path) = std::env::var("MTC_TEST_IMAGE_TAR") {
        return path.into();
    }
    build_image(None)
}

/// sidecar-image/build.sh into target/test-image: hello world, or the service in
/// `sidecar-image/<dir>`; the tarball it made.
fn build_image(dir: Option<&str>) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut build = Command::new(root.join("sidecar-image/build.sh"));
    build.arg(root.join("target/test-image"));
    if let Some(dir) = dir {
        build.arg(root.join("sidecar-image").join(dir));
    }
    let output = build.output().unwrap();
    assert!(
        output.status.success(),
        "sidecar-image/build.sh {} failed: {}",
        dir.unwrap_or_default(),
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// Bakes the service in `sidecar-image/<dir>` on the proxy base image with
/// sidecar-image/build.sh; its tarball.
pub fn bake(dir: &str) -> PathBuf {
    build_image(Some(dir))
}

/// Removes every container labelled as `allocator`'s when dropped, even if the test failed.
pub struct Containers(pub String);

impl Containers {
    /// The IDs of the allocator's containers, running or not. A `docker ps` that fails fails
    /// the test: "no containers" must mean the engine said so.
    pub fn ids(&self) -> Vec<String> {
        let filter = format!("label=mtc.allocator={}", self.0);
        let out = docker_ok(&["ps", "-aq", "--filter", &filter]);
        out.lines().map(str::to_owned).collect()
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        // Best effort while possibly unwinding: a second panic here would abort the run.
        let filter = format!("label=mtc.allocator={}", self.0);
        let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        else {
            return;
        };
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = Command::new("docker").args(["rm", "-f", id]).output();
        }
    }
}

/// Whether the Docker tests run: yes when an engine answers. A machine without one fails them
/// loudly, unless MTC_SKIP_DOCKER=1 says it is meant to have none.
/// A skipped test is reported by name through [`testkit::skipped`], so scripts/test.sh's
/// summary counts it as skipped, not passed. A missing `docker` program is no engine.
pub fn docker_engine() -> bool {
    let answers = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|output| output.status.success());
    if answers {
        return true;
    }
    if std::env::var("MTC_SKIP_DOCKER").is_ok_and(|v| v == "1") {
        testkit::skipped("MTC_SKIP_DOCKER=1: no Docker engine on this machine");
        return false;
    }
    panic!(
        "no Docker engine answers (`docker info` fails or docker is not installed): start \
         it, or set MTC_SKIP_DOCKER=1 on a machine meant to have none"
    );
}
