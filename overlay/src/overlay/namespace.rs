//! Namespaces: the strings nodes advertise themselves under ("lookup", "allocator", a service's
//! content digest) and the DHT keys their provider records live at.

use libp2p::kad::RecordKey;
use sha2::{Digest, Sha256};

/// The DHT key of a namespace: the SHA-256 of its UTF-8 bytes, as go-libp2p-discovery derived
/// rendezvous keys, so keys are fixed-size whatever the namespace.
pub fn record_key(namespace: &str) -> RecordKey {
    RecordKey::new(&Sha256::digest(namespace.as_bytes()).as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_distinct() {
        assert_eq!(record_key("lookup"), record_key("lookup"));
        assert_ne!(record_key("lookup"), record_key("allocator"));
        assert_eq!(record_key("").as_ref().len(), 32);
    }
}
