//! The hl-service program: a lookup service on the overlay.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use libp2p::Multiaddr;

use super::{
    protocol::{LookupProtocol, NAMESPACE},
    service::{LookupMetrics, LookupService},
    store::{EmbeddedStore, Store},
};
use crate::{
    blob::{BlobStore, transfer},
    common::{
        daemon::Daemon,
        net::{parse_p2p_listen_addr, parse_socket_addr},
        overlay_args::OverlayArgs,
    },
    overlay::identity::expand_home,
};

pub const DEFAULT_KEYFILE: &str = "~/.privKeyHashLookup";

/// Lookup service: resolves service names to their records and holds the artifacts (image
/// archives, executables) so no registry is needed. Serves /mtc/lookup/1 and /mtc/blob/1 on
/// the overlay, /metrics over HTTP.
#[derive(clap::Parser, Debug)]
#[command(name = "hl-service", version)]
pub struct Cli {
    /// Where records (lookup.redb) and blobs (blobs/) are kept.
    #[arg(
        long,
        env = "MTC_DATA_DIR",
        default_value = "~/.local/share/multi-tier-cloud/hl-service",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,

    /// P2P listen address: IP:PORT, :PORT or a TCP multiaddr (:0 picks a free port).
    #[arg(long, env = "MTC_P2P_LISTEN_ADDR", default_value = ":0", value_name = "ADDR",
          value_parser = parse_p2p_listen_addr)]
    pub p2p_listen_addr: Multiaddr,

    /// Address of the Prometheus endpoint: IP:PORT or :PORT.
    #[arg(long, env = "MTC_PROM_LISTEN_ADDR", default_value = ":9102", value_name = "ADDR",
          value_parser = parse_socket_addr)]
    pub prom_listen_addr: SocketAddr,

    /// TOML file with any of these flags as keys; flags win over it, it wins over environment
    /// variables.
    #[arg(long, env = "HL_SERVICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Debug logs (RUST_LOG overrides).
    #[arg(long)]
    pub debug: bool,

    #[command(flatten)]
    pub overlay: OverlayArgs,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = expand_home(&cli.data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let store = Store::Embedded(EmbeddedStore::open(&data_dir.join("lookup.redb"))?);
    let blobs = Arc::new(BlobStore::open(&data_dir.join("blobs"))?);

    let mut config = cli.overlay.node_config("hl-service", DEFAULT_KEYFILE)?;
    config.listen = vec![cli.p2p_listen_addr.clone()];
    let daemon = Daemon::start(config, cli.prom_listen_addr).await?;
    let node = daemon.node.clone();

    let metrics = LookupMetrics::register(&daemon.registry)?;
    let counters = transfer::BlobCounters::register(&daemon.registry)?;
    let service = Arc::new(LookupService::new(store, Arc::clone(&blobs), metrics));
    node.serve::<LookupProtocol, _, _>(move |_peer, request| {
        let service = Arc::clone(&service);
        async move { service.handle(request).await }
    });
    transfer::serve(&node, blobs, counters).await;
    node.advertise(NAMESPACE).await;
    tracing::info!(data_dir = %data_dir.display(), "serving lookups");

    daemon.run_until_signal(vec![]).await
}
