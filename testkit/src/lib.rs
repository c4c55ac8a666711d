//! Helpers shared by the integration tests of every crate (and the benchmarks): overlay nodes
//! on loopback with short timers, child processes whose output can be waited on, a minimal
//! HTTP GET, waiting on conditions with a deadline (never a bare sleep), a UDP delay relay
//! that emulates a long link, and a far host: a network namespace behind a delayed link.
#![warn(missing_docs)]

use std::{
    future::Future,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use control::overlay::{BootstrapAddr, BootstrapPolicy, NetworkKey, Node, NodeConfig, Timing};
use futures::StreamExt;
use libp2p::{Multiaddr, PeerId, identity::Keypair};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

mod delay_relay;
mod far_host;
mod mtu_relay;
pub use delay_relay::UdpDelayRelay;
pub use far_host::FarHost;
pub use mtu_relay::mtu_relay;
/// `#[testkit::deadline_test]`: a `#[tokio::test]` under a deadline (see [`within_deadline`]); every
/// integration test uses it, so an await that never ends fails its test instead of hanging
/// the run. `deadline_secs = N` sets the deadline (default 240 s), other arguments go to Tokio.
pub use testkit_macros::deadline_test;

/// Timers short enough for tests: pings every 200 ms, provider records living 3 s.
pub fn fast_timing() -> Timing {
    Timing {
        ping_interval: Duration::from_millis(200),
        ping_timeout: Duration::from_secs(2),
        handshake_timeout: Duration::from_secs(2),
        provider_ttl: Duration::from_secs(3),
        bootstrap: BootstrapPolicy {
            join_attempts: 3,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
        },
        request_timeout: Duration::from_secs(5),
        ..Timing::default()
    }
}

/// A node config listening on a free loopback port.
pub fn node_config(role: &str, keypair: Keypair, bootstraps: &[BootstrapAddr]) -> NodeConfig {
    let mut config = NodeConfig::new(role, keypair);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.bootstraps = bootstraps.to_vec();
    config.timing = fast_timing();
    config
}

/// Starts a node with [`fast_timing`] on a free loopback port, joined through `bootstraps`;
/// with `psk`, in the private network of that passphrase. Panics if it does not start.
pub async fn start_node(bootstraps: &[BootstrapAddr], psk: Option<&str>) -> Node {
    let mut config = node_config("test", Keypair::generate_ed25519(), bootstraps);
    config.network_key = psk.map(NetworkKey::from_passphrase);
    Node::start(config).await.expect("node starts")
}

/// The first listen address of `node`, as a bootstrap address for others.
pub async fn bootstrap_of(node: &Node) -> BootstrapAddr {
    node.listen_addrs().await[0].to_string().parse().unwrap()
}

/// The sockets process `pid` listens on (TCP) or has bound (UDP), from `ss`: each as its
/// protocol (`tcp`, `udp`) and local address.
pub fn sockets_of(pid: u32) -> Vec<(String, String)> {
    let out = std::process::Command::new("ss")
        .args(["-Hlntup"])
        .output()
        .expect("ss (iproute2) runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(&format!("pid={pid},")))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((fields.first()?.to_string(), fields.get(4)?.to_string()))
        })
        .collect()
}

/// Reports the running test as skipped, with `reason`: a line `<test name>: <reason>` is
/// appended to the file `MTC_SKIPPED_LOG` names (scripts/test.sh sets it and counts those
/// tests as skipped, not passed, in its summary), and printed. The caller then returns.
/// The test harness names each test's thread after the test.
pub fn skipped(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("an unnamed test")
        .to_owned();
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(path) = std::env::var_os("MTC_SKIPPED_LOG") {
        use std::io::Write;
        let line = format!("{test}: {reason}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(error) = written {
            panic!(
                "cannot record the skip in {}: {error}",
                path.to_string_lossy()
            );
        }
    }
}

/// The flags every test starts an `allocator` with: on the network of `bootstrap`, with
/// `runtime` ("process" or "docker"), its instances' proxies being `proxy`, its data (and
/// instances) under `data_dir`, everything on loopback, and checks every 200 ms. Tests add
/// the identity (`--keyfile` or `--ephemeral`) and their own flags.
pub fn allocator_args(bootstrap: &str, runtime: &str, proxy: &str, data_dir: &str) -> Vec<String> {
    [
        "--bootstrap",
        bootstrap,
        "--runtime",
        runtime,
        "--proxy-binary",
        proxy,
        "--data-dir",
        data_dir,
        "--p2p-listen-addr",
        "127.0.0.1:0",
        "--prom-listen-addr",
        "127.0.0.1:0",
        "--host-ip",
        "127.0.0.1",
        "--check-interval",
        "200ms",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Polls `condition` until it holds; panics with `what` at the deadline.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= give_up {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a test's body, failing the test, by name, if it does not end within `deadline`.
/// What `#[testkit::deadline_test]` expands to; dropping the body on the deadline drops what it
/// started (child processes are killed on drop).
pub async fn within_deadline<T>(
    deadline: Duration,
    test: &str,
    body: impl Future<Output = T>,
) -> T {
    match tokio::time::timeout(deadline, body).await {
        Ok(output) => output,
        Err(_) => panic!(
            "test `{test}` did not end within its deadline of {deadline:?}: something it \
             awaited never happened"
        ),
    }
}

/// Reads an HTTP/1.x request head from `stream`, for test services that answer by hand: its
/// bytes through the blank line that ends it (and whatever came with them), or `None` if
/// the connection ended or failed first (a sidecar's liveness check connects and closes).
pub async fn read_request_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    Some(head)
}

/// All providers of `namespace` one search on `node` finds.
pub async fn providers(node: &Node, namespace: &str) -> Vec<PeerId> {
    node.find_providers(namespace).await.collect().await
}

/// A child process of one of our binaries, killed when dropped, whose standard output lines
/// are collected so tests can wait for them.
pub struct Process {
    /// The child process. Killed when the [`Process`] is dropped if it was started with
    /// `kill_on_drop`, as [`Process::spawn`] does.
    pub child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl Process {
    /// Starts `binary` with `args` and the variables `env` added to this process's
    /// environment, collecting its output. `P2P_BOOTSTRAPS` and `P2P_PSK` are removed after
    /// `env` is applied, so the child never gets them, even from `env`. Panics if it cannot
    /// start.
    pub fn spawn(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut command = Command::new(binary);
        command
            .args(args)
            .envs(env.iter().copied())
            .env_remove("P2P_BOOTSTRAPS")
            .env_remove("P2P_PSK")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
        Self::from_child(child)
    }

    /// Collects the output of a child started with piped standard output and error.
    pub fn from_child(mut child: Child) -> Process {
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let sink = Arc::clone(&stdout);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let mut err = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        tokio::spawn(async move {
            let mut buffer = vec![0; 4096];
            while let Ok(n) = err.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        Process {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for a standard-output line containing `needle` and returns it.
    pub async fn line_containing(&self, needle: &str, deadline: Duration) -> String {
        let mut found = None;
        wait_until(&format!("a line with '{needle}'"), deadline, || {
            found = self
                .stdout
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            std::future::ready(found.is_some())
        })
        .await;
        found.unwrap()
    }

    /// Everything the process has written to standard error so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the exit; returns whether it exited successfully.
    pub async fn terminate(mut self) -> bool {
        let pid = self.child.id().expect("still running") as i32;
        // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions.
        unsafe { libc_kill(pid, 15) };
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("exits within 10 s of SIGTERM")
            .unwrap();
        status.success()
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

/// A started long-running program: its process, overlay address and metrics address.
pub struct Daemon {
    /// The running program; it is killed when dropped.
    pub process: Process,
    /// The first address it printed that ends in `/p2p/<peer id>`, for other nodes to
    /// bootstrap from.
    pub bootstrap: BootstrapAddr,
    /// Where its `/metrics` endpoint listens, as `HOST:PORT`.
    pub metrics: String,
}

/// Starts `binary` with `args` and waits until it prints its overlay and metrics addresses.
pub async fn start_daemon(binary: &str, args: &[&str]) -> Daemon {
    let process = Process::spawn(binary, args, &[]);
    let deadline = Duration::from_secs(20);
    let bootstrap = process
        .line_containing("/p2p/", deadline)
        .await
        .parse()
        .unwrap();
    let metrics = process.line_containing("metrics: http://", deadline).await;
    let metrics = metrics["metrics: http://".len()..]
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    Daemon {
        process,
        bootstrap,
        metrics,
    }
}

/// GET `path` from `addr` (HOST:PORT); returns status and body, or `None` if not reachable
/// or not answered within [`HTTP_DEADLINE`].
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    // Under a deadline: a server that accepts and never answers is a failure, not a hang.
    tokio::time::timeout(HTTP_DEADLINE, http_get_unbounded(addr, path))
        .await
        .ok()
        .flatten()
}

/// How long [`http_get`] waits for a whole answer.
pub const HTTP_DEADLINE: Duration = Duration::from_secs(30);

async fn http_get_unbounded(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, dechunk(&body)))
}

/// Undoes HTTP/1.1 chunked transfer encoding if the body uses it (good enough for tests).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 || tail.len() < size {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    if out.is_empty() { body.to_owned() } else { out }
}

/// A TCP port free right now on loopback, for programs that cannot report the port they
/// bound (Prometheus, etcd) or must be given one in advance (a restart on the same port).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct loopback ports free right now (all held at once while choosing, so none
/// repeats), chosen at random below the kernel's ephemeral range (`ip_local_port_range`):
/// there no `bind(0)` and no outgoing connection of another test or program is given one
/// between this choice and the program binding it, as happened with ports from `bind(0)`.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::hash::BuildHasher;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (ephemeral.saturating_sub(20_000).max(1024), ephemeral);
    let random = std::collections::hash_map::RandomState::new();
    let mut held: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut tries = 0u64;
    while held.len() < n {
        tries += 1;
        assert!(tries < 100_000, "no free port below {high}");
        let port = low + (random.hash_one(tries) % u64::from(high - low)) as u16;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// The multiaddr of a loopback TCP port.
pub fn loopback(port: u16) -> Multiaddr {
    format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()
}

/// Runs a binary to completion with a deadline; returns (exit success, stdout, stderr).
pub async fn run_to_exit(
    binary: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(binary)
            .args(args)
            .env_remove("P2P_BOOTSTRAPS")
            .env_remove("P2P_PSK")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{binary} {args:?} did not exit within 30 s"))
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
