//! The pre-shared key of a private network.
//!
//! As in the original system the 32-byte key is the SHA3-256 digest of a passphrase, so every
//! program given the same passphrase (flag `--psk` or env `P2P_PSK`) derives the same key. The
//! passphrase itself is kept too: an allocator hands it on to the instances it starts.

use libp2p::pnet::PreSharedKey;
use sha3::{Digest, Sha3_256};

/// A private network's passphrase and the key derived from it.
#[derive(Clone)]
pub struct NetworkKey {
    passphrase: String,
    digest: [u8; 32],
    key: PreSharedKey,
}

impl NetworkKey {
    /// Derives the key of the network named by `passphrase`.
    pub fn from_passphrase(passphrase: &str) -> Self {
        let digest: [u8; 32] = Sha3_256::digest(passphrase.as_bytes()).into();
        Self {
            passphrase: passphrase.to_owned(),
            digest,
            key: PreSharedKey::new(digest),
        }
    }

    /// A key no one else has: a random passphrase (64 hex digits from /dev/urandom), kept so
    /// that an allocator can hand it on to its instances.
    pub fn random() -> std::io::Result<Self> {
        use std::io::Read;
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let passphrase: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self::from_passphrase(&passphrase))
    }

    /// The passphrase this key was derived from.
    pub fn passphrase(&self) -> &str {
        &self.passphrase
    }

    /// The 32-byte key itself (the proxies' data plane proves knowledge of it).
    pub fn key_bytes(&self) -> &[u8; 32] {
        &self.digest
    }

    /// The key used by the transport's pnet handshake.
    pub fn pre_shared_key(&self) -> PreSharedKey {
        self.key
    }

    /// A short public fingerprint of the key, safe to log.
    pub fn fingerprint(&self) -> String {
        self.key.fingerprint().to_string()
    }
}

impl std::fmt::Debug for NetworkKey {
    // Never print the passphrase.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkKey")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_passphrase_same_key_and_different_otherwise() {
        let a = NetworkKey::from_passphrase("edge and cloud");
        let b = NetworkKey::from_passphrase("edge and cloud");
        let c = NetworkKey::from_passphrase("edge and cloud ");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.passphrase(), "edge and cloud");
    }

    #[test]
    fn key_is_sha3_256_of_the_passphrase() {
        // SHA3-256("abc") from FIPS 202's examples.
        let expected = "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532";
        let key = NetworkKey::from_passphrase("abc");
        let hex: String = key.key_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
        // And it is what the transport's handshake uses.
        let transport = PreSharedKey::new(*key.key_bytes())
            .fingerprint()
            .to_string();
        assert_eq!(key.fingerprint(), transport);
        assert!(!format!("{:?}", NetworkKey::from_passphrase("abc")).contains("abc\""));
    }
}
