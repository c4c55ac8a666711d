//! The request path through the data plane, built from the release binaries as processes: a
//! ping-monitor (bootstrap), an hl-service (lookup) where hl-cli registers `bench-echo`, the
//! test service (`bench serve`), its sidecar proxy and an ingress proxy. Then the
//! data-plane scenarios (`side-by-side`, `stream`) measure requests straight to the service and
//! through ingress -> QUIC -> sidecar on it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use http::{StatusCode, Uri};
use tempfile::TempDir;

use crate::{
    load,
    procs::{
        Daemon, Extra, Host, Process, run_measured, sibling_binary, spawn_reading_with,
        start_monitor_and_lookup_on, status_kb,
    },
    serve,
};

/// The service registered with the lookup and served behind the sidecar.
const SERVICE: &str = "bench-echo";
/// How long the ingress may take to find the sidecar's instance.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Every process of the path, killed when this is dropped.
pub struct ProxyPath {
    /// Where the service listens, for requests that bypass the proxies.
    pub service: SocketAddr,
    /// The ingress proxy's HTTP listener.
    pub ingress: SocketAddr,
    pub ingress_pid: u32,
    pub sidecar_pid: u32,
    /// The service process (`bench serve`).
    pub service_pid: u32,
    /// Held so they live as long as the path: the proxies, the service, the lookup and the
    /// bootstrap.
    _held: (Process, Process, Process, Lookup),
}

/// A ping-monitor (the bootstrap) and an hl-service (the lookup) with its data directory,
/// killed when dropped.
pub struct Lookup {
    /// The bootstrap's multiaddr, for `--bootstrap`.
    pub bootstrap: String,
    /// Held so they live as long as this (killed before the directory is removed).
    _daemons: (Daemon, Daemon),
    /// A temporary directory removed when dropped (the lookup's data is under it).
    pub dir: TempDir,
}

impl Lookup {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(Host::Loopback).await
    }

    /// A lookup listening on `host`'s address.
    pub async fn start_on(host: Host<'_>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (monitor, lookup) =
            start_monitor_and_lookup_on(&dir.path().join("lookup"), host).await?;
        let bootstrap = monitor.bootstrap.to_string();
        Ok(Self {
            bootstrap,
            _daemons: (lookup, monitor),
            dir,
        })
    }

    /// A lookup where `service` is registered with a placeholder artifact: its instances are
    /// started by the benchmark, never from the record.
    pub async fn with_service(service: &str) -> anyhow::Result<Self> {
        let lookup = Self::start().await?;
        let artifact = lookup.dir.path().join("artifact");
        // A placeholder program (add refuses what is not one).
        std::fs::write(
            &artifact,
            format!("#!/bin/sh\n# {service} placeholder\nexit 1\n"),
        )?;
        lookup
            .add(&["--exec", artifact.to_str().context("path")?, service])
            .await?;
        Ok(lookup)
    }

    /// Registers a service: `hl-cli --bootstrap B add ARGS...`.
    pub async fn add(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec![
            "--bootstrap".to_owned(),
            self.bootstrap.clone(),
            "add".into(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        tokio::task::spawn_blocking(move || {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            run_measured("hl-cli", &all)
        })
        .await??;
        Ok(())
    }
}

/// Peak RSS (VmHWM) of the two proxies, in kB.
pub struct Peaks {
    pub ingress: u64,
    pub sidecar: u64,
}

impl ProxyPath {
    /// Starts every process and waits until a request through the ingress is answered.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// [`ProxyPath::start`] with more `flags` for both proxies.
    pub async fn start_with(flags: &[&str]) -> anyhow::Result<Self> {
        let lookup = Lookup::with_service(SERVICE).await?;
        let bootstrap = lookup.bootstrap.clone();

        let (service_process, service) = serve::start().await?;
        let service_arg = service.to_string();
        let sidecar = start_proxy_with(
            &bootstrap,
            flags,
            &[SERVICE, &service_arg],
            Extra::default(),
        )
        .await?;
        let ingress = start_proxy_with(&bootstrap, flags, &[], Extra::default()).await?;
        let path = Self {
            service,
            ingress: ingress.ingress,
            ingress_pid: ingress.process.pid,
            sidecar_pid: sidecar.process.pid,
            service_pid: service_process.pid,
            _held: (ingress.process, sidecar.process, service_process, lookup),
        };
        path.wait_ready().await?;
        Ok(path)
    }

    /// `path` on the service itself.
    pub fn direct(&self, path: &str) -> Uri {
        format!("http://{}{path}", self.service)
            .parse()
            .expect("valid URI")
    }

    /// `path` on the service through the ingress and the sidecar.
    pub fn through_proxies(&self, path: &str) -> Uri {
        format!("http://{}/{SERVICE}{path}", self.ingress)
            .parse()
            .expect("valid URI")
    }

    pub fn peaks(&self) -> anyhow::Result<Peaks> {
        Ok(Peaks {
            ingress: status_kb(self.ingress_pid, "VmHWM")?,
            sidecar: status_kb(self.sidecar_pid, "VmHWM")?,
        })
    }

    /// Until the ingress has found the sidecar (through the lookup's record and the DHT).
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client: load::GetClient = load::client();
        let uri = self.through_proxies("/ready");
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let answer = tokio::time::timeout_at(deadline.into(), client.get(uri.clone())).await;
            let last = match answer {
                Ok(Ok(response)) if response.status() == StatusCode::OK => return Ok(()),
                Ok(Ok(response)) => format!("answered {}", response.status()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer".to_owned(),
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "the ingress did not reach {SERVICE} within {READY_WITHIN:?}: {last}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A proxy process and where it listens.
pub struct StartedProxy {
    pub process: Process,
    /// Its HTTP ingress.
    pub ingress: SocketAddr,
    /// Its Prometheus endpoint.
    pub metrics: SocketAddr,
    /// Its overlay identity (the `instance` label of the ingress's per-instance series).
    pub peer: String,
}

/// Starts a proxy on loopback (ingress on a free port; a sidecar with `service` given as
/// `[SERVICE, ADDR]`) once its data plane is up, with more `flags` (`--quic-addr` replaces
/// the default, any port) and `extra` (its logs kept, say).
pub async fn start_proxy_with(
    bootstrap: &str,
    flags: &[&str],
    service: &[&str],
    extra: Extra<'_>,
) -> anyhow::Result<StartedProxy> {
    let listen = format!("{}:0", extra.host.ip());
    let mut args = vec![
        "--bootstrap",
        bootstrap,
        "--ephemeral",
        "--p2p-listen-addr",
        &listen,
        "--prom-listen-addr",
        &listen,
    ];
    if !flags.contains(&"--quic-addr") {
        args.extend(["--quic-addr", &listen]);
    }
    args.extend_from_slice(flags);
    args.push("0");
    args.extend_from_slice(service);
    // "<role> <peer> listening on:" comes first; the ingress, the data plane's and the
    // metrics' lines once each listens (in that order today; any order is taken).
    let (mut peer, mut metrics, mut ingress, mut data_plane) = (None, None, None, false);
    let (process, ((ingress, metrics), peer)) =
        spawn_reading_with(&sibling_binary("proxy")?, &args, extra, |line| {
            if let Some(head) = line.strip_suffix(" listening on:") {
                peer = head.split_whitespace().nth(1).map(str::to_owned);
            }
            if let Some(addr) = line.strip_prefix("metrics: http://") {
                metrics = addr.trim_end_matches("/metrics").parse().ok();
            }
            if let Some(addr) = line.strip_prefix("ingress: http://") {
                ingress = addr.parse().ok();
            }
            data_plane |= line.starts_with("data plane (QUIC): ");
            data_plane
                .then(|| ingress.zip(metrics).zip(peer.clone()))
                .flatten()
        })
        .await?;
    Ok(StartedProxy {
        process,
        ingress,
        metrics,
        peer,
    })
}
