//! The libp2p overlay every program of the system joins.
//!
//! A node speaks TCP + noise + yamux (with a pnet handshake first in a private network), runs a
//! Kademlia DHT in server mode for discovery, identify to learn peers' addresses and ping to
//! measure RTTs. Programs find each other by *namespace*: a node [advertises](Node::advertise)
//! one, others [find its providers](Node::find_providers), then talk over typed
//! [control protocols](crate::rpc). A node that stops advertising, or shuts down
//! ([`Node::shutdown`]; dropping the last handle does not), [withdraws](withdraw) its records
//! at the peers that hold them.
//!
//! Pure parts (backoff, bootstrap state machine, namespaces, key files, the PSK) are apart from
//! the `driver` task that owns the swarm, and are unit-tested without sockets.

mod backoff;
mod behaviour;
mod bootstrap;
mod connections;
mod driver;
mod found;
pub mod identity;
mod keep;
mod namespace;
mod node;
pub mod providers;
pub mod psk;
mod tombstones;
mod transport;
pub mod withdraw;

pub use backoff::Backoff;
pub use behaviour::KAD_PROTOCOL;
pub use bootstrap::{BootstrapAddr, BootstrapPolicy, JoinError};
pub use connections::Connections;
pub use namespace::record_key;
pub use node::{Node, NodeConfig, StartError, Timing, WeakNode};
pub use psk::NetworkKey;
