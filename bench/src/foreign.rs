//! Debian's nginx and haproxy as the two-hop paths the data plane is compared with: started
//! here in the foreground with generated configurations in a temporary directory (never their
//! packaged daemons), one process (nginx: one master and one worker; haproxy: one thread) per
//! hop, each keeping its upstream connections alive. Each runs twice: plain, and with the hop
//! between its two proxies encrypted ([`Tls`]: TLS 1.3, a self-signed certificate made here,
//! connections kept alive and sessions resumed), the like-for-like peer of our QUIC hop.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use http::{StatusCode, Uri};
use tokio::process::{Child, Command};

use crate::{
    load,
    procs::{children, cpu_time, status_kb},
};

/// How long nginx or haproxy may take to answer through both hops.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// One of Debian's proxies, started here: a foreground process (and, for nginx, its worker),
/// stopped with SIGTERM when dropped.
pub struct Foreign {
    child: Child,
    pub pid: u32,
}

impl Foreign {
    /// The process and its children (nginx's worker).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid];
        pids.extend(children(self.pid));
        pids
    }

    /// CPU time (user + system) of the process and its children.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        self.pids().into_iter().map(cpu_time).sum()
    }

    /// Summed peak RSS (VmHWM) of the process and its children, in kB.
    pub fn peak_kb(&self) -> anyhow::Result<u64> {
        self.pids()
            .into_iter()
            .map(|pid| status_kb(pid, "VmHWM"))
            .sum()
    }

    async fn stop(mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: an nginx master stops its worker on the way out. Harmless once
        // it has exited and been waited for (then the call fails with ESRCH, or the PID is
        // not reused this soon).
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: as in `stop`.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        }
    }
}

/// A program on PATH or in the sbin directories (not always on a user's PATH).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

pub fn require(name: &str) -> anyhow::Result<PathBuf> {
    find_program(name).with_context(|| {
        format!(
            "`{name}` not found: the side-by-side scenario runs Debian's {name}; install it with \
             `apt-get install -y --no-install-recommends {name}` (package `{name}`)"
        )
    })
}

/// A free port on loopback (the listener is closed again; the proxy binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Two proxies of one kind in a row: `first` takes the requests, `second` sends them on to the
/// service.
pub struct TwoHops {
    pub first: Foreign,
    pub second: Foreign,
    listen: SocketAddr,
}

impl TwoHops {
    /// Where the first hop listens.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    pub fn uri(&self, path: &str) -> Uri {
        format!("http://{}{path}", self.listen)
            .parse()
            .expect("valid URI")
    }

    pub fn cpu(&self) -> anyhow::Result<(Duration, Duration)> {
        Ok((self.first.cpu()?, self.second.cpu()?))
    }

    pub fn peaks(&self) -> anyhow::Result<(u64, u64)> {
        Ok((self.first.peak_kb()?, self.second.peak_kb()?))
    }

    pub async fn stop(self) {
        self.first.stop().await;
        self.second.stop().await;
    }
}

/// The certificate and key of the second hop of a TLS path, made here (self-signed, for
/// `localhost`); the first hop does not verify it, as a peer inside one deployment would pin
/// it rather than ask a public CA.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    /// Certificate and key in one file, as haproxy takes them.
    combined: PathBuf,
}

impl Tls {
    pub fn generate(dir: &Path) -> anyhow::Result<Self> {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .context("cannot make a certificate for the TLS paths")?;
        let (cert, key) = (made.cert.pem(), made.key_pair.serialize_pem());
        let tls = Self {
            cert: dir.join("hop.crt"),
            key: dir.join("hop.key"),
            combined: dir.join("hop.pem"),
        };
        std::fs::write(&tls.cert, &cert)?;
        std::fs::write(&tls.key, &key)?;
        std::fs::write(&tls.combined, format!("{cert}{key}"))?;
        Ok(tls)
    }
}

/// What a hop's configuration says about TLS.
#[derive(Clone, Copy)]
enum HopTls<'a> {
    /// Plain HTTP both ways.
    None,
    /// The first hop: plain from the client, TLS to the second.
    ToNext,
    /// The second hop: TLS from the first, plain to the service.
    FromPrevious(&'a Tls),
}

/// Starts `program` with `args`, its standard error kept in `log`.
fn spawn_foreign(program: &Path, args: &[&str], log: &Path) -> anyhow::Result<Foreign> {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let pid = child.id().context("exited at once")?;
    Ok(Foreign { child, pid })
}

fn nginx_config(
    dir: &Path,
    name: &str,
    listen: u16,
    upstream: SocketAddr,
    tls: HopTls<'_>,
) -> String {
    let (scheme, upstream_tls) = match tls {
        HopTls::ToNext => (
            "https",
            "proxy_ssl_protocols TLSv1.3;\n            proxy_ssl_session_reuse on;\n            ",
        ),
        _ => ("http", ""),
    };
    let listen_tls = match tls {
        HopTls::FromPrevious(tls) => format!(
            " ssl;\n        ssl_protocols TLSv1.3;\n        ssl_certificate {};\n        \
             ssl_certificate_key {};\n        ssl_session_cache shared:{name}:1m",
            tls.cert.display(),
            tls.key.display()
        ),
        _ => String::new(),
    };
    let server = format!(
        "listen 127.0.0.1:{listen}{listen_tls};
        location / {{
            {upstream_tls}proxy_pass {scheme}://next;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            # Bodies of any size, streamed both ways as ours and haproxy do (nginx would
            # otherwise refuse uploads over 1 MiB and spool large bodies to disk).
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_buffering off;
        }}"
    );
    nginx_config_with(dir, name, upstream, &server)
}

/// An nginx configuration: one worker, its files under `dir` named after `name`, kept-alive
/// connections to `upstream` (as `next`), and one `server` block holding `server`.
fn nginx_config_with(dir: &Path, name: &str, upstream: SocketAddr, server: &str) -> String {
    let dir = dir.display();
    // As root, nginx would run its worker as `nobody`, who cannot use the temporary directory.
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root root;"
    } else {
        ""
    };
    format!(
        "{user}
worker_processes 1;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
    keepalive_requests 1000000;
    upstream next {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        {server}
    }}
}}
"
    )
}

/// What haproxy proxies: HTTP requests (kept-alive upstream connections), or TCP
/// connections as they are (`mode tcp`, one upstream connection per client connection), or
/// gRPC (HTTP/2 without TLS on both sides).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Http,
    Tcp,
    Grpc,
}

fn haproxy_config(
    listen: u16,
    upstream: SocketAddr,
    tls: HopTls<'_>,
    mode: Mode,
    threads: usize,
) -> String {
    let bind_tls = match tls {
        HopTls::FromPrevious(tls) => {
            format!(" ssl crt {} ssl-min-ver TLSv1.3", tls.combined.display())
        }
        _ => String::new(),
    };
    let server_tls = match tls {
        HopTls::ToNext => " ssl verify none ssl-min-ver TLSv1.3",
        _ => "",
    };
    let h2 = if mode == Mode::Grpc { " proto h2" } else { "" };
    let mode = match mode {
        Mode::Http | Mode::Grpc => {
            "mode http\n    timeout http-keep-alive 30s\n    http-reuse always"
        }
        Mode::Tcp => "mode tcp",
    };
    format!(
        "global
    nbthread {threads}
    maxconn 4096
defaults
    {mode}
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend in
    bind 127.0.0.1:{listen}{bind_tls}{h2}
    default_backend next
backend next
    server next {upstream}{server_tls}{h2}
"
    )
}

/// The TLS of hop `name` (`<kind>-a` or `<kind>-b`) of a path whose inner hop is encrypted
/// with `tls`, if it is.
fn hop_tls<'a>(name: &str, tls: Option<&'a Tls>) -> HopTls<'a> {
    match tls {
        None => HopTls::None,
        Some(_) if name.ends_with("-a") => HopTls::ToNext,
        Some(tls) => HopTls::FromPrevious(tls),
    }
}

/// nginx B (to the service) and nginx A (to B), each a master with one worker; with `tls`,
/// A speaks TLS to B.
pub async fn start_nginx(
    dir: &Path,
    service: SocketAddr,
    tls: Option<&Tls>,
) -> anyhow::Result<TwoHops> {
    let program = require("nginx")?;
    let kind = if tls.is_some() { "nginx-tls" } else { "nginx" };
    let start = |name: &str, listen: u16, upstream: SocketAddr| -> anyhow::Result<Foreign> {
        let config = nginx_config(dir, name, listen, upstream, hop_tls(name, tls));
        spawn_nginx(&program, dir, name, &config)
    };
    start_two_hops(kind, dir, service, start).await
}

/// nginx B (to a gRPC service) and nginx A (to B), each a master with one worker, HTTP/2
/// without TLS on both sides (`grpc_pass`), kept-alive upstream connections; started, not
/// waited for (a gRPC call says when they answer).
pub fn start_nginx_grpc(dir: &Path, service: SocketAddr) -> anyhow::Result<TwoHops> {
    let program = require("nginx")?;
    let start = |name: &str, listen: u16, upstream: SocketAddr| -> anyhow::Result<Foreign> {
        let server = format!(
            "listen 127.0.0.1:{listen} http2;
        location / {{
            grpc_pass grpc://next;
        }}"
        );
        spawn_nginx(
            &program,
            dir,
            name,
            &nginx_config_with(dir, name, upstream, &server),
        )
    };
    launch_two_hops("nginx-grpc", service, start)
}

/// Starts nginx in the foreground with `config`, written to `<dir>/<name>.conf`.
fn spawn_nginx(program: &Path, dir: &Path, name: &str, config: &str) -> anyhow::Result<Foreign> {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, config)?;
    let early_log = dir.join(format!("{name}.early.log"));
    spawn_foreign(
        program,
        &[
            "-p",
            dir.to_str().context("path")?,
            "-e",
            early_log.to_str().context("path")?,
            "-c",
            path.to_str().context("path")?,
            "-g",
            "daemon off;",
        ],
        &dir.join(format!("{name}.stderr")),
    )
}

/// haproxy B (to the service) and haproxy A (to B), one process with `threads` threads each;
/// with `tls`, A speaks TLS to B.
pub async fn start_haproxy(
    dir: &Path,
    service: SocketAddr,
    tls: Option<&Tls>,
    threads: usize,
) -> anyhow::Result<TwoHops> {
    let kind = if tls.is_some() {
        "haproxy-tls"
    } else {
        "haproxy"
    };
    let hops = launch_haproxy(kind, dir, service, tls, Mode::Http, threads)?;
    wait_ready(kind, &hops, dir).await?;
    Ok(hops)
}

/// haproxy B and A as [`start_haproxy`] makes them, in `mode` with `threads` threads, named `kind`, without waiting
/// for them to answer (a TCP service has its own way of saying so).
pub fn launch_haproxy(
    kind: &str,
    dir: &Path,
    service: SocketAddr,
    tls: Option<&Tls>,
    mode: Mode,
    threads: usize,
) -> anyhow::Result<TwoHops> {
    let program = require("haproxy")?;
    let start = |name: &str, listen: u16, upstream: SocketAddr| -> anyhow::Result<Foreign> {
        let config = dir.join(format!("{name}.cfg"));
        let hop = hop_tls(name, tls);
        std::fs::write(
            &config,
            haproxy_config(listen, upstream, hop, mode, threads),
        )?;
        spawn_foreign(
            &program,
            &["-f", config.to_str().context("path")?, "-db"],
            &dir.join(format!("{name}.stderr")),
        )
    };
    launch_two_hops(kind, service, start)
}

/// `<name>-b` to the service and `<name>-a` to it, each started by `start(name, listen,
/// upstream)` on a free port; once a GET through both is answered.
async fn start_two_hops(
    name: &str,
    dir: &Path,
    service: SocketAddr,
    start: impl Fn(&str, u16, SocketAddr) -> anyhow::Result<Foreign>,
) -> anyhow::Result<TwoHops> {
    let hops = launch_two_hops(name, service, start)?;
    wait_ready(name, &hops, dir).await?;
    Ok(hops)
}

/// `<name>-b` to the service and `<name>-a` to it, started.
fn launch_two_hops(
    name: &str,
    service: SocketAddr,
    start: impl Fn(&str, u16, SocketAddr) -> anyhow::Result<Foreign>,
) -> anyhow::Result<TwoHops> {
    let (a_port, b_port) = (free_port()?, free_port()?);
    let second = start(&format!("{name}-b"), b_port, service)?;
    let first = start(
        &format!("{name}-a"),
        a_port,
        (Ipv4Addr::LOCALHOST, b_port).into(),
    )?;
    Ok(TwoHops {
        first,
        second,
        listen: (Ipv4Addr::LOCALHOST, a_port).into(),
    })
}

/// What haproxy or nginx said in `dir` about the path `name`, for an error.
pub fn logs_of(name: &str, dir: &Path) -> String {
    let mut logs = String::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
        if file.starts_with(name) && (file.ends_with(".log") || file.ends_with(".stderr")) {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text.trim().is_empty() {
                logs.push_str(&format!("\n{file}:\n{}", text.trim()));
            }
        }
    }
    logs
}

/// Until a GET through both hops is answered 200; the logs in `dir` in the error if not.
async fn wait_ready(name: &str, hops: &TwoHops, dir: &Path) -> anyhow::Result<()> {
    let client: load::GetClient = load::client();
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        let answer = tokio::time::timeout_at(deadline.into(), client.get(hops.uri("/ready"))).await;
        let last = match answer {
            Ok(Ok(response)) if response.status() == StatusCode::OK => return Ok(()),
            Ok(Ok(response)) => format!("answered {}", response.status()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        if Instant::now() >= deadline {
            let logs = logs_of(name, dir);
            bail!("{name} did not answer through both hops within {READY_WITHIN:?}: {last}{logs}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
