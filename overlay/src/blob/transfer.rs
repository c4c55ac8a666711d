//! Moving blobs between overlay nodes, no registry involved.
//!
//! Protocol `/mtc/blob/1`, one transfer per stream. Headers are frames as in [`crate::rpc`]
//! (4-byte length + CBOR, at most [`HEADER_LIMIT`] bytes); the blob itself follows as raw bytes.
//!
//! - get: client sends `Get{digest}`; server answers `Sending{size}` and the bytes, or
//!   `Refused{reason}`.
//! - put: client sends `Put{digest, size}`; server answers `Proceed`, `AlreadyStored` or
//!   `Refused`; after `Proceed` the client sends the bytes and closes, the server verifies
//!   them and answers `Stored` or `Refused`.
//! - has: client sends `Has{digest}`; server answers `Holds{size}`, `size` being `None` if it
//!   holds no copy. Cheap (the store's index, nothing hashed): replication counts copies with it.
//!
//! Uploads: `AlreadyStored` only if the stored copy of that size still verifies (hashed anew);
//! a copy that does not is moved to `corrupt/` and the upload taken in its place. A blob over
//! the store's [`BlobStore::max_blob_bytes`] (8 GiB by default) is refused in answer to `Put`,
//! before any byte is sent, the refusal naming the size and the limit; so is a download whose
//! holder announces such a size. A write that runs out of disk is refused saying the disk is
//! full; the blobs stored before are intact. Every refused upload is counted by reason in
//! [`BlobCounters::refusals`].
//!
//! Serving is bounded: at most [`MAX_UPLOADS`] uploads are taken at once (another is refused
//! as busy, counted, and its uploader tries another holder) and at most [`MAX_TRANSFERS`]
//! transfers of any kind run at once (the rest wait their turn); a fetch whose reader takes
//! no byte for [`IDLE_TIMEOUT`] is abandoned.
//!
//! Every node that holds a blob advertises the namespace [`namespace`]`(digest)`; a fetch
//! tries holders nearest first (lowest measured RTT) and falls back to the next.

use std::{sync::Arc, time::Duration};

use futures::{AsyncRead, AsyncWriteExt, StreamExt, future::Either};
use libp2p::{PeerId, Stream, StreamProtocol};
use prometheus::{IntCounter, IntCounterVec};
use serde::{Deserialize, Serialize};
use tokio_util::compat::TokioAsyncReadCompatExt;

use super::{BlobError, BlobStore, Digest, store::CHUNK};
use crate::{
    overlay::Node,
    rpc::{RpcError, encode_frame, read_frame, write_frame},
};

/// The stream protocol ID of blob transfers; see the module documentation for the exchange.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/mtc/blob/1");
/// Largest header frame.
pub const HEADER_LIMIT: u32 = 4096;
/// A transfer with no byte moving for this long is abandoned.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Uploads a node takes at once; another is refused as busy.
pub const MAX_UPLOADS: usize = 4;
/// Transfers (gets, puts, questions) a node serves at once; the others wait for a turn.
pub const MAX_TRANSFERS: usize = 64;

/// The namespace holders of a blob advertise.
pub fn namespace(digest: &Digest) -> String {
    format!("blob/{}", digest.hex())
}

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Get { digest: Digest },
    Put { digest: Digest, size: u64 },
    Has { digest: Digest },
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Sending { size: u64 },
    Proceed,
    AlreadyStored,
    Stored,
    Refused { reason: String },
    Holds { size: Option<u64> },
}

/// Why moving a blob to or from another node failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The other node answered `Refused`, for instance because it does not hold the blob, found
    /// its copy corrupt, or could not store an upload.
    #[error("{peer} refused: {reason}")]
    Refused {
        /// The node that refused.
        peer: PeerId,
        /// Its explanation, as it sent it.
        reason: String,
    },
    /// Writing to or reading from the stream failed, or a header frame was malformed or over
    /// [`HEADER_LIMIT`]. (A read error of [`upload`]'s local source is
    /// [`TransferError::Source`].)
    #[error("{peer}: {source}")]
    Protocol {
        /// The node at the other end of the stream.
        peer: PeerId,
        /// What failed.
        source: RpcError,
    },
    /// Storing the received blob failed (for instance it was cut short or did not match its
    /// digest), or the source of an upload ended before the announced size.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// No stream to the node could be opened, or it sent no header within [`IDLE_TIMEOUT`],
    /// or it took no byte of an upload for that long.
    #[error("cannot reach {peer}: {reason}")]
    Unreachable {
        /// The node that could not be reached.
        peer: PeerId,
        /// Why, as text.
        reason: String,
    },
    /// No node advertises the blob on the overlay.
    #[error("no node holds blob {digest}")]
    NoHolder {
        /// The blob asked for.
        digest: Digest,
    },
    /// [`fetch`] tried every node advertising the blob and each one failed.
    #[error("every holder of blob {digest} failed: {}", failures.join("; "))]
    AllFailed {
        /// The blob asked for.
        digest: Digest,
        /// One message per holder tried, nearest first.
        failures: Vec<String>,
    },
    /// Reading the local copy of the blob being uploaded failed (not the other node's
    /// doing).
    #[error("reading the blob {digest} to upload failed after {sent} bytes: {source}")]
    Source {
        /// The blob being uploaded.
        digest: Digest,
        /// The bytes sent before the error.
        sent: u64,
        /// The local source's error.
        source: std::io::Error,
    },
    /// The other node sent a reply that does not fit the exchange at that point.
    #[error("{peer} answered out of protocol: {reply}")]
    Unexpected {
        /// The node that answered.
        peer: PeerId,
        /// The reply it sent, in its debug form.
        reply: String,
    },
}

/// Byte counters of blob traffic, exported by the programs that move blobs.
#[derive(Clone)]
pub struct BlobCounters {
    /// Bytes of blobs other nodes uploaded to this node and that were stored
    /// (`blob_bytes_received_total`); blobs this node fetches itself are not counted.
    pub bytes_in: IntCounter,
    /// Bytes of blobs this node sent to nodes that fetched them (`blob_bytes_sent_total`).
    pub bytes_out: IntCounter,
    /// Uploads this node refused (`blob_uploads_refused_total`), by `reason`: `too_large`
    /// (over the store's [`BlobStore::max_blob_bytes`]), `no_space` (the disk is full),
    /// `mismatch` (the bytes did not match the digest), `incomplete` (the upload ended early,
    /// stalled or its stream failed), `io` (another error of the store's disk), `busy`
    /// ([`MAX_UPLOADS`] under way already).
    pub refusals: IntCounterVec,
}

impl BlobCounters {
    /// Creates both counters and registers them in `registry`; fails if counters of those
    /// names are already registered there.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let bytes_in = IntCounter::new(
            "blob_bytes_received_total",
            "Blob bytes received and stored.",
        )?;
        let bytes_out =
            IntCounter::new("blob_bytes_sent_total", "Blob bytes sent to other nodes.")?;
        let refusals = IntCounterVec::new(
            prometheus::Opts::new("blob_uploads_refused_total", "Blob uploads refused."),
            &["reason"],
        )?;
        registry.register(Box::new(bytes_in.clone()))?;
        registry.register(Box::new(bytes_out.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        for reason in REFUSAL_REASONS {
            refusals.with_label_values(&[reason]);
        }
        Ok(Self {
            bytes_in,
            bytes_out,
            refusals,
        })
    }
}

/// Serves `/mtc/blob/1` from `store` until the node stops, and advertises every blob the
/// store holds (and each one received later).
pub async fn serve(node: &Node, store: Arc<BlobStore>, counters: BlobCounters) {
    for digest in store.list() {
        node.advertise(&namespace(&digest)).await;
    }
    let mut incoming = node
        .streams()
        .accept(PROTOCOL)
        .expect("blob protocol is served once per node");
    let stopped = node.stopped();
    let weak = node.downgrade();
    let turns = Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS));
    let uploads = Arc::new(tokio::sync::Semaphore::new(MAX_UPLOADS));
    tokio::spawn(async move {
        loop {
            let (peer, stream) = tokio::select! {
                next = incoming.next() => match next { Some(next) => next, None => return },
                () = stopped.cancelled() => return,
            };
            let turn = tokio::select! {
                turn = Arc::clone(&turns).acquire_owned() => turn.expect("never closed"),
                () = stopped.cancelled() => return,
            };
            let (store, counters, weak) = (Arc::clone(&store), counters.clone(), weak.clone());
            let uploads = Arc::clone(&uploads);
            tokio::spawn(async move {
                let _turn = turn;
                if let Err(error) = answer(stream, &store, &counters, &weak, &uploads).await {
                    tracing::debug!(%peer, %error, "blob transfer failed");
                }
            });
        }
    });
}

async fn answer(
    mut stream: Stream,
    store: &BlobStore,
    counters: &BlobCounters,
    node: &crate::overlay::WeakNode,
    uploads: &tokio::sync::Semaphore,
) -> Result<(), RpcError> {
    let request = tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut stream, HEADER_LIMIT))
        .await
        .map_err(|_| RpcError::Malformed("no request header in time".into()))??;
    match request {
        Request::Get { digest } => match store.open_verified(digest).await {
            Ok((file, size)) => {
                write_frame(&mut stream, &Reply::Sending { size }, HEADER_LIMIT).await?;
                let sent = copy(&mut file.compat(), &mut stream, IDLE_TIMEOUT).await?;
                counters.bytes_out.inc_by(sent);
                stream.close().await?;
            }
            Err(error) => {
                if matches!(error, BlobError::Corrupt { .. } | BlobError::Missing { .. })
                    && let Some(node) = node.upgrade()
                {
                    node.stop_advertising(&namespace(&digest)).await;
                }
                refuse(&mut stream, error.to_string()).await?;
            }
        },
        Request::Put { digest, size } => match uploads.try_acquire() {
            Ok(_upload) => answer_put(&mut stream, store, counters, node, digest, size).await?,
            Err(_) => {
                counters.refusals.with_label_values(&["busy"]).inc();
                let reason = format!("busy: {MAX_UPLOADS} uploads under way here already");
                refuse(&mut stream, reason).await?;
            }
        },
        Request::Has { digest } => {
            let size = store.size_of(&digest);
            write_frame(&mut stream, &Reply::Holds { size }, HEADER_LIMIT).await?;
            stream.close().await?;
        }
    }
    Ok(())
}

async fn answer_put(
    stream: &mut Stream,
    store: &BlobStore,
    counters: &BlobCounters,
    node: &crate::overlay::WeakNode,
    digest: Digest,
    size: u64,
) -> Result<(), RpcError> {
    let limit = store.max_blob_bytes();
    if size > limit {
        let error = BlobError::TooLarge {
            digest,
            size,
            limit,
        };
        return refuse_upload(stream, counters, &error).await;
    }
    if already_stored(store, digest, size).await {
        write_frame(stream, &Reply::AlreadyStored, HEADER_LIMIT).await?;
        return Ok(stream.close().await?);
    }
    write_frame(stream, &Reply::Proceed, HEADER_LIMIT).await?;
    match store
        .write_from(digest, size, stream, IDLE_TIMEOUT, |_| {})
        .await
    {
        Ok(()) => {
            counters.bytes_in.inc_by(size);
            if let Some(node) = node.upgrade() {
                node.advertise(&namespace(&digest)).await;
            }
            write_frame(stream, &Reply::Stored, HEADER_LIMIT).await?;
            Ok(stream.close().await?)
        }
        Err(error) => refuse_upload(stream, counters, &error).await,
    }
}

/// Whether `store` holds blob `digest` of `size` bytes intact. This hashes the stored copy
/// (reads all of it) on every upload of a blob already there: acceptable, uploads are rare
/// (an operator adding a service), and a damaged copy must not pass for stored. A copy that
/// does not verify is moved to `corrupt/`, and the upload is taken in its place.
async fn already_stored(store: &BlobStore, digest: Digest, size: u64) -> bool {
    if store.size_of(&digest) != Some(size) {
        return false;
    }
    match store.open_verified(digest).await {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!(%digest, %error, "stored copy does not verify; taking the upload");
            false
        }
    }
}

/// The values of the `reason` label of [`BlobCounters::refusals`].
const REFUSAL_REASONS: [&str; 6] = [
    "too_large",
    "no_space",
    "mismatch",
    "incomplete",
    "io",
    "busy",
];

/// The `reason` an upload refused because of `error` is counted under.
fn refusal_reason(error: &BlobError) -> &'static str {
    match error {
        BlobError::TooLarge { .. } => "too_large",
        BlobError::NoSpace { .. } => "no_space",
        BlobError::DigestMismatch { .. } => "mismatch",
        BlobError::Truncated { .. } | BlobError::Stalled(_) | BlobError::Source { .. } => {
            "incomplete"
        }
        BlobError::Io { .. } | BlobError::Missing { .. } | BlobError::Corrupt { .. } => "io",
    }
}

/// Refuses an upload because of `error`, and counts it.
async fn refuse_upload(
    stream: &mut Stream,
    counters: &BlobCounters,
    error: &BlobError,
) -> Result<(), RpcError> {
    let reason = refusal_reason(error);
    counters.refusals.with_label_values(&[reason]).inc();
    refuse(stream, error.to_string()).await
}

async fn refuse(stream: &mut Stream, reason: String) -> Result<(), RpcError> {
    write_frame(stream, &Reply::Refused { reason }, HEADER_LIMIT).await?;
    Ok(stream.close().await?)
}

/// Copies everything from `from` to `to` in [`CHUNK`]s; returns the byte count. A write that
/// `to` does not take within `idle` fails with `TimedOut`.
async fn copy<R, W>(from: &mut R, to: &mut W, idle: Duration) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: futures::AsyncWrite + Unpin,
{
    let stalled = || std::io::Error::new(std::io::ErrorKind::TimedOut, "the reader took no byte");
    let mut buffer = vec![0; CHUNK];
    let mut total = 0;
    loop {
        let read = futures::AsyncReadExt::read(from, &mut buffer).await?;
        if read == 0 {
            tokio::time::timeout(idle, to.flush())
                .await
                .map_err(|_| stalled())??;
            return Ok(total);
        }
        tokio::time::timeout(idle, to.write_all(&buffer[..read]))
            .await
            .map_err(|_| stalled())??;
        total += read as u64;
    }
}

/// Opens a stream to `peer`, sends `request` and returns the first reply with the stream
/// (a stream the peer drops unread is opened again: [`Node::open_and_ask`]).
async fn ask(
    node: &Node,
    peer: PeerId,
    request: &Request,
) -> Result<(Reply, Stream), TransferError> {
    let frame = encode_frame(request, HEADER_LIMIT)
        .map_err(|source| TransferError::Protocol { peer, source })?;
    let asked = node.open_and_ask(peer, PROTOCOL, &frame, false, HEADER_LIMIT);
    tokio::time::timeout(IDLE_TIMEOUT, asked)
        .await
        .map_err(|_| TransferError::Unreachable {
            peer,
            reason: format!("no answer within {IDLE_TIMEOUT:?}"),
        })?
        .map_err(|error| match error {
            RpcError::Open { reason, .. } => TransferError::Unreachable { peer, reason },
            source => TransferError::Protocol { peer, source },
        })
}

/// Uploads `size` bytes from `source` as blob `digest` to `peer`; `progress` is told the
/// bytes sent so far. An answer arriving while the bytes are still being sent (the other node
/// refusing midway, say its disk is full) ends the upload at once with that answer.
pub async fn upload<R: AsyncRead + Unpin>(
    node: &Node,
    peer: PeerId,
    digest: Digest,
    size: u64,
    source: &mut R,
    mut progress: impl FnMut(u64),
) -> Result<(), TransferError> {
    let (reply, stream) = ask(node, peer, &Request::Put { digest, size }).await?;
    match reply {
        Reply::Proceed => {}
        Reply::AlreadyStored => {
            progress(size);
            return Ok(());
        }
        Reply::Refused { reason } => return Err(TransferError::Refused { peer, reason }),
        other => {
            return Err(TransferError::Unexpected {
                peer,
                reply: format!("{other:?}"),
            });
        }
    }
    let (mut answers, mut bytes) = futures::AsyncReadExt::split(stream);
    let early = std::pin::pin!(read_frame::<Reply, _>(&mut answers, HEADER_LIMIT));
    let send = std::pin::pin!(send(&mut bytes, source, digest, size, peer, &mut progress));
    // The answer first: once the other node has answered, what is left to send is moot.
    let answer = match futures::future::select(early, send).await {
        Either::Left((answer, _)) => answer,
        Either::Right((sent, early)) => {
            sent?;
            tokio::time::timeout(IDLE_TIMEOUT, early)
                .await
                .map_err(|_| TransferError::Unreachable {
                    peer,
                    reason: format!("no answer within {IDLE_TIMEOUT:?}"),
                })?
        }
    };
    let answer = answer.map_err(|source| TransferError::Protocol { peer, source })?;
    match answer {
        Reply::Stored => Ok(()),
        Reply::Refused { reason } => Err(TransferError::Refused { peer, reason }),
        other => Err(TransferError::Unexpected {
            peer,
            reply: format!("{other:?}"),
        }),
    }
}

/// Sends the `size` bytes of blob `digest` from `source` to `peer`, then closes the sending
/// side. A write that `peer` does not take within [`IDLE_TIMEOUT`] ends it.
async fn send<R, W>(
    to: &mut W,
    source: &mut R,
    digest: Digest,
    size: u64,
    peer: PeerId,
    progress: &mut impl FnMut(u64),
) -> Result<(), TransferError>
where
    R: AsyncRead + Unpin,
    W: futures::AsyncWrite + Unpin,
{
    let mut buffer = vec![0; CHUNK];
    let mut sent = 0u64;
    while sent < size {
        let want = CHUNK.min((size - sent) as usize);
        let read = futures::AsyncReadExt::read(source, &mut buffer[..want])
            .await
            .map_err(|source| TransferError::Source {
                digest,
                sent,
                source,
            })?;
        if read == 0 {
            return Err(BlobError::Truncated {
                expected: digest,
                size,
                got: sent,
            }
            .into());
        }
        taken(to.write_all(&buffer[..read]), peer).await?;
        sent += read as u64;
        progress(sent);
    }
    taken(to.close(), peer).await
}

/// Awaits a write to `peer`, for at most [`IDLE_TIMEOUT`].
async fn taken(
    write: impl std::future::Future<Output = std::io::Result<()>>,
    peer: PeerId,
) -> Result<(), TransferError> {
    tokio::time::timeout(IDLE_TIMEOUT, write)
        .await
        .map_err(|_| TransferError::Unreachable {
            peer,
            reason: format!("it took no byte for {IDLE_TIMEOUT:?}"),
        })?
        .map_err(|e| TransferError::Protocol {
            peer,
            source: e.into(),
        })
}

/// The size of `peer`'s copy of blob `digest`, `None` if it holds none. Asked of the node's
/// index, not verified: a damaged copy is found when it is fetched.
pub async fn holds(
    node: &Node,
    peer: PeerId,
    digest: Digest,
) -> Result<Option<u64>, TransferError> {
    let (reply, _) = ask(node, peer, &Request::Has { digest }).await?;
    match reply {
        Reply::Holds { size } => Ok(size),
        Reply::Refused { reason } => Err(TransferError::Refused { peer, reason }),
        other => Err(TransferError::Unexpected {
            peer,
            reply: format!("{other:?}"),
        }),
    }
}

/// Downloads blob `digest` from `peer` into `store` (which verifies it).
pub async fn download_from(
    node: &Node,
    peer: PeerId,
    digest: Digest,
    store: &BlobStore,
) -> Result<u64, TransferError> {
    let (reply, mut stream) = ask(node, peer, &Request::Get { digest }).await?;
    match reply {
        Reply::Sending { size } => {
            store
                .write_from(digest, size, &mut stream, IDLE_TIMEOUT, |_| {})
                .await?;
            Ok(size)
        }
        Reply::Refused { reason } => Err(TransferError::Refused { peer, reason }),
        other => Err(TransferError::Unexpected {
            peer,
            reply: format!("{other:?}"),
        }),
    }
}

/// Fetches blob `digest` into `store` from the nearest node holding it, falling back to the
/// next nearest on any failure (unreachable, refused, corrupt in transit). Afterwards this
/// node advertises the blob too. Returns the holder it came from.
pub async fn fetch(
    node: &Node,
    digest: Digest,
    store: &BlobStore,
) -> Result<PeerId, TransferError> {
    let holders: Vec<PeerId> = node
        .find_providers(&namespace(&digest))
        .await
        .collect()
        .await;
    if holders.is_empty() {
        return Err(TransferError::NoHolder { digest });
    }
    fetch_from(node, nearest_first(node, holders), digest, store).await
}

/// Fetches blob `digest` into `store` from the first of `holders` that delivers it intact,
/// in their order; then advertises it. What [`fetch`] does once it has found and ordered the
/// holders.
pub async fn fetch_from(
    node: &Node,
    holders: Vec<PeerId>,
    digest: Digest,
    store: &BlobStore,
) -> Result<PeerId, TransferError> {
    let mut failures = Vec::new();
    for peer in holders {
        match download_from(node, peer, digest, store).await {
            Ok(_) => {
                node.advertise(&namespace(&digest)).await;
                return Ok(peer);
            }
            Err(error) => {
                tracing::info!(%peer, %digest, %error, "blob fetch failed, trying the next holder");
                failures.push(error.to_string());
            }
        }
    }
    Err(TransferError::AllFailed { digest, failures })
}

/// Peers sorted by their smoothed RTT; peers not yet measured go last.
pub fn nearest_first(node: &Node, mut peers: Vec<PeerId>) -> Vec<PeerId> {
    peers.sort_by_key(|peer| node.rtt(peer).map_or(Duration::MAX, |stats| stats.ewma));
    peers
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that never takes a byte: a fetcher that stopped reading.
    struct Stuck;

    impl futures::AsyncWrite for Stuck {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn serving_a_fetch_to_a_reader_that_stopped_reading_is_abandoned() {
        let mut from = futures::io::Cursor::new(vec![7u8; 3 * CHUNK]);
        let began = tokio::time::Instant::now();
        let error = copy(&mut from, &mut Stuck, IDLE_TIMEOUT).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(began.elapsed(), IDLE_TIMEOUT, "virtual time");
        // A reader that takes everything gets everything.
        let mut from = futures::io::Cursor::new(vec![7u8; 3 * CHUNK]);
        let mut to = futures::io::Cursor::new(Vec::new());
        assert_eq!(
            copy(&mut from, &mut to, IDLE_TIMEOUT).await.unwrap(),
            3 * CHUNK as u64
        );
    }
}
