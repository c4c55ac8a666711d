//! A node's identity: the key pair its peer ID is derived from, kept in a key file so that a
//! restarted program keeps its peer ID (bootstrap addresses stay valid).
//!
//! File format: one line, the base64 of the libp2p protobuf encoding of the private key (the
//! encoding go-libp2p's `MarshalPrivateKey` and IPFS's `PrivKey` use). The file is created with
//! mode 0600 and never overwritten: a file that cannot be read or decoded is an error that names
//! it, and it is left exactly as it was.
//!
//! The original system's key files (`~/.privKeyPing`, `~/.privKeyProxy`, ...) are read too, so
//! a migrated node keeps its peer ID: one line `<key type> <base64 of the raw private key>`,
//! with go-libp2p's key types and raw forms: 0 RSA (PKCS#1 DER, the original's default), 1
//! Ed25519 (seed and public key, 64 bytes), 2 secp256k1 (the 32-byte scalar), 3 ECDSA (SEC1
//! DER). New key files are written in the first form.

use std::{
    fs::OpenOptions,
    io::Write,
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use libp2p::identity::Keypair;

/// Which kind of key to generate when there is no key file yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAlgorithm {
    /// Ed25519: small, fast, the libp2p default.
    #[default]
    Ed25519,
    /// secp256k1, as used by Ethereum and Bitcoin.
    Secp256k1,
    /// ECDSA over P-256.
    Ecdsa,
}

impl KeyAlgorithm {
    fn generate(self) -> Keypair {
        match self {
            Self::Ed25519 => Keypair::generate_ed25519(),
            Self::Secp256k1 => Keypair::generate_secp256k1(),
            Self::Ecdsa => Keypair::generate_ecdsa(),
        }
    }
}

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file exists but could not be read (permissions, I/O error).
    #[error("cannot read key file {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The key file holds no key in either accepted format; it was left as it was.
    #[error(
        "key file {} is not a valid key ({reason}); it was left untouched: \
         fix or remove it, or pass another --keyfile",
        path.display()
    )]
    Corrupt {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its content.
        reason: String,
    },
    /// There was no key file and a new one could not be written: its directory could not be
    /// created, the file could not be created (including because one appeared meanwhile), or
    /// writing or syncing it failed.
    #[error("cannot create key file {}: {source}", path.display())]
    Create {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Where a node's key pair comes from.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// A fresh key for this run only: the peer ID changes on every start.
    Ephemeral(KeyAlgorithm),
    /// The key stored at the path; generated with the algorithm if the file does not exist.
    File(PathBuf, KeyAlgorithm),
}

impl IdentitySource {
    /// Loads (or, for a missing file, generates and stores) the key pair.
    pub fn load(&self) -> Result<Keypair, IdentityError> {
        match self {
            Self::Ephemeral(algorithm) => Ok(algorithm.generate()),
            Self::File(path, algorithm) => load_or_create(path, *algorithm),
        }
    }
}

/// Loads the key pair stored at `path`, or generates one with `algorithm` and stores it there
/// if no file exists.
pub fn load_or_create(path: &Path, algorithm: KeyAlgorithm) -> Result<Keypair, IdentityError> {
    match std::fs::read(path) {
        Ok(contents) => decode(&contents).map_err(|reason| IdentityError::Corrupt {
            path: path.to_owned(),
            reason,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path, algorithm),
        Err(source) => Err(IdentityError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn decode(contents: &[u8]) -> Result<Keypair, String> {
    let text = std::str::from_utf8(contents).map_err(|_| "not UTF-8 text".to_owned())?;
    if let Some((kind, raw)) = text.trim().split_once(' ') {
        return decode_original(kind, raw).map_err(|e| e.to_string());
    }
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    Keypair::from_protobuf_encoding(&bytes).map_err(|e| format!("not a libp2p private key: {e}"))
}

/// Why an original-format key file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OriginalKeyError {
    /// The key after the type number is not valid base64.
    #[error("original key file: the key is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// The type number is not one of 0 to 3; holds it as written.
    #[error("original key file: unknown key type {0} (0 RSA, 1 Ed25519, 2 secp256k1, 3 ECDSA)")]
    UnknownType(String),
    /// The raw key does not decode as a key of its type.
    #[error("original key file of type {kind}: {reason}")]
    BadKey {
        /// The key type number, `"0"` to `"3"`.
        kind: &'static str,
        /// Why the raw key was rejected (wrong length, not valid DER, not a valid scalar).
        reason: String,
    },
}

/// The original's `<key type> <base64 raw key>` (see the module doc).
fn decode_original(kind: &str, raw: &str) -> Result<Keypair, OriginalKeyError> {
    use libp2p::identity::{ecdsa, secp256k1};
    let mut raw = STANDARD.decode(raw.trim())?;
    let bad = |kind: &'static str| {
        move |reason: &dyn std::fmt::Display| OriginalKeyError::BadKey {
            kind,
            reason: reason.to_string(),
        }
    };
    match kind {
        "0" => Keypair::rsa_from_pkcs8(&mut pkcs1_to_pkcs8(&raw)).map_err(|e| bad("0")(&e)),
        "1" => {
            // go-libp2p's raw Ed25519 key is the 32-byte seed followed by the public key.
            if raw.len() != 64 {
                return Err(bad("1")(&format!("{} bytes, not 64", raw.len())));
            }
            Keypair::ed25519_from_bytes(&mut raw[..32]).map_err(|e| bad("1")(&e))
        }
        "2" => {
            let secret =
                secp256k1::SecretKey::try_from_bytes(&mut raw).map_err(|e| bad("2")(&e))?;
            Ok(secp256k1::Keypair::from(secret).into())
        }
        "3" => {
            let scalar =
                sec1_scalar(&raw).ok_or_else(|| bad("3")(&"not an SEC1 EC private key"))?;
            let secret = ecdsa::SecretKey::try_from_bytes(scalar).map_err(|e| bad("3")(&e))?;
            Ok(ecdsa::Keypair::from(secret).into())
        }
        other => Err(OriginalKeyError::UnknownType(other.to_owned())),
    }
}

/// A DER length.
fn der_length(length: usize) -> Vec<u8> {
    match length {
        0..=127 => vec![length as u8],
        128..=255 => vec![0x81, length as u8],
        _ => vec![0x82, (length >> 8) as u8, length as u8],
    }
}

/// Wraps a PKCS#1 RSA private key (what go-libp2p stores) in PKCS#8 (what libp2p here reads):
/// `SEQUENCE { INTEGER 0, SEQUENCE { rsaEncryption, NULL }, OCTET STRING pkcs1 }`.
fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    const VERSION_AND_ALGORITHM: [u8; 18] = [
        0x02, 0x01, 0x00, // INTEGER 0
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
        0x00, // SEQUENCE { OID 1.2.840.113549.1.1.1, NULL }
    ];
    let mut octets = vec![0x04];
    octets.extend(der_length(pkcs1.len()));
    octets.extend_from_slice(pkcs1);
    let mut body = VERSION_AND_ALGORITHM.to_vec();
    body.extend(octets);
    let mut out = vec![0x30];
    out.extend(der_length(body.len()));
    out.extend(body);
    out
}

/// The private scalar of an SEC1 `ECPrivateKey` (`SEQUENCE { INTEGER 1, OCTET STRING key,
/// ... }`), what go-libp2p stores for ECDSA.
fn sec1_scalar(der: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x30 {
        return None;
    }
    // Skip the sequence's length (short or long form).
    let (&first, mut rest) = rest.split_first()?;
    if first & 0x80 != 0 {
        rest = rest.get(usize::from(first & 0x7f)..)?;
    }
    let rest = rest.strip_prefix(&[0x02, 0x01, 0x01])?;
    let (&tag, rest) = rest.split_first()?;
    let (&length, rest) = rest.split_first()?;
    (tag == 0x04).then(|| rest.get(..usize::from(length)))?
}

fn create(path: &Path, algorithm: KeyAlgorithm) -> Result<Keypair, IdentityError> {
    let keypair = algorithm.generate();
    let encoded = keypair
        .to_protobuf_encoding()
        .expect("keys generated by libp2p always have a protobuf encoding");
    let create_error = |source| IdentityError::Create {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(create_error)?;
    }
    let mut options = OpenOptions::new();
    // `create_new` refuses to replace a file that appeared since we looked: a key is never lost.
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(create_error)?;
    writeln!(file, "{}", STANDARD.encode(encoded)).map_err(create_error)?;
    file.sync_all().map_err(create_error)?;
    Ok(keypair)
}

/// Expands a leading `~/` to the home directory, as shells do for default paths.
pub fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => Path::new(&home).join(rest),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_key_is_loaded_again_with_the_same_peer_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key");
        for algorithm in [
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::Secp256k1,
            KeyAlgorithm::Ecdsa,
        ] {
            let _ = std::fs::remove_file(&path);
            let first = load_or_create(&path, algorithm).unwrap();
            let second = load_or_create(&path, KeyAlgorithm::Ed25519).unwrap();
            assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
            // A private key: readable and writable by its owner only.
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
    }

    #[test]
    fn corrupt_file_is_named_and_left_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, b"not a key at all\n").unwrap();
        let error = load_or_create(&path, KeyAlgorithm::Ed25519).unwrap_err();
        assert!(matches!(error, IdentityError::Corrupt { .. }));
        assert!(error.to_string().contains(&path.display().to_string()));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a key at all\n");
    }

    #[test]
    fn valid_base64_of_garbage_is_corrupt_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, STANDARD.encode(b"garbage")).unwrap();
        assert!(matches!(
            load_or_create(&path, KeyAlgorithm::Ed25519),
            Err(IdentityError::Corrupt { .. })
        ));
    }

    /// A key file as the original wrote it: `<type> <base64 raw>`.
    fn original_key_file(dir: &Path, kind: u8, raw: &[u8]) -> PathBuf {
        let path = dir.join(format!(".privKey-{kind}"));
        std::fs::write(&path, format!("{kind} {}\n", STANDARD.encode(raw))).unwrap();
        path
    }

    #[test]
    fn the_originals_key_files_keep_their_peer_id() {
        use libp2p::identity::{PublicKey, ecdsa, ed25519, secp256k1};
        let dir = tempfile::tempdir().unwrap();
        let peer_of = |path: &Path| {
            load_or_create(path, KeyAlgorithm::Ed25519)
                .unwrap()
                .public()
                .to_peer_id()
        };

        // RSA, the original's default: PKCS#1 DER (openssl's -traditional form); the same key
        // as PKCS#8 gives the peer ID it must have.
        let pkcs1 = include_bytes!("testdata/rsa2048.pkcs1.der");
        let mut pkcs8 = include_bytes!("testdata/rsa2048.pkcs8.der").to_vec();
        let rsa = Keypair::rsa_from_pkcs8(&mut pkcs8).unwrap();
        assert_eq!(
            pkcs1_to_pkcs8(pkcs1),
            include_bytes!("testdata/rsa2048.pkcs8.der")
        );
        let path = original_key_file(dir.path(), 0, pkcs1);
        assert_eq!(peer_of(&path), rsa.public().to_peer_id());

        // Ed25519: seed and public key.
        let ed = ed25519::Keypair::generate();
        let path = original_key_file(dir.path(), 1, &ed.to_bytes());
        assert_eq!(peer_of(&path), Keypair::from(ed).public().to_peer_id());

        // secp256k1: the scalar.
        let k1 = secp256k1::Keypair::generate();
        let path = original_key_file(dir.path(), 2, &k1.secret().to_bytes());
        assert_eq!(peer_of(&path), Keypair::from(k1).public().to_peer_id());

        // ECDSA: SEC1 DER with parameters and public key (openssl's form, as Go's
        // x509.MarshalECPrivateKey); its public key from the SubjectPublicKeyInfo.
        let path = original_key_file(dir.path(), 3, include_bytes!("testdata/p256.sec1.der"));
        let public =
            ecdsa::PublicKey::try_decode_der(include_bytes!("testdata/p256.spki.der")).unwrap();
        assert_eq!(peer_of(&path), PublicKey::from(public).to_peer_id());

        // A type it does not know is named, and the file left alone.
        let path = original_key_file(dir.path(), 7, b"whatever");
        let error = load_or_create(&path, KeyAlgorithm::Ed25519)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown key type 7"), "{error}");
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("7 "));
    }

    #[test]
    fn ephemeral_keys_differ() {
        let source = IdentitySource::Ephemeral(KeyAlgorithm::Ed25519);
        let a = source.load().unwrap().public().to_peer_id();
        let b = source.load().unwrap().public().to_peer_id();
        assert_ne!(a, b);
    }

    #[test]
    fn home_is_expanded_only_at_the_start() {
        let home = std::env::var("HOME").unwrap();
        assert_eq!(
            expand_home(Path::new("~/.privKeyPing")),
            Path::new(&home).join(".privKeyPing")
        );
        assert_eq!(expand_home(Path::new("/a/~/b")), Path::new("/a/~/b"));
    }
}
