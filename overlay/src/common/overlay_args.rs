//! The overlay flags every program takes, and how they become a [`NodeConfig`].

use std::path::PathBuf;

use crate::overlay::{
    BootstrapAddr, NetworkKey, NodeConfig,
    identity::{IdentityError, IdentitySource, KeyAlgorithm, expand_home},
};

/// Environment variable with whitespace-separated bootstrap addresses, used when neither the
/// command line nor the config file names any (the allocator sets it for its instances).
pub const BOOTSTRAPS_ENV: &str = "P2P_BOOTSTRAPS";
/// Environment variable of `--psk`.
pub const PSK_ENV: &str = "P2P_PSK";
/// Environment variable of `--ephemeral`.
pub const EPHEMERAL_ENV: &str = "P2P_EPHEMERAL";

/// The overlay flags: bootstrap nodes, private network key and this node's identity.
// The doc comments are --help texts, where `<peer id>` is a placeholder, not HTML.
#[allow(rustdoc::invalid_html_tags)]
#[derive(clap::Args, Debug, Clone)]
pub struct OverlayArgs {
    /// Multiaddr of a bootstrap node, ending in /p2p/<peer id>; repeat for several. Without
    /// any, the whitespace-separated list in env P2P_BOOTSTRAPS is used.
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    pub bootstraps: Vec<String>,

    /// Passphrase of a private network: only nodes given the same one can connect. As in the
    /// original, an empty one (`-psk ""`) makes a random key: a network of this node alone
    /// (and the instances an allocator so started); so does `psk = ""` in a --config file.
    /// Without the flag, env P2P_PSK (empty or unset: an open network).
    #[arg(long, value_name = "PASSPHRASE")]
    pub psk: Option<String>,

    /// File holding this node's private key, created on first start; keeps the peer ID stable
    /// across restarts.
    #[arg(long, value_name = "FILE")]
    pub keyfile: Option<PathBuf>,

    /// Use a new identity for this run only: no key file is read or written (what service
    /// instances started by an allocator do).
    #[arg(long, env = EPHEMERAL_ENV)]
    pub ephemeral: bool,

    /// Key algorithm of a newly created identity.
    #[arg(long, value_enum, default_value_t, value_name = "ALGORITHM")]
    pub algo: KeyAlgorithm,
}

impl OverlayArgs {
    /// The bootstrap addresses from the flags (or config file), else from P2P_BOOTSTRAPS.
    /// An invalid one is an error naming it and where it came from.
    pub fn bootstrap_addrs(&self) -> Result<Vec<BootstrapAddr>, String> {
        if !self.bootstraps.is_empty() {
            return self
                .bootstraps
                .iter()
                .map(|text| text.parse().map_err(|e| format!("--bootstrap: {e}")))
                .collect();
        }
        let from_env = std::env::var(BOOTSTRAPS_ENV).unwrap_or_default();
        from_env
            .split_whitespace()
            .map(|text| text.parse().map_err(|e| format!("{BOOTSTRAPS_ENV}: {e}")))
            .collect()
    }

    /// Uses `bootstraps` (from the original's conf.json) unless the flags name some.
    pub fn or_bootstraps(&mut self, bootstraps: Vec<String>) {
        if self.bootstraps.is_empty() {
            self.bootstraps = bootstraps;
        }
    }

    /// The private network's key: `--psk`'s (empty: a random one, see the flag), else env
    /// P2P_PSK's, else none. Call once per node: each call makes a new random key.
    pub fn network_key(&self) -> Result<Option<NetworkKey>, ArgsError> {
        match self.psk.as_deref() {
            Some("") => {
                let key = NetworkKey::random().map_err(ArgsError::Random)?;
                tracing::warn!(
                    fingerprint = %key.fingerprint(),
                    "--psk \"\": a random network key, as the original made: no other node can join"
                );
                Ok(Some(key))
            }
            Some(passphrase) => Ok(Some(NetworkKey::from_passphrase(passphrase))),
            None => Ok(std::env::var(PSK_ENV)
                .ok()
                .filter(|p| !p.is_empty())
                .map(|p| NetworkKey::from_passphrase(&p))),
        }
    }

    /// Where the identity comes from; `default_keyfile` (e.g. `~/.privKeyPing`) unless
    /// `--keyfile` names another.
    pub fn identity(&self, default_keyfile: &str) -> IdentitySource {
        if self.ephemeral {
            return IdentitySource::Ephemeral(self.algo);
        }
        let path = self
            .keyfile
            .clone()
            .unwrap_or_else(|| PathBuf::from(default_keyfile));
        IdentitySource::File(expand_home(&path), self.algo)
    }

    /// A node configuration for `role` from these flags, with default timing.
    pub fn node_config(&self, role: &str, default_keyfile: &str) -> Result<NodeConfig, ArgsError> {
        let keypair = self.identity(default_keyfile).load()?;
        let mut config = NodeConfig::new(role, keypair);
        config.bootstraps = self.bootstrap_addrs().map_err(ArgsError::Bootstrap)?;
        config.network_key = self.network_key()?;
        Ok(config)
    }
}

/// Why the overlay flags could not be turned into a node configuration.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// The identity could not be loaded: the key file is unreadable or malformed, or a new one
    /// could not be written.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A bootstrap address is not a multiaddr ending in `/p2p/<peer id>`; the text names it
    /// and where it came from.
    #[error("{0}")]
    Bootstrap(String),
    /// Reading `/dev/urandom` failed while making the random key `--psk ""` asks for.
    #[error("cannot make a random network key for --psk \"\": {0}")]
    Random(std::io::Error),
}
