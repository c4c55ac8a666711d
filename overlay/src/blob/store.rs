//! Blobs on disk, named by their SHA-256 digest.
//!
//! A blob becomes visible only once all its bytes arrived and matched the digest: it is
//! streamed into a temporary file while being hashed, synced, then renamed into place. Reading
//! checks the digest again first, so a blob corrupted on disk is never handed out; it is moved
//! to `corrupt/` so a good copy can be fetched in its place. Bytes are streamed in fixed-size
//! chunks: memory use does not depend on a blob's size.

use std::{
    io::{ErrorKind, Read},
    path::{Path, PathBuf},
};

use futures::{AsyncRead, AsyncReadExt};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::Digest;

/// Size of the chunks blobs are copied and hashed in.
pub const CHUNK: usize = 256 * 1024;

/// Why storing or reading a blob failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// An I/O operation failed: creating, writing, syncing, renaming or reading a file of the
    /// store. A read error of the source in [`BlobStore::write_from`] is reported here too,
    /// with the temporary file's path.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory the operation concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The store holds no blob of that digest (it never did, or it was found corrupt).
    #[error("blob {digest} is not stored here")]
    Missing {
        /// The blob asked for.
        digest: Digest,
    },
    /// The source ended before the announced size arrived; nothing was stored.
    #[error("blob {expected} arrived with {got} bytes, {size} were announced")]
    Truncated {
        /// The blob being transferred.
        expected: Digest,
        /// The announced size, in bytes.
        size: u64,
        /// The bytes that arrived before the source ended.
        got: u64,
    },
    /// The bytes received hash to another digest than the one announced; nothing was stored.
    #[error("content does not match its digest: expected {expected}, got {got}")]
    DigestMismatch {
        /// The digest announced for the content.
        expected: Digest,
        /// The digest of the bytes that actually arrived.
        got: Digest,
    },
    /// A stored blob no longer matches its digest when read (damaged on disk); it was moved
    /// out of the store so that a good copy can be fetched.
    #[error("stored blob {digest} is corrupt (its content no longer matches); moved to {}", moved_to.display())]
    Corrupt {
        /// The blob that failed verification.
        digest: Digest,
        /// Where it now lies, under `corrupt/`.
        moved_to: PathBuf,
    },
    /// No byte arrived from the source within the idle timeout; the text says how long that
    /// was.
    #[error("transfer stalled: {0}")]
    Stalled(String),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A directory of blobs: `sha256/<hex>`, with `tmp/` for transfers in progress and `corrupt/`
/// for blobs that failed verification.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) the store under `root`; transfers a crash interrupted are
    /// discarded.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        for sub in ["sha256", "tmp", "corrupt"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        let tmp = root.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(io_error(&tmp))?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    /// The size of a stored blob, without verifying it.
    pub fn size_of(&self, digest: &Digest) -> Option<u64> {
        std::fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// Every stored blob.
    pub fn list(&self) -> Vec<Digest> {
        let dir = self.root.join("sha256");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Streams `size` bytes from `source` into the store as blob `digest`. The blob appears
    /// only if the bytes match; `progress` is told the byte count after every chunk. Storing a
    /// blob that is already there replaces it (the new copy was verified).
    pub async fn write_from<R: AsyncRead + Unpin>(
        &self,
        digest: Digest,
        size: u64,
        source: &mut R,
        idle_timeout: std::time::Duration,
        mut progress: impl FnMut(u64),
    ) -> Result<(), BlobError> {
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{}.{}", digest.hex(), std::process::id()));
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io_error(&tmp))?;
        let result = async {
            let mut hasher = Sha256::new();
            let mut buffer = vec![0; CHUNK];
            let mut received = 0u64;
            while received < size {
                let want = CHUNK.min((size - received) as usize);
                let read = tokio::time::timeout(idle_timeout, source.read(&mut buffer[..want]))
                    .await
                    .map_err(|_| BlobError::Stalled(format!("no data for {idle_timeout:?}")))?
                    .map_err(io_error(&tmp))?;
                if read == 0 {
                    return Err(BlobError::Truncated {
                        expected: digest,
                        size,
                        got: received,
                    });
                }
                hasher.update(&buffer[..read]);
                file.write_all(&buffer[..read])
                    .await
                    .map_err(io_error(&tmp))?;
                received += read as u64;
                progress(received);
            }
            let got = Digest::from_hasher(hasher);
            if got != digest {
                return Err(BlobError::DigestMismatch {
                    expected: digest,
                    got,
                });
            }
            file.sync_all().await.map_err(io_error(&tmp))?;
            let path = self.path(&digest);
            tokio::fs::rename(&tmp, &path)
                .await
                .map_err(io_error(&path))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Opens blob `digest` for reading after checking that its content still matches. A blob
    /// that does not is moved to `corrupt/` and reported as [`BlobError::Corrupt`].
    pub async fn open_verified(&self, digest: Digest) -> Result<(tokio::fs::File, u64), BlobError> {
        let path = self.path(&digest);
        let check = path.clone();
        let got = tokio::task::spawn_blocking(move || hash_file(&check))
            .await
            .expect("hashing does not panic");
        let got = match got {
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(BlobError::Missing { digest }),
            other => other.map_err(io_error(&path))?,
        };
        if got != digest {
            let moved_to = self.root.join("corrupt").join(digest.hex());
            tokio::fs::rename(&path, &moved_to)
                .await
                .map_err(io_error(&path))?;
            tracing::warn!(%digest, actual = %got, moved_to = %moved_to.display(), "corrupt blob quarantined");
            return Err(BlobError::Corrupt { digest, moved_to });
        }
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(io_error(&path))?;
        let size = file.metadata().await.map_err(io_error(&path))?.len();
        Ok((file, size))
    }
}

/// SHA-256 of a file, read in chunks.
pub fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; CHUNK];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(Digest::from_hasher(hasher));
        }
        hasher.update(&buffer[..read]);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const IDLE: Duration = Duration::from_secs(5);

    fn content() -> Vec<u8> {
        (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect()
    }

    async fn put(store: &BlobStore, digest: Digest, bytes: &[u8]) -> Result<(), BlobError> {
        let mut source = futures::io::Cursor::new(bytes.to_vec());
        store
            .write_from(digest, bytes.len() as u64, &mut source, IDLE, |_| {})
            .await
    }

    #[tokio::test]
    async fn stores_verified_blobs_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes = content();
        let digest = Digest::of(&bytes);
        put(&store, digest, &bytes).await.unwrap();
        assert_eq!(store.size_of(&digest), Some(bytes.len() as u64));
        assert_eq!(store.list(), [digest]);
        let (mut file, size) = store.open_verified(digest).await.unwrap();
        let mut back = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut file, &mut back)
            .await
            .unwrap();
        assert_eq!((size, back), (bytes.len() as u64, bytes));
        // Reopening the store keeps it.
        assert_eq!(BlobStore::open(dir.path()).unwrap().list(), [digest]);
    }

    #[tokio::test]
    async fn wrong_or_short_content_is_never_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes = content();
        let wrong = Digest::of(b"something else");
        assert!(matches!(
            put(&store, wrong, &bytes).await,
            Err(BlobError::DigestMismatch { .. })
        ));
        let digest = Digest::of(&bytes);
        let mut short = futures::io::Cursor::new(bytes[..100].to_vec());
        let result = store
            .write_from(digest, bytes.len() as u64, &mut short, IDLE, |_| {})
            .await;
        assert!(
            matches!(result, Err(BlobError::Truncated { got: 100, .. })),
            "{result:?}"
        );
        assert!(store.list().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test]
    async fn corruption_on_disk_is_detected_and_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes = content();
        let digest = Digest::of(&bytes);
        put(&store, digest, &bytes).await.unwrap();
        let path = dir.path().join("sha256").join(digest.hex());
        let mut flipped = std::fs::read(&path).unwrap();
        flipped[CHUNK + 3] ^= 0xff;
        std::fs::write(&path, flipped).unwrap();
        let error = store.open_verified(digest).await.unwrap_err();
        assert!(matches!(error, BlobError::Corrupt { .. }), "{error}");
        assert!(
            store.list().is_empty(),
            "a corrupt blob is no longer listed"
        );
        assert!(matches!(
            store.open_verified(digest).await,
            Err(BlobError::Missing { .. })
        ));
        // A good copy can take its place.
        put(&store, digest, &bytes).await.unwrap();
        assert!(store.open_verified(digest).await.is_ok());
    }
}
