//! The two halves of a stream: each operation locks the driver's state, calls quinn-proto's
//! stream and marks the connection for the driver to send what came of it; an operation
//! that must wait leaves its waker where the driver's events find it.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use quinn::{
    ClosedStream, ReadError, ReadExactError, ReadToEndError, StoppedError, VarInt, WriteError,
    Written,
};
use quinn_proto::{self as proto, Chunk, StreamId};
use tokio::io::ReadBuf;

use super::{Connection, State};

/// The sending half of a stream (quinn's `SendStream`). Dropped unfinished, it is finished.
pub struct SendStream {
    conn: Connection,
    id: StreamId,
}

impl SendStream {
    pub(super) fn new(conn: Connection, id: StreamId) -> Self {
        Self { conn, id }
    }

    /// The stream's identifier.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Runs a write on the stream; waits while quinn-proto is blocked (flow control, or the
    /// send window full).
    fn poll_write_with<T>(
        &mut self,
        cx: &mut Context,
        write: impl FnOnce(&mut proto::SendStream) -> Result<T, proto::WriteError>,
    ) -> Poll<Result<T, WriteError>> {
        let id = self.id;
        self.conn.with(|state, key| {
            let conn = &mut state.conns[key];
            if let Some(error) = &conn.error {
                return Poll::Ready(Err(WriteError::ConnectionLost(error.clone())));
            }
            match write(&mut conn.inner.send_stream(id)) {
                Ok(written) => {
                    state.mark(key);
                    Poll::Ready(Ok(written))
                }
                Err(proto::WriteError::Blocked) => {
                    conn.blocked_writers.insert(id, cx.waker().clone());
                    Poll::Pending
                }
                Err(proto::WriteError::Stopped(code)) => {
                    Poll::Ready(Err(WriteError::Stopped(code)))
                }
                Err(proto::WriteError::ClosedStream) => Poll::Ready(Err(WriteError::ClosedStream)),
            }
        })
    }

    /// Writes some of `buf`; how much.
    pub async fn write(&mut self, buf: &[u8]) -> Result<usize, WriteError> {
        std::future::poll_fn(|cx| self.poll_write_with(cx, |s| s.write(buf))).await
    }

    /// Writes all of `buf`.
    pub async fn write_all(&mut self, mut buf: &[u8]) -> Result<(), WriteError> {
        while !buf.is_empty() {
            let written = self.write(buf).await?;
            buf = &buf[written..];
        }
        Ok(())
    }

    /// Writes some of `bufs`, taking them over without copying; what it took.
    pub async fn write_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Written, WriteError> {
        std::future::poll_fn(|cx| self.poll_write_with(cx, |s| s.write_chunks(bufs))).await
    }

    /// Writes all of `buf` without copying it.
    pub async fn write_chunk(&mut self, buf: Bytes) -> Result<(), WriteError> {
        self.write_all_chunks(&mut [buf]).await
    }

    /// Writes all of `bufs` without copying them.
    pub async fn write_all_chunks(&mut self, bufs: &mut [Bytes]) -> Result<(), WriteError> {
        let mut start = 0;
        loop {
            // Past the chunks taken whole (and any empty ones).
            while bufs.get(start).is_some_and(Bytes::is_empty) {
                start += 1;
            }
            if start == bufs.len() {
                return Ok(());
            }
            start += self.write_chunks(&mut bufs[start..]).await?.chunks;
        }
    }

    /// Ends the stream: the peer reads to its end once it has everything written.
    pub fn finish(&mut self) -> Result<(), ClosedStream> {
        let id = self.id;
        self.conn.with(
            |state, key| match state.conns[key].inner.send_stream(id).finish() {
                Ok(()) => {
                    state.mark(key);
                    Ok(())
                }
                // As quinn: a stream the peer stopped needs no finishing (`stopped` says so).
                Err(proto::FinishError::Stopped(_)) => Ok(()),
                Err(proto::FinishError::ClosedStream) => Err(ClosedStream::default()),
            },
        )
    }

    /// Abandons the stream: what is unsent is dropped and the peer's reads fail with `code`.
    pub fn reset(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        let id = self.id;
        self.conn.with(|state, key| {
            state.conns[key].inner.send_stream(id).reset(code)?;
            state.mark(key);
            Ok(())
        })
    }

    /// Resolves when the peer has everything written after a [`SendStream::finish`] (`None`),
    /// or has stopped reading (its code).
    /// The future holds a handle of its own: it borrows nothing.
    pub fn stopped(
        &self,
    ) -> impl Future<Output = Result<Option<VarInt>, StoppedError>> + Send + Sync + 'static {
        let (conn, id) = (self.conn.clone(), self.id);
        std::future::poll_fn(move |cx| {
            conn.with(|state, key| {
                let conn = &mut state.conns[key];
                match conn.inner.send_stream(id).stopped() {
                    Err(_) => Poll::Ready(Ok(None)),
                    Ok(Some(code)) => Poll::Ready(Ok(Some(code))),
                    Ok(None) => {
                        if let Some(error) = &conn.error {
                            return Poll::Ready(Err(StoppedError::ConnectionLost(error.clone())));
                        }
                        conn.stopped.insert(id, cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
        })
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        let id = self.id;
        self.conn.with(|state, key| {
            let conn = &mut state.conns[key];
            conn.blocked_writers.remove(&id);
            if conn.error.is_some() {
                return;
            }
            let mut stream = conn.inner.send_stream(id);
            match stream.finish() {
                Ok(()) => state.mark(key),
                Err(proto::FinishError::Stopped(code)) => {
                    if stream.reset(code).is_ok() {
                        state.mark(key);
                    }
                }
                Err(proto::FinishError::ClosedStream) => {}
            }
        });
    }
}

impl tokio::io::AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |s| s.write(buf))
            .map_err(io::Error::from)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().finish().map_err(io::Error::from))
    }
}

/// The receiving half of a stream (quinn's `RecvStream`). Dropped before its end, it asks
/// the peer to stop sending (code 0).
pub struct RecvStream {
    conn: Connection,
    id: StreamId,
    /// Read to its end, or reset: nothing to stop when dropped.
    ended: bool,
}

/// What a read took from quinn-proto's chunks.
enum ReadStatus<T> {
    Readable(T),
    Finished(Option<T>),
    Failed(Option<T>, proto::ReadError),
}

impl RecvStream {
    pub(super) fn new(conn: Connection, id: StreamId) -> Self {
        Self {
            conn,
            id,
            ended: false,
        }
    }

    /// The stream's identifier.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Runs `read` on what the stream holds (in order, or as it came); waits while it holds
    /// nothing. `Ok(None)` at the stream's end.
    fn poll_read_with<T>(
        &mut self,
        cx: &mut Context,
        ordered: bool,
        read: impl FnOnce(&mut proto::Chunks) -> ReadStatus<T>,
    ) -> Poll<Result<Option<T>, ReadError>> {
        if self.ended {
            return Poll::Ready(Ok(None));
        }
        let id = self.id;
        let (status, ended) = self.conn.with(|state, key| {
            let conn = &mut state.conns[key];
            let mut stream = conn.inner.recv_stream(id);
            let mut chunks = match stream.read(ordered) {
                Ok(chunks) => chunks,
                Err(proto::ReadableError::ClosedStream) => {
                    return (Poll::Ready(Err(ReadError::ClosedStream)), true);
                }
                Err(proto::ReadableError::IllegalOrderedRead) => {
                    return (Poll::Ready(Err(ReadError::IllegalOrderedRead)), false);
                }
            };
            let status = read(&mut chunks);
            if chunks.finalize().should_transmit() {
                // The peer is owed flow-control credit.
                state.mark(key);
            }
            let conn = &mut state.conns[key];
            match status {
                ReadStatus::Readable(read) => (Poll::Ready(Ok(Some(read))), false),
                ReadStatus::Finished(read) => (Poll::Ready(Ok(read)), true),
                ReadStatus::Failed(Some(read), _) => (Poll::Ready(Ok(Some(read))), false),
                ReadStatus::Failed(None, proto::ReadError::Blocked) => {
                    if let Some(error) = &conn.error {
                        return (
                            Poll::Ready(Err(ReadError::ConnectionLost(error.clone()))),
                            false,
                        );
                    }
                    conn.blocked_readers.insert(id, cx.waker().clone());
                    (Poll::Pending, false)
                }
                ReadStatus::Failed(None, proto::ReadError::Reset(code)) => {
                    (Poll::Ready(Err(ReadError::Reset(code))), true)
                }
            }
        });
        self.ended |= ended;
        status
    }

    fn poll_read_buf(
        &mut self,
        cx: &mut Context,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<Result<Option<usize>, ReadError>> {
        self.poll_read_with(cx, true, |chunks| {
            let mut read = 0;
            loop {
                if buf.remaining() == 0 {
                    return ReadStatus::Readable(read);
                }
                match chunks.next(buf.remaining()) {
                    Ok(Some(chunk)) => {
                        buf.put_slice(&chunk.bytes);
                        read += chunk.bytes.len();
                    }
                    // quinn-proto has freed the stream: this read is its last.
                    Ok(None) => return ReadStatus::Finished((read > 0).then_some(read)),
                    Err(error) => return ReadStatus::Failed((read > 0).then_some(read), error),
                }
            }
        })
    }

    /// Reads into `buf`; how much, or `None` at the stream's end.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ReadError> {
        let mut buf = ReadBuf::new(buf);
        std::future::poll_fn(|cx| self.poll_read_buf(cx, &mut buf)).await
    }

    /// The next chunk of at most `max_length` bytes, without copying; `None` at the end.
    /// Unordered reads take chunks as they arrive (a stream read one way is read that way to
    /// its end).
    pub async fn read_chunk(
        &mut self,
        max_length: usize,
        ordered: bool,
    ) -> Result<Option<Chunk>, ReadError> {
        std::future::poll_fn(|cx| {
            self.poll_read_with(cx, ordered, |chunks| match chunks.next(max_length) {
                Ok(Some(chunk)) => ReadStatus::Readable(chunk),
                Ok(None) => ReadStatus::Finished(None),
                Err(error) => ReadStatus::Failed(None, error),
            })
        })
        .await
    }

    /// Fills `buf`, or fails if the stream ends first.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadExactError> {
        let mut buf = ReadBuf::new(buf);
        while buf.remaining() > 0 {
            let read = std::future::poll_fn(|cx| self.poll_read_buf(cx, &mut buf)).await?;
            if read.is_none() {
                return Err(ReadExactError::FinishedEarly(buf.filled().len()));
            }
        }
        Ok(())
    }

    /// Everything to the stream's end, if it is at most `size_limit` bytes.
    pub async fn read_to_end(&mut self, size_limit: usize) -> Result<Vec<u8>, ReadToEndError> {
        let mut read = Vec::new();
        while let Some(chunk) = self.read_chunk(usize::MAX, true).await? {
            if read.len() + chunk.bytes.len() > size_limit {
                return Err(ReadToEndError::TooLong);
            }
            read.extend_from_slice(&chunk.bytes);
        }
        Ok(read)
    }

    /// Asks the peer to stop sending, with `code`; what is unread is dropped.
    pub fn stop(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        let id = self.id;
        self.conn.with(|state, key| stop(state, key, id, code))?;
        self.ended = true;
        Ok(())
    }
}

/// Asks the peer to stop sending on stream `id` of connection `key`.
fn stop(state: &mut State, key: usize, id: StreamId, code: VarInt) -> Result<(), ClosedStream> {
    state.conns[key].inner.recv_stream(id).stop(code)?;
    state.mark(key);
    Ok(())
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        let (id, ended) = (self.id, self.ended);
        self.conn.with(|state, key| {
            state.conns[key].blocked_readers.remove(&id);
            if !ended {
                let _ = stop(state, key, id, 0u32.into());
            }
        });
    }
}

impl tokio::io::AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_read_buf(cx, buf)
            .map(|read| read.map(|_| ()).map_err(io::Error::from))
    }
}
