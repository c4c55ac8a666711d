//! Blobs on disk, named by their SHA-256 digest.
//!
//! A stored blob is always exactly bytes that were verified against its digest:
//!
//! - Each write streams the blob into a temporary file of its own (`tmp/<hex>.<pid>.<n>`,
//!   created exclusively, `n` counting the writes of this process), hashing the bytes as it
//!   hands them to that file; no other write touches it. The writer holds an exclusive
//!   `flock` on it until it is published or removed; opening the store removes only the
//!   temporary files nobody holds (left by a crash), never those of a live writer in another
//!   process sharing the directory. Two writes of one blob at once (two
//!   peers uploading it, a fetch racing an upload) each write their own file, and each
//!   verified copy is renamed into place atomically, the later one replacing the earlier.
//! - Before the rename the file is flushed (which reports the last write's error, e.g. a full
//!   disk), synced, and its length checked; the directory is synced after it.
//! - A write that fails for any reason, or whose future is dropped midway, removes its
//!   temporary file and nothing else: the blobs stored before are untouched. A full disk is
//!   reported as [`BlobError::NoSpace`].
//! - Reading checks the digest again, on the very file handed out, so a blob corrupted on disk
//!   is never handed out; it is moved to `corrupt/` so a good copy can be fetched in its place.
//!   A copy is moved only if it is still the one that failed: a verified copy renamed into its
//!   place meanwhile stays.
//!
//! Limits: a blob over [`BlobStore::max_blob_bytes`] ([`DEFAULT_MAX_BLOB_BYTES`] unless set)
//! is refused before a byte is read. Bytes are streamed in fixed-size chunks: memory use does
//! not depend on a blob's size.

use std::{
    io::{ErrorKind, Read, Seek},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
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
    /// An I/O operation on a file of the store failed: creating, writing, syncing, renaming
    /// or reading it. (A read error of the source is [`BlobError::Source`], a full disk
    /// [`BlobError::NoSpace`].)
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
    /// Reading the bytes to store from their source (in a transfer, the other node's stream)
    /// failed; nothing was stored.
    #[error("reading blob {digest} from its source failed after {received} bytes: {source}")]
    Source {
        /// The blob being stored.
        digest: Digest,
        /// The bytes that arrived before the error.
        received: u64,
        /// The source's error.
        source: std::io::Error,
    },
    /// The blob is larger than the store accepts ([`BlobStore::max_blob_bytes`]); refused
    /// before any byte was read.
    #[error("blob {digest} is {size} bytes, over this store's limit of {limit} bytes")]
    TooLarge {
        /// The blob refused.
        digest: Digest,
        /// Its announced size, in bytes.
        size: u64,
        /// The largest blob the store accepts, in bytes.
        limit: u64,
    },
    /// The disk of the store is full (or the quota reached); nothing was stored, the blobs
    /// stored before are intact.
    #[error("no space left for blob {digest} ({size} bytes) in {}: the disk is full", store.display())]
    NoSpace {
        /// The blob that did not fit.
        digest: Digest,
        /// Its size, in bytes.
        size: u64,
        /// The root directory of the store.
        store: PathBuf,
    },
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
    max_blob_bytes: u64,
}

/// The largest blob a store accepts unless told otherwise: 8 GiB.
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 8 << 30;

impl BlobStore {
    /// Opens (creating if needed) the store under `root`; transfers a crash interrupted are
    /// discarded (temporary files no writer holds locked), those in progress in another
    /// process left alone.
    pub fn open(root: &Path) -> Result<Self, BlobError> {
        for sub in ["sha256", "tmp", "corrupt"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        let tmp = root.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(io_error(&tmp))?.flatten() {
            let abandoned =
                std::fs::File::open(entry.path()).is_ok_and(|file| file.try_lock().is_ok());
            if abandoned {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            root: root.to_owned(),
            max_blob_bytes: DEFAULT_MAX_BLOB_BYTES,
        })
    }

    /// The store, accepting blobs of at most `limit` bytes from now on.
    pub fn with_max_blob_bytes(mut self, limit: u64) -> Self {
        self.max_blob_bytes = limit;
        self
    }

    /// The largest blob this store accepts, in bytes ([`DEFAULT_MAX_BLOB_BYTES`] unless set
    /// with [`BlobStore::with_max_blob_bytes`]).
    pub fn max_blob_bytes(&self) -> u64 {
        self.max_blob_bytes
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
    /// blob that is already there replaces it (the new copy was verified). A blob over
    /// [`BlobStore::max_blob_bytes`] is refused before `source` is read.
    pub async fn write_from<R: AsyncRead + Unpin>(
        &self,
        digest: Digest,
        size: u64,
        source: &mut R,
        idle_timeout: std::time::Duration,
        mut progress: impl FnMut(u64),
    ) -> Result<(), BlobError> {
        if size > self.max_blob_bytes {
            return Err(BlobError::TooLarge {
                digest,
                size,
                limit: self.max_blob_bytes,
            });
        }
        let (temp, mut file) = self.create_temp(digest, size).await?;
        let failed = |source| self.storing_failed(digest, size, &temp.path, source);
        let mut hasher = Sha256::new();
        let mut buffer = vec![0; CHUNK];
        let mut received = 0u64;
        while received < size {
            let want = CHUNK.min((size - received) as usize);
            let read =
                read_some(source, &mut buffer[..want], idle_timeout, digest, received).await?;
            if read == 0 {
                return Err(BlobError::Truncated {
                    expected: digest,
                    size,
                    got: received,
                });
            }
            hasher.update(&buffer[..read]);
            file.write_all(&buffer[..read]).await.map_err(failed)?;
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
        complete(&mut file, size).await.map_err(failed)?;
        let path = self.path(&digest);
        let publish = tokio::task::spawn_blocking(move || temp.publish(&path));
        publish
            .await
            .expect("renaming does not panic")
            .map_err(|(path, source)| self.storing_failed(digest, size, &path, source))
    }

    /// Creates a temporary file of this write's own, which no other write shares.
    async fn create_temp(
        &self,
        digest: Digest,
        size: u64,
    ) -> Result<(Temp, tokio::fs::File), BlobError> {
        // Another process with the same ID (in another PID namespace) may write to the store
        // too: creation is exclusive, and a name taken is followed by the next one.
        let mut attempts = 0;
        loop {
            let number = TEMP_NUMBER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{}.{}.{number}", digest.hex(), std::process::id());
            let path = self.root.join("tmp").join(name);
            // Created and locked at once (a quick, local system call each): the lock tells
            // `open` in another process that this file is being written.
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path);
            match created {
                Ok(file) => {
                    let temp = Temp {
                        path,
                        published: false,
                    };
                    if let Err(e) = file.try_lock() {
                        let path = temp.path.clone();
                        return Err(self.storing_failed(digest, size, &path, e.into()));
                    }
                    return Ok((temp, tokio::fs::File::from_std(file)));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists && attempts < 8 => attempts += 1,
                Err(e) => return Err(self.storing_failed(digest, size, &path, e)),
            }
        }
    }

    /// The error of an operation on `path` failing with `source` while blob `digest` of
    /// `size` bytes is stored: [`BlobError::NoSpace`] if the disk is full.
    fn storing_failed(
        &self,
        digest: Digest,
        size: u64,
        path: &Path,
        source: std::io::Error,
    ) -> BlobError {
        match source.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => BlobError::NoSpace {
                digest,
                size,
                store: self.root.clone(),
            },
            _ => BlobError::Io {
                path: path.to_owned(),
                source,
            },
        }
    }

    /// Opens blob `digest` for reading after checking that its content still matches. A blob
    /// that does not is moved to `corrupt/` and reported as [`BlobError::Corrupt`].
    pub async fn open_verified(&self, digest: Digest) -> Result<(tokio::fs::File, u64), BlobError> {
        let path = self.path(&digest);
        loop {
            let opened = path.clone();
            let checked = tokio::task::spawn_blocking(move || open_hashed(&opened))
                .await
                .expect("hashing does not panic");
            let (file, got) = match checked {
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    return Err(BlobError::Missing { digest });
                }
                other => other.map_err(io_error(&path))?,
            };
            if got == digest {
                let size = file.metadata().map_err(io_error(&path))?.len();
                return Ok((tokio::fs::File::from_std(file), size));
            }
            if let Some(moved_to) = self.quarantine(digest, file).await? {
                tracing::warn!(%digest, actual = %got, moved_to = %moved_to.display(), "corrupt blob quarantined");
                return Err(BlobError::Corrupt { digest, moved_to });
            }
            // A verified copy took the corrupt one's place meanwhile: check that one.
        }
    }

    /// Moves blob `digest`, found corrupt when read through `corrupt`, to `corrupt/`; returns
    /// where it now lies, or `None` if a new copy has taken its place since (left alone).
    async fn quarantine(
        &self,
        digest: Digest,
        corrupt: std::fs::File,
    ) -> Result<Option<PathBuf>, BlobError> {
        let path = self.path(&digest);
        let moved_to = self.root.join("corrupt").join(digest.hex());
        let (from, to) = (path.clone(), moved_to.clone());
        let moved = tokio::task::spawn_blocking(move || {
            let _publishing = PUBLISHING.lock().unwrap_or_else(PoisonError::into_inner);
            let found = corrupt.metadata()?;
            match std::fs::metadata(&from) {
                Ok(now) if (now.dev(), now.ino()) == (found.dev(), found.ino()) => {
                    std::fs::rename(&from, &to).map(|()| true)
                }
                Ok(_) => Ok(false),
                // Another reader of the same copy moved it first.
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(true),
                Err(e) => Err(e),
            }
        });
        let moved = moved
            .await
            .expect("renaming does not panic")
            .map_err(io_error(&path))?;
        Ok(moved.then_some(moved_to))
    }
}

/// Numbers the temporary files of this process, so that no two writes share one.
static TEMP_NUMBER: AtomicU64 = AtomicU64::new(0);

/// Held while a blob is renamed into `sha256/` or out of it to `corrupt/`, so that a copy
/// found corrupt is told apart from a verified copy renamed into its place meanwhile.
static PUBLISHING: Mutex<()> = Mutex::new(());

/// The temporary file of one write; removed when dropped unless published, so also when the
/// write fails or its future is dropped midway.
struct Temp {
    path: PathBuf,
    published: bool,
}

impl Temp {
    /// Renames the file to `dest` atomically and syncs the directory, so that the blob
    /// survives a crash. On failure, says which path failed.
    fn publish(mut self, dest: &Path) -> Result<(), (PathBuf, std::io::Error)> {
        {
            let _publishing = PUBLISHING.lock().unwrap_or_else(PoisonError::into_inner);
            std::fs::rename(&self.path, dest).map_err(|e| (dest.to_owned(), e))?;
            self.published = true;
        }
        let dir = dest.parent().expect("a blob's path has a directory");
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| (dir.to_owned(), e))
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads what `source` has, up to `buffer`'s length, within `idle_timeout`.
async fn read_some<R: AsyncRead + Unpin>(
    source: &mut R,
    buffer: &mut [u8],
    idle_timeout: std::time::Duration,
    digest: Digest,
    received: u64,
) -> Result<usize, BlobError> {
    tokio::time::timeout(idle_timeout, source.read(buffer))
        .await
        .map_err(|_| BlobError::Stalled(format!("no data for {idle_timeout:?}")))?
        .map_err(|source| BlobError::Source {
            digest,
            received,
            source,
        })
}

/// Makes sure every byte written to `file` is on disk and that there are `size` of them.
async fn complete(file: &mut tokio::fs::File, size: u64) -> std::io::Result<()> {
    // `sync_all` alone would drop the error of a write still in flight (tokio's File writes
    // in the background); `flush` reports it.
    file.flush().await?;
    file.sync_all().await?;
    let written = file.metadata().await?.len();
    if written != size {
        let message = format!("holds {written} bytes after {size} were written");
        return Err(std::io::Error::other(message));
    }
    Ok(())
}

/// Opens the file at `path` and hashes it; returns it positioned at its start again.
fn open_hashed(path: &Path) -> std::io::Result<(std::fs::File, Digest)> {
    let mut file = std::fs::File::open(path)?;
    let digest = hash_reader(&mut file)?;
    file.rewind()?;
    Ok((file, digest))
}

/// SHA-256 of a file, read in chunks.
pub fn hash_file(path: &Path) -> std::io::Result<Digest> {
    hash_reader(&mut std::fs::File::open(path)?)
}

fn hash_reader(reader: &mut impl Read) -> std::io::Result<Digest> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; CHUNK];
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            return Ok(Digest::from_hasher(hasher));
        }
        hasher.update(&buffer[..read]);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        pin::Pin,
        task::{Context, Poll},
        time::Duration,
    };

    use futures::{StreamExt, TryStreamExt, channel::mpsc};

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
    async fn opening_the_store_removes_abandoned_writes_but_not_one_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let digest = Digest::of(b"in progress");
        let (writing, _file) = store.create_temp(digest, 11).await.unwrap();
        // What a crashed writer leaves: a file nobody holds.
        let abandoned = dir.path().join("tmp").join("abandoned.1.0");
        std::fs::write(&abandoned, b"half").unwrap();
        // Another process (a second hl-service, a test) opening the same directory.
        BlobStore::open(dir.path()).unwrap();
        assert!(!abandoned.exists());
        assert!(writing.path.exists(), "a live write's file was removed");
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

    /// A source the test feeds chunk by chunk (see [`fed_source`]).
    type Fed = Asking<futures::stream::IntoAsyncRead<mpsc::UnboundedReceiver<io::Result<Vec<u8>>>>>;

    /// The test's end of a [`Fed`] source: what it sends is what the writer reads, and it
    /// hears each time the writer asks for more, with the byte count delivered so far.
    struct Feeder {
        chunks: mpsc::UnboundedSender<io::Result<Vec<u8>>>,
        asks: mpsc::UnboundedReceiver<u64>,
    }

    impl Feeder {
        fn send(&self, bytes: &[u8]) {
            self.chunks.unbounded_send(Ok(bytes.to_vec())).unwrap();
        }

        fn fail(&self) {
            let error = io::Error::new(ErrorKind::ConnectionReset, "the peer went away");
            self.chunks.unbounded_send(Err(error)).unwrap();
        }

        /// Waits until the writer asks for bytes after the first `offset` (so it has handed
        /// everything before to its file).
        async fn wait_asking_at(&mut self, offset: u64) {
            loop {
                let at = tokio::time::timeout(IDLE, self.asks.next())
                    .await
                    .expect("the writer asks for more in time")
                    .expect("the writer still reads");
                if at >= offset {
                    return;
                }
            }
        }
    }

    /// Reports, each time it is read, how many bytes it delivered before.
    struct Asking<R> {
        inner: R,
        delivered: u64,
        asks: mpsc::UnboundedSender<u64>,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Asking<R> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let this = &mut *self;
            let _ = this.asks.unbounded_send(this.delivered);
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            if let Poll::Ready(Ok(read)) = polled {
                this.delivered += read as u64;
            }
            polled
        }
    }

    fn fed_source() -> (Feeder, Fed) {
        let (chunks, receiver) = mpsc::unbounded();
        let (asked, asks) = mpsc::unbounded();
        let source = Asking {
            inner: receiver.into_async_read(),
            delivered: 0,
            asks: asked,
        };
        (Feeder { chunks, asks }, source)
    }

    fn spawn_write(
        store: &BlobStore,
        digest: Digest,
        size: usize,
        mut source: Fed,
    ) -> tokio::task::JoinHandle<Result<(), BlobError>> {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write_from(digest, size as u64, &mut source, IDLE, |_| {})
                .await
        })
    }

    async fn finished(
        writer: tokio::task::JoinHandle<Result<(), BlobError>>,
    ) -> Result<(), BlobError> {
        tokio::time::timeout(IDLE, writer)
            .await
            .expect("the writer finishes in time")
            .expect("the writer does not panic")
    }

    /// The store holds exactly `bytes` as their blob, and no transfer is left behind.
    async fn holds_exactly(store: &BlobStore, dir: &Path, bytes: &[u8]) {
        let digest = Digest::of(bytes);
        assert_eq!(store.list(), [digest]);
        let stored = std::fs::read(dir.join("sha256").join(digest.hex())).unwrap();
        assert!(stored == bytes, "the stored blob is not the verified bytes");
        assert!(store.open_verified(digest).await.is_ok());
        let left: Vec<_> = std::fs::read_dir(dir.join("tmp"))
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

    // Issue 16: two writes of one blob at once (two peers uploading it, a fetch racing an
    // upload) never share a temporary file.
    #[tokio::test]
    async fn a_writer_failing_midway_leaves_a_concurrent_writer_of_the_same_blob_intact() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes = content();
        let digest = Digest::of(&bytes);
        let (mut good_feed, good_source) = fed_source();
        let good = spawn_write(&store, digest, bytes.len(), good_source);
        good_feed.send(&bytes[..CHUNK]);
        good_feed.send(&bytes[CHUNK..2 * CHUNK]);
        good_feed.wait_asking_at(2 * CHUNK as u64).await;
        // A second writer starts, receives a little, and its source fails.
        let (mut bad_feed, bad_source) = fed_source();
        let bad = spawn_write(&store, digest, bytes.len(), bad_source);
        bad_feed.send(&bytes[..100]);
        bad_feed.wait_asking_at(100).await;
        bad_feed.fail();
        assert!(finished(bad).await.is_err());
        // The first one completes unharmed.
        good_feed.send(&bytes[2 * CHUNK..]);
        finished(good).await.unwrap();
        holds_exactly(&store, dir.path(), &bytes).await;
    }

    #[tokio::test]
    async fn a_writer_starting_while_another_stores_the_same_blob_cannot_damage_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes = content();
        let digest = Digest::of(&bytes);
        let (mut good_feed, good_source) = fed_source();
        let good = spawn_write(&store, digest, bytes.len(), good_source);
        good_feed.send(&bytes[..CHUNK]);
        good_feed.send(&bytes[CHUNK..2 * CHUNK]);
        // Asking after the second chunk: the first one is in the file.
        good_feed.wait_asking_at(2 * CHUNK as u64).await;
        let (mut bad_feed, bad_source) = fed_source();
        let bad = spawn_write(&store, digest, bytes.len(), bad_source);
        bad_feed.wait_asking_at(0).await;
        // The first writer completes while the second is under way...
        good_feed.send(&bytes[2 * CHUNK..]);
        finished(good).await.unwrap();
        // ...which then receives damaged bytes of the right length.
        let mut damaged = bytes.clone();
        damaged[10] ^= 0xff;
        bad_feed.send(&damaged);
        let result = finished(bad).await;
        assert!(
            matches!(result, Err(BlobError::DigestMismatch { .. })),
            "{result:?}"
        );
        holds_exactly(&store, dir.path(), &bytes).await;
    }

    // Issue 16: a read error of the source is the source's, not a file's of the store.
    #[tokio::test]
    async fn a_failing_source_is_reported_as_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes = content();
        let (feed, mut source) = fed_source();
        feed.send(&bytes[..100]);
        feed.fail();
        let error = store
            .write_from(
                Digest::of(&bytes),
                bytes.len() as u64,
                &mut source,
                IDLE,
                |_| {},
            )
            .await
            .unwrap_err();
        assert!(
            matches!(error, BlobError::Source { received: 100, .. }),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(text.contains("the peer went away"), "{text}");
        assert!(!text.contains(dir.path().to_str().unwrap()), "{text}");
    }

    // Issue 16: limits on everything a peer controls, the size of a blob included.
    #[tokio::test]
    async fn blobs_over_the_limit_are_refused_before_any_byte_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path())
            .unwrap()
            .with_max_blob_bytes(1000);
        let bytes = content();
        let mut source = futures::io::Cursor::new(bytes.clone());
        let error = store
            .write_from(
                Digest::of(&bytes),
                bytes.len() as u64,
                &mut source,
                IDLE,
                |_| {},
            )
            .await
            .unwrap_err();
        assert!(
            matches!(error, BlobError::TooLarge { limit: 1000, .. }),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(text.contains(&format!("{} bytes", bytes.len())), "{text}");
        assert!(text.contains("limit of 1000 bytes"), "{text}");
        assert_eq!(source.position(), 0, "the source was read");
        assert!(store.list().is_empty());
        // A blob of exactly the limit is accepted.
        let store = store.with_max_blob_bytes(bytes.len() as u64);
        put(&store, Digest::of(&bytes), &bytes).await.unwrap();
        holds_exactly(&store, dir.path(), &bytes).await;
    }
}
