//! The ping-monitor program: flags, start-up, the metrics endpoint and shutdown.

use std::{sync::Arc, time::Duration};

use futures::FutureExt;

use super::exporter::{LabelStyle, PeerRow, PeersView, RttCollector};
use crate::common::{
    daemon::Daemon,
    http,
    program::{CommonArgs, DaemonArgs, Program},
};

/// Where the identity is kept unless --keyfile says otherwise (the original's default).
pub const DEFAULT_KEYFILE: &str = "~/.privKeyPing";

/// Bootstrap node of the overlay: accepts peers, pings every connected one and exports the
/// RTTs to Prometheus (/metrics) and as JSON (/peers).
#[derive(clap::Parser, Debug)]
#[command(name = "ping-monitor", version)]
pub struct Cli {
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

    /// The flags every long-running program takes: P2P and metrics listen addresses, and the
    /// flags every program takes.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

impl Program for Cli {
    const NAME: &'static str = "ping-monitor";
    const CONFIG_ENV: &'static str = "PING_MONITOR_CONFIG";
    const P2P_LISTEN_ADDR: Option<&'static str> = Some(":4001");
    const PROM_LISTEN_ADDR: Option<&'static str> = Some(":9100");

    fn common(&self) -> &CommonArgs {
        &self.daemon.common
    }
}

/// The ping-monitor program: starts the overlay node (others bootstrap from it), pings every
/// connected peer, serves /metrics and /peers, and runs until SIGINT or SIGTERM.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = cli
        .daemon
        .common
        .overlay
        .node_config("ping-monitor", DEFAULT_KEYFILE)?;
    config.listen = vec![cli.daemon.p2p_listen_addr_of::<Cli>()];
    config.timing.ping_interval = cli.ping_interval;
    config.timing.peer_expiry = cli.peer_expiry;
    // Its job is to measure every member: it keeps a connection to each.
    config.connections.keep_all = true;
    let host = cli
        .hostname
        .clone()
        .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned());

    let daemon = Daemon::start(
        config,
        cli.daemon.prom_listen_addr_of::<Cli>().expect("a default"),
    )
    .await?;
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
