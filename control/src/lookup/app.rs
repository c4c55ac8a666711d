//! The hl-service program: a lookup service on the overlay.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;

use super::{
    client,
    etcd::{self, EtcdStore, MemberAddProtocol, MemberAddRequest, MemberSpec},
    protocol::{LookupProtocol, NAMESPACE},
    record::parse_bytes,
    replicate,
    service::{LookupMetrics, LookupService},
    store::{EmbeddedStore, Store},
};
use crate::{
    blob::{BlobStore, transfer},
    common::{
        daemon::Daemon,
        program::{CommonArgs, DaemonArgs, Program},
    },
    overlay::{Backoff, Node, identity::expand_home},
};

/// Where hl-service keeps its identity (private key) unless --keyfile names another file.
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

    /// Use this existing etcd cluster as the record store (comma-separated client URLs).
    #[arg(
        long,
        env = "MTC_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URL,..."
    )]
    pub etcd_endpoints: Vec<String>,

    /// Start a new etcd cluster (an `etcd` process from PATH, supervised by this program) on
    /// --etcd-ip and use it as the record store.
    #[arg(long, conflicts_with = "etcd_endpoints")]
    pub new_etcd_cluster: bool,

    /// IP the etcd member listens on. Given without --new-etcd-cluster, this lookup service
    /// joins the etcd cluster of the lookup services already on the overlay. [default with
    /// --new-etcd-cluster: 127.0.0.1]
    #[arg(
        long,
        env = "MTC_ETCD_IP",
        value_name = "IP",
        conflicts_with = "etcd_endpoints"
    )]
    pub etcd_ip: Option<IpAddr>,

    /// Client port of the etcd member.
    #[arg(long, default_value_t = 2379, value_name = "PORT")]
    pub etcd_client_port: u16,

    /// Peer port of the etcd member.
    #[arg(long, default_value_t = 2380, value_name = "PORT")]
    pub etcd_peer_port: u16,

    /// Copies of each artifact kept on lookup services: this service pushes its copy to others
    /// (or fetches a lost one) until that many hold it, or every lookup service does.
    #[arg(long, env = "MTC_COPIES", default_value_t = replicate::DEFAULT_COPIES, value_name = "N")]
    pub copies: std::num::NonZeroUsize,

    /// Time between two rounds of counting and making copies, e.g. 30s.
    #[arg(long, env = "MTC_REPLICATION_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub replication_interval: Duration,

    /// Largest artifact accepted, e.g. 8GiB; a larger upload is refused before any byte is
    /// sent.
    #[arg(long, env = "MTC_MAX_BLOB_SIZE", default_value = "8GiB", value_parser = parse_bytes, value_name = "SIZE")]
    pub max_blob_size: u64,

    /// The original's debug switch "no bootstraps": joins no network, whatever --bootstrap or
    /// P2P_BOOTSTRAPS say (a lookup service on its own, for trying hl-cli against it).
    #[arg(long)]
    pub local: bool,

    /// The flags every long-running program takes: P2P and metrics listen addresses, and the
    /// flags every program takes.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

impl Program for Cli {
    const NAME: &'static str = "hl-service";
    const CONFIG_ENV: &'static str = "HL_SERVICE_CONFIG";
    const PROM_LISTEN_ADDR: Option<&'static str> = Some(":9102");

    fn common(&self) -> &CommonArgs {
        &self.daemon.common
    }
}

/// The hl-service program: opens the data directory and the record store, joins the overlay,
/// serves lookups and blobs, advertises itself as a lookup service, and runs until SIGINT or
/// SIGTERM.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = expand_home(&cli.data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let blobs =
        Arc::new(BlobStore::open(&data_dir.join("blobs"))?.with_max_blob_bytes(cli.max_blob_size));

    let mut config = cli
        .daemon
        .common
        .overlay
        .node_config("hl-service", DEFAULT_KEYFILE)?;
    if cli.local {
        tracing::info!("--local: no bootstraps; this lookup service joins no network");
        config.bootstraps.clear();
    }
    config.listen = vec![cli.daemon.p2p_listen_addr_of::<Cli>()];
    let daemon = Daemon::start(
        config,
        cli.daemon.prom_listen_addr_of::<Cli>().expect("a default"),
    )
    .await?;
    let node = daemon.node.clone();
    // Kept until shutdown: dropping it stops the etcd member this program supervises.
    let (store, _etcd_member) = open_store(&cli, &data_dir, &node).await?;
    if let Store::Etcd(etcd) = &store {
        let client = etcd.client();
        node.serve::<MemberAddProtocol, _, _>(move |peer, request| {
            let client = client.clone();
            async move {
                tracing::info!(%peer, name = %request.name, "adding etcd member");
                etcd::add_member(client, &request).await
            }
        });
    }

    let metrics = LookupMetrics::register(&daemon.registry)?;
    let counters = transfer::BlobCounters::register(&daemon.registry)?;
    let replication = replicate::ReplicationMetrics::register(&daemon.registry)?;
    let settings = replicate::Settings {
        copies: cli.copies.get(),
        interval: cli.replication_interval,
    };
    tokio::spawn(replicate::run(
        node.clone(),
        store.clone(),
        Arc::clone(&blobs),
        settings,
        replication,
    ));
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

/// The record store the flags ask for: embedded by default, else etcd (existing cluster, new
/// cluster, or joining the cluster of the lookup services on the overlay).
async fn open_store(
    cli: &Cli,
    data_dir: &Path,
    node: &Node,
) -> anyhow::Result<(Store, Option<etcd::EtcdMember>)> {
    if !cli.etcd_endpoints.is_empty() {
        return Ok((
            Store::Etcd(Box::new(EtcdStore::connect(&cli.etcd_endpoints).await?)),
            None,
        ));
    }
    if !cli.new_etcd_cluster && cli.etcd_ip.is_none() {
        return Ok((
            Store::Embedded(EmbeddedStore::open(&data_dir.join("lookup.redb"))?),
            None,
        ));
    }
    let spec = MemberSpec {
        ip: cli.etcd_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        client_port: cli.etcd_client_port,
        peer_port: cli.etcd_peer_port,
        data_dir: etcd::member_dir(data_dir),
    };
    let own = format!("{}={}", spec.name(), spec.peer_url());
    let member = if cli.new_etcd_cluster || spec.has_data() {
        // A member that ran before rejoins from its own data; etcd ignores the cluster flags.
        etcd::start_member(&spec, &own, spec.has_data() && !cli.new_etcd_cluster).await?
    } else {
        let initial_cluster = join_cluster(node, &spec).await?;
        etcd::start_member(&spec, &initial_cluster, true).await?
    };
    // Its own member only: etcd-client balances requests over every endpoint it is given,
    // dead ones included. While the member restarts, clients ask another lookup service.
    let store = EtcdStore::connect(&[spec.client_url()]).await?;
    Ok((Store::Etcd(Box::new(store)), Some(member)))
}

/// How long joining an etcd cluster may keep being refused. etcd refuses a new member while
/// the last one added has not been healthy for a few seconds ("unhealthy cluster"), so
/// services started together join one after the other.
const JOIN_DEADLINE: Duration = Duration::from_secs(60);

/// Asks the lookup services on the overlay, nearest first, to add `spec` to their etcd
/// cluster, retrying with backoff while they refuse; returns the initial cluster to start
/// with.
async fn join_cluster(node: &Node, spec: &MemberSpec) -> anyhow::Result<String> {
    let request = MemberAddRequest {
        name: spec.name(),
        peer_url: spec.peer_url(),
    };
    let give_up = tokio::time::Instant::now() + JOIN_DEADLINE;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
    loop {
        let mut failures = Vec::new();
        for peer in client::lookup_services(node).await? {
            match node.request::<MemberAddProtocol>(peer, &request).await {
                Ok(Ok(initial_cluster)) => {
                    tracing::info!(%peer, %initial_cluster, "joined the etcd cluster");
                    return Ok(initial_cluster);
                }
                Ok(Err(reason)) => failures.push(format!("{peer}: {reason}")),
                Err(error) => failures.push(format!("{peer}: {error}")),
            }
        }
        let failures = failures.join("; ");
        if tokio::time::Instant::now() >= give_up {
            anyhow::bail!(
                "no lookup service added this one to its etcd cluster within {JOIN_DEADLINE:?}: {failures}"
            );
        }
        tracing::info!(%failures, "etcd cluster not ready for a new member yet, retrying");
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
