//! The request paths the data plane is compared on, started together in front of one service
//! (`bench serve`) and pinned: straight to the service; through our two proxies (ingress ->
//! QUIC -> sidecar, [`ProxyPath`]); through two nginx; through two haproxy; and through two
//! nginx and two haproxy with TLS 1.3 between the two, like our encrypted hop.

use std::time::Duration;

use http::Uri;
use tempfile::TempDir;

use crate::{
    foreign::{self, TwoHops},
    pinning::Pinning,
    procs::cpu_time,
    proxy_path::ProxyPath,
};

/// One of the paths.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Direct,
    Ours,
    Nginx,
    Haproxy,
    NginxTls,
    HaproxyTls,
}

impl Via {
    pub const ALL: [Via; 6] = [
        Via::Direct,
        Via::Ours,
        Via::Nginx,
        Via::Haproxy,
        Via::NginxTls,
        Via::HaproxyTls,
    ];
    /// The paths with proxies on them.
    pub const PROXIED: [Via; 5] = [
        Via::Ours,
        Via::Nginx,
        Via::Haproxy,
        Via::NginxTls,
        Via::HaproxyTls,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Ours => "ours",
            Via::Nginx => "nginx",
            Via::Haproxy => "haproxy",
            Via::NginxTls => "nginx-tls",
            Via::HaproxyTls => "haproxy-tls",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Via::Direct => "direct: client -> service",
            Via::Ours => "ours: client -> ingress -> QUIC -> sidecar -> service",
            Via::Nginx => "nginx: client -> nginx A -> nginx B -> service",
            Via::Haproxy => "haproxy: client -> haproxy A -> haproxy B -> service",
            Via::NginxTls => "nginx-tls: client -> nginx A -> TLS 1.3 -> nginx B -> service",
            Via::HaproxyTls => {
                "haproxy-tls: client -> haproxy A -> TLS 1.3 -> haproxy B -> service"
            }
        }
    }

    /// The two hops, as named in the per-hop tables.
    pub fn hops(self) -> &'static str {
        match self {
            Via::Direct => "direct (no hop)",
            Via::Ours => "ours (ingress, sidecar)",
            Via::Nginx => "nginx (A, B; master + worker each)",
            Via::Haproxy => "haproxy (A, B)",
            Via::NginxTls => "nginx-tls (A, B; master + worker each)",
            Via::HaproxyTls => "haproxy-tls (A, B)",
        }
    }
}

/// Every path's processes, stopped when this is dropped (or with [`Paths::stop`]).
pub struct Paths {
    pub ours: ProxyPath,
    nginx: TwoHops,
    haproxy: TwoHops,
    nginx_tls: TwoHops,
    haproxy_tls: TwoHops,
    /// How the processes were pinned, read back from /proc.
    pub pinned: String,
    /// Held: this process stays on its CPU until the paths are stopped.
    _pinning: Pinning,
    /// nginx's and haproxy's configurations and logs.
    _dir: TempDir,
}

impl Paths {
    /// Starts every path (with nginx and haproxy from PATH or the sbin directories, a clear
    /// error naming the package if one is missing) and waits until each answers.
    pub async fn start() -> anyhow::Result<Self> {
        // Before anything starts: a clear message if a package is missing.
        foreign::require("nginx")?;
        foreign::require("haproxy")?;
        let pinning = Pinning::new();
        let (ours, dir, [nginx, haproxy, nginx_tls, haproxy_tls]) = pinning
            .start_pinned(async {
                let ours = ProxyPath::start().await?;
                let dir = tempfile::tempdir()?;
                let (at, service) = (dir.path(), ours.service);
                let tls = foreign::Tls::generate(at)?;
                let peers = [
                    foreign::start_nginx(at, service, None).await?,
                    foreign::start_haproxy(at, service, None, 1).await?,
                    foreign::start_nginx(at, service, Some(&tls)).await?,
                    foreign::start_haproxy(at, service, Some(&tls), 1).await?,
                ];
                anyhow::Ok((ours, dir, peers))
            })
            .await?;
        let mut processes: Vec<(String, u32)> = vec![
            ("bench (load)".into(), std::process::id()),
            ("service".into(), ours.service_pid),
            ("ingress".into(), ours.ingress_pid),
            ("sidecar".into(), ours.sidecar_pid),
        ];
        for (name, hops) in [
            ("nginx", &nginx),
            ("haproxy", &haproxy),
            ("nginx-tls", &nginx_tls),
            ("haproxy-tls", &haproxy_tls),
        ] {
            for (hop, proxy) in [("A", &hops.first), ("B", &hops.second)] {
                for pid in proxy.pids() {
                    let role = if pid == proxy.pid { "" } else { " worker" };
                    processes.push((format!("{name} {hop}{role}"), pid));
                }
            }
        }
        let pinned = pinning.describe(&processes);
        Ok(Self {
            ours,
            nginx,
            haproxy,
            nginx_tls,
            haproxy_tls,
            pinned,
            _pinning: pinning,
            _dir: dir,
        })
    }

    /// `path` on the service through `via`.
    pub fn uri(&self, via: Via, path: &str) -> Uri {
        match via {
            Via::Direct => self.ours.direct(path),
            Via::Ours => self.ours.through_proxies(path),
            Via::Nginx => self.nginx.uri(path),
            Via::Haproxy => self.haproxy.uri(path),
            Via::NginxTls => self.nginx_tls.uri(path),
            Via::HaproxyTls => self.haproxy_tls.uri(path),
        }
    }

    /// CPU time so far of the first and the second hop (none for direct).
    pub fn hop_cpu(&self, via: Via) -> anyhow::Result<Option<(Duration, Duration)>> {
        Ok(match via {
            Via::Direct => None,
            Via::Ours => Some((
                cpu_time(self.ours.ingress_pid)?,
                cpu_time(self.ours.sidecar_pid)?,
            )),
            Via::Nginx => Some(self.nginx.cpu()?),
            Via::Haproxy => Some(self.haproxy.cpu()?),
            Via::NginxTls => Some(self.nginx_tls.cpu()?),
            Via::HaproxyTls => Some(self.haproxy_tls.cpu()?),
        })
    }

    /// Peak RSS (VmHWM, kB) so far of the first and the second hop (none for direct).
    pub fn hop_peaks(&self, via: Via) -> anyhow::Result<Option<(u64, u64)>> {
        Ok(match via {
            Via::Direct => None,
            Via::Ours => {
                let peaks = self.ours.peaks()?;
                Some((peaks.ingress, peaks.sidecar))
            }
            Via::Nginx => Some(self.nginx.peaks()?),
            Via::Haproxy => Some(self.haproxy.peaks()?),
            Via::NginxTls => Some(self.nginx_tls.peaks()?),
            Via::HaproxyTls => Some(self.haproxy_tls.peaks()?),
        })
    }

    /// Stops nginx and haproxy gracefully (ours and the service are killed on drop).
    pub async fn stop(self) {
        for hops in [self.nginx, self.haproxy, self.nginx_tls, self.haproxy_tls] {
            hops.stop().await;
        }
    }
}
