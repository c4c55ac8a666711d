//! The four request paths the data plane is compared on, started together in front of one
//! service (`bench serve`) and pinned: straight to the service; through our two proxies
//! (ingress -> QUIC -> sidecar, [`ProxyPath`]); through two nginx; through two haproxy.

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
}

impl Via {
    pub const ALL: [Via; 4] = [Via::Direct, Via::Ours, Via::Nginx, Via::Haproxy];
    /// The paths with proxies on them.
    pub const PROXIED: [Via; 3] = [Via::Ours, Via::Nginx, Via::Haproxy];

    pub fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Ours => "ours",
            Via::Nginx => "nginx",
            Via::Haproxy => "haproxy",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Via::Direct => "direct: client -> service",
            Via::Ours => "ours: client -> ingress -> QUIC -> sidecar -> service",
            Via::Nginx => "nginx: client -> nginx A -> nginx B -> service",
            Via::Haproxy => "haproxy: client -> haproxy A -> haproxy B -> service",
        }
    }

    /// The two hops, as named in the per-hop tables.
    pub fn hops(self) -> &'static str {
        match self {
            Via::Direct => "direct (no hop)",
            Via::Ours => "ours (ingress, sidecar)",
            Via::Nginx => "nginx (A, B; master + worker each)",
            Via::Haproxy => "haproxy (A, B)",
        }
    }
}

/// Every path's processes, stopped when this is dropped (or with [`Paths::stop`]).
pub struct Paths {
    pub ours: ProxyPath,
    nginx: TwoHops,
    haproxy: TwoHops,
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
        let (ours, dir, nginx, haproxy) = pinning
            .start_pinned(async {
                let ours = ProxyPath::start().await?;
                let dir = tempfile::tempdir()?;
                let nginx = foreign::start_nginx(dir.path(), ours.service).await?;
                let haproxy = foreign::start_haproxy(dir.path(), ours.service).await?;
                anyhow::Ok((ours, dir, nginx, haproxy))
            })
            .await?;
        let mut processes: Vec<(String, u32)> = vec![
            ("bench (load)".into(), std::process::id()),
            ("service".into(), ours.service_pid),
            ("ingress".into(), ours.ingress_pid),
            ("sidecar".into(), ours.sidecar_pid),
        ];
        for (name, hops) in [("nginx", &nginx), ("haproxy", &haproxy)] {
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
        })
    }

    /// Stops nginx and haproxy gracefully (ours and the service are killed on drop).
    pub async fn stop(self) {
        self.nginx.stop().await;
        self.haproxy.stop().await;
    }
}
