//! The libp2p behaviours every node runs, and their protocol names.

use std::time::Duration;

use libp2p::{
    StreamProtocol, identify,
    identity::PublicKey,
    kad,
    kad::store::{MemoryStore, MemoryStoreConfig},
    ping,
    swarm::NetworkBehaviour,
};

use super::{NodeConfig, keep};

/// Kademlia protocol of this overlay. Not IPFS's `/ipfs/kad/1.0.0`, so that our DHT never
/// merges with a public one a node might also reach.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/mtc/kad/1.0.0");
/// Sent in identify so peers can tell overlay members from other libp2p software.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/mtc/1.0.0";
/// How long one DHT query (a provider lookup, an announcement) may run.
const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Providers a node stores per key: every instance of a service. Kademlia's store keeps 20
/// (its bucket size) and silently ignores the rest, which suits content that any copy
/// serves, not a service whose ingresses must see every instance: in the 500-node churn run
/// 9 of 100 instances were never listed. The store's keys stay bounded by its default (1024).
/// A node still answers kad's lookups with 20 of them: [`super::providers`] gets the rest.
pub const MAX_PROVIDERS_PER_KEY: usize = 512;
/// Largest DHT message: a lookup's answer lists every provider a node holds of the key, each
/// with its addresses (about 60 bytes for one address, 256 allowed for), and kad's default of
/// 16 KiB would fail an answer of a couple of hundred providers.
const KAD_MAX_PACKET: usize = MAX_PROVIDERS_PER_KEY * 256 + 4096;

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub kad: kad::Behaviour<MemoryStore>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub streams: libp2p_stream::Behaviour,
    pub keep: keep::Behaviour,
}

impl Behaviour {
    pub fn new(public: PublicKey, config: &NodeConfig) -> Self {
        let peer_id = public.to_peer_id();
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_query_timeout(KAD_QUERY_TIMEOUT)
            .set_provider_record_ttl(Some(config.timing.provider_ttl))
            // Republish at half the lifetime so a record is renewed well before it expires.
            .set_provider_publication_interval(Some(config.timing.provider_ttl / 2))
            .set_periodic_bootstrap_interval(Some(config.timing.routing_refresh))
            // The driver decides who enters the routing table (`has_room` there).
            .set_kbucket_inserts(kad::BucketInserts::Manual)
            // The driver stores what peers send, less announcements a withdrawal overtook
            // ([`super::tombstones`]).
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            .set_max_packet_size(KAD_MAX_PACKET);
        let store = MemoryStore::with_config(
            peer_id,
            MemoryStoreConfig {
                max_providers_per_key: MAX_PROVIDERS_PER_KEY,
                ..MemoryStoreConfig::default()
            },
        );
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_config);
        // Nodes answer DHT queries unless told they are short-lived clients. Left to decide by
        // itself, kad waits for a confirmed external address and stays a client on private
        // networks: discovery then silently fails, as it did for the original system (its
        // issue common#15).
        kad.set_mode(Some(if config.dht_server {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        }));

        let agent = format!(
            "multi-tier-cloud/{} {}",
            env!("CARGO_PKG_VERSION"),
            config.role
        );
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), public)
                .with_agent_version(agent),
        );
        let ping = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(config.timing.ping_interval)
                .with_timeout(config.timing.ping_timeout),
        );
        Self {
            kad,
            identify,
            ping,
            streams: libp2p_stream::Behaviour::new(),
            keep: keep::Behaviour::new(
                config.connections.keep_all,
                config.bootstraps.iter().map(|b| b.peer),
            ),
        }
    }
}
