//! Who is on the other end of a QUIC connection, and whether it is in our network.
//!
//! TLS here only encrypts: certificates are throw-away and self-signed. Right after the
//! handshake each side sends one [`Proof`] on the connection's first stream: its overlay
//! public key, a signature by that key over the connection's TLS exported keying material,
//! and (in a private network) an HMAC of the same material under the pre-shared key. The
//! keying material is unique to this TLS session, so a proof cannot be replayed on another
//! connection or relayed by someone in the middle; the signature ties the connection to the
//! overlay identity (the peer ID), the HMAC to knowledge of the network key. Each side signs
//! its role too, so a proof cannot be reflected back. The server sends its proof only after
//! the client's checked out, so an outsider learns nothing.

use hmac::{Hmac, Mac};
use libp2p::{
    PeerId,
    identity::{Keypair, PublicKey},
};
use sha2::Sha256;

/// Length of the exported keying material both sides sign.
pub const KEYING_MATERIAL_BYTES: usize = 32;
/// Label of the exported keying material (RFC 5705 / 8446 exporter).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-mtc-proxy-auth";
/// Largest encoded proof accepted.
pub const MAX_PROOF_BYTES: usize = 4096;
const TRANSCRIPT_PREFIX: &[u8] = b"mtc-proxy-auth/1";

/// Which end of the connection a proof comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that dialled the connection.
    Client,
    /// The side that accepted it.
    Server,
}

impl Role {
    fn tag(self) -> u8 {
        match self {
            Self::Client => b'c',
            Self::Server => b's',
        }
    }
}

/// Why a peer's [`Proof`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The proof could not be decoded; says which part was wrong (`"length"`, `"truncated"`,
    /// `"trailing bytes"`, `"public key"`).
    #[error("malformed proof: {0}")]
    Malformed(&'static str),
    /// The signature is not the public key's over this connection's keying material and the
    /// prover's role.
    #[error("the identity signature does not verify")]
    BadSignature,
    /// Peer IDs as text: an error carrying two `PeerId`s would make every `Result` here large.
    #[error("the peer is {actual}, not {expected}")]
    WrongPeer {
        /// The peer ID that was dialled.
        expected: String,
        /// The peer ID the proof's key belongs to.
        actual: String,
    },
    /// The network MAC does not verify under our pre-shared key, or the peer sent one while
    /// this proxy is in no private network.
    #[error("the peer does not prove knowledge of the network key")]
    WrongNetworkKey,
}

/// What one side sends to prove who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    public_key: Vec<u8>,
    signature: Vec<u8>,
    network_mac: Vec<u8>,
}

fn transcript(role: Role, keying_material: &[u8; KEYING_MATERIAL_BYTES]) -> Vec<u8> {
    let mut transcript = Vec::with_capacity(TRANSCRIPT_PREFIX.len() + 1 + KEYING_MATERIAL_BYTES);
    transcript.extend_from_slice(TRANSCRIPT_PREFIX);
    transcript.push(role.tag());
    transcript.extend_from_slice(keying_material);
    transcript
}

fn network_mac(key: &[u8; 32], transcript: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(transcript);
    mac
}

impl Proof {
    /// The proof `role` sends on a connection with `keying_material`.
    pub fn new(
        keypair: &Keypair,
        network_key: Option<&[u8; 32]>,
        role: Role,
        keying_material: &[u8; KEYING_MATERIAL_BYTES],
    ) -> Self {
        let transcript = transcript(role, keying_material);
        Self {
            public_key: keypair.public().encode_protobuf(),
            signature: keypair.sign(&transcript).expect("our key types can sign"),
            network_mac: network_key
                .map(|key| {
                    network_mac(key, &transcript)
                        .finalize()
                        .into_bytes()
                        .to_vec()
                })
                .unwrap_or_default(),
        }
    }

    /// Checks a proof from `role`; returns the prover's peer ID. `expected`, when known (the
    /// client knows whom it dialed), must match.
    pub fn verify(
        &self,
        expected: Option<PeerId>,
        network_key: Option<&[u8; 32]>,
        role: Role,
        keying_material: &[u8; KEYING_MATERIAL_BYTES],
    ) -> Result<PeerId, AuthError> {
        let public = PublicKey::try_decode_protobuf(&self.public_key)
            .map_err(|_| AuthError::Malformed("public key"))?;
        let transcript = transcript(role, keying_material);
        if !public.verify(&transcript, &self.signature) {
            return Err(AuthError::BadSignature);
        }
        let actual = public.to_peer_id();
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(AuthError::WrongPeer {
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        match network_key {
            // Constant-time comparison: the MAC must not leak through timing.
            Some(key) => network_mac(key, &transcript)
                .verify_slice(&self.network_mac)
                .map_err(|_| AuthError::WrongNetworkKey)?,
            None if !self.network_mac.is_empty() => return Err(AuthError::WrongNetworkKey),
            None => {}
        }
        Ok(actual)
    }

    /// `len:u16 | public key | len:u16 | signature | len:u8 | network MAC`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            5 + self.public_key.len() + self.signature.len() + self.network_mac.len(),
        );
        for (field, wide) in [
            (&self.public_key, true),
            (&self.signature, true),
            (&self.network_mac, false),
        ] {
            if wide {
                out.extend_from_slice(&(field.len() as u16).to_be_bytes());
            } else {
                out.push(field.len() as u8);
            }
            out.extend_from_slice(field);
        }
        out
    }

    /// Reads a proof in the layout of [`Proof::encode`]; the whole of `bytes` must be one.
    pub fn decode(mut bytes: &[u8]) -> Result<Self, AuthError> {
        let mut field = |wide: bool| -> Result<Vec<u8>, AuthError> {
            let (len, rest) = if wide {
                let [a, b, rest @ ..] = bytes else {
                    return Err(AuthError::Malformed("length"));
                };
                (usize::from(u16::from_be_bytes([*a, *b])), rest)
            } else {
                let [a, rest @ ..] = bytes else {
                    return Err(AuthError::Malformed("length"));
                };
                (usize::from(*a), rest)
            };
            if rest.len() < len {
                return Err(AuthError::Malformed("truncated"));
            }
            let (value, rest) = rest.split_at(len);
            bytes = rest;
            Ok(value.to_vec())
        };
        let proof = Self {
            public_key: field(true)?,
            signature: field(true)?,
            network_mac: field(false)?,
        };
        if !bytes.is_empty() {
            return Err(AuthError::Malformed("trailing bytes"));
        }
        Ok(proof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EKM: [u8; 32] = [7; 32];
    const KEY: [u8; 32] = [1; 32];

    #[test]
    fn a_proof_names_its_peer_and_survives_encoding() {
        let keypair = Keypair::generate_ed25519();
        let proof =
            Proof::decode(&Proof::new(&keypair, Some(&KEY), Role::Client, &EKM).encode()).unwrap();
        let peer = keypair.public().to_peer_id();
        assert_eq!(
            proof.verify(Some(peer), Some(&KEY), Role::Client, &EKM),
            Ok(peer)
        );
        assert_eq!(proof.verify(None, Some(&KEY), Role::Client, &EKM), Ok(peer));
    }

    #[test]
    fn every_mismatch_is_refused() {
        let keypair = Keypair::generate_ed25519();
        let proof = Proof::new(&keypair, Some(&KEY), Role::Client, &EKM);
        let other = Keypair::generate_ed25519().public().to_peer_id();
        assert!(matches!(
            proof.verify(Some(other), Some(&KEY), Role::Client, &EKM),
            Err(AuthError::WrongPeer { .. })
        ));
        assert_eq!(
            proof.verify(None, Some(&KEY), Role::Server, &EKM),
            Err(AuthError::BadSignature),
            "reflected"
        );
        assert_eq!(
            proof.verify(None, Some(&KEY), Role::Client, &[8; 32]),
            Err(AuthError::BadSignature),
            "replayed"
        );
        assert_eq!(
            proof.verify(None, Some(&[2; 32]), Role::Client, &EKM),
            Err(AuthError::WrongNetworkKey)
        );
        assert_eq!(
            proof.verify(None, None, Role::Client, &EKM),
            Err(AuthError::WrongNetworkKey)
        );
        let open = Proof::new(&keypair, None, Role::Client, &EKM);
        assert_eq!(
            open.verify(None, Some(&KEY), Role::Client, &EKM),
            Err(AuthError::WrongNetworkKey)
        );
        assert!(open.verify(None, None, Role::Client, &EKM).is_ok());
    }

    #[test]
    fn malformed_proofs_are_errors() {
        let encoded =
            Proof::new(&Keypair::generate_ed25519(), Some(&KEY), Role::Client, &EKM).encode();
        for cut in 0..encoded.len() {
            assert!(Proof::decode(&encoded[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = encoded.clone();
        long.push(0);
        assert!(Proof::decode(&long).is_err());
        let mut tampered = Proof::decode(&encoded).unwrap();
        tampered.public_key[5] ^= 1;
        assert!(
            tampered
                .verify(None, Some(&KEY), Role::Client, &EKM)
                .is_err()
        );
    }
}
