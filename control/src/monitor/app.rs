//! The ping-monitor program: flags, start-up, the metrics endpoint and shutdown.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use futures::FutureExt;
use libp2p::Multiaddr;

use super::exporter::{LabelStyle, PeerRow, PeersView, RttCollector};
use crate::common::{
    daemon::Daemon,
    http,
    net::{parse_p2p_listen_addr, parse_socket_addr},
    overlay_args::OverlayArgs,
};

/// Where the identity is kept unless --keyfile says otherwise (the original's default).
pub const DEFAULT_KEYFILE: &str = "~/.privKeyPing";

/// Bootstrap node of the overlay: accepts peers, pings every connected one and exports the
/// RTTs to Prometheus (/metrics) and as JSON (/peers).
#[derive(clap::Parser, Debug)]
#[command(name = "ping-monitor", version)]
pub struct Cli {
    /// P2P listen address: IP:PORT, :PORT (all interfaces) or a TCP multiaddr.
    #[arg(long, env = "MTC_P2P_LISTEN_ADDR", default_value = ":4001", value_name = "ADDR",
          value_parser = parse_p2p_listen_addr)]
    pub p2p_listen_addr: Multiaddr,

    /// Address of the Prometheus endpoint (/metrics, /peers): IP:PORT or :PORT.
    #[arg(long, env = "MTC_PROM_LISTEN_ADDR", default_value = ":9100", value_name = "ADDR",
          value_parser = parse_socket_addr)]
    pub prom_listen_addr: SocketAddr,

    /// Value of the `host` label on every series [default: this machine's hostname].
    #[arg(long, env = "MTC_HOSTNAME")]
    pub hostname: Option<String>,

    /// How often every connected peer is pinged.
    #[arg(long, env = "MTC_PING_INTERVAL", default_value = "1s", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// A peer without a successful ping for this long is dropped from the metrics.
    #[arg(long, env = "MTC_PEER_EXPIRY", default_value = "10m", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub peer_expiry: Duration,

    /// Spelling of the peer label: `seed` writes the original's `targetHost`, `snake` writes
    /// `target_host` as Prometheus's naming conventions want.
    #[arg(
        long,
        env = "MTC_METRIC_LABELS",
        value_enum,
        default_value_t,
        value_name = "STYLE"
    )]
    pub metric_labels: LabelStyle,

    /// TOML file with any of these flags as keys (`prom-listen-addr = ":9100"`); flags win over
    /// it, it wins over environment variables.
    #[arg(long, env = "PING_MONITOR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Debug logs (RUST_LOG overrides).
    #[arg(long)]
    pub debug: bool,

    #[command(flatten)]
    pub overlay: OverlayArgs,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = cli.overlay.node_config("ping-monitor", DEFAULT_KEYFILE)?;
    config.listen = vec![cli.p2p_listen_addr.clone()];
    config.timing.ping_interval = cli.ping_interval;
    config.timing.peer_expiry = cli.peer_expiry;
    let host = cli
        .hostname
        .clone()
        .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned());

    let daemon = Daemon::start(config, cli.prom_listen_addr).await?;
    let node = daemon.node.clone();
    let rtt = RttCollector::new(
        Arc::clone(node.rtt_table()),
        host.clone(),
        cli.metric_labels,
    );
    daemon.registry.register(Box::new(rtt))?;
    let peers_node = node.downgrade();
    let peers: http::Handler = Arc::new(move || {
        let node = peers_node.upgrade();
        let host = host.clone();
        async move {
            let Some(node) = node else {
                return ("application/json", "{}".to_owned());
            };
            let connected = node.connected_peers().await;
            let rows = node
                .rtt_table()
                .snapshot(std::time::Instant::now())
                .into_iter()
                .map(|(peer, rtt)| PeerRow {
                    peer: peer.to_string(),
                    connected: connected.contains(&peer),
                    rtt,
                })
                .collect();
            let view = PeersView {
                host,
                peer_id: node.peer_id().to_string(),
                peers: rows,
            };
            (
                "application/json",
                serde_json::to_string_pretty(&view).unwrap_or_default(),
            )
        }
        .boxed()
    });

    daemon.run_until_signal(vec![("/peers", peers)]).await
}
