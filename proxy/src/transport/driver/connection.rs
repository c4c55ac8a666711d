//! One connection: its quinn-proto state with the wakers and signals of the tasks waiting on
//! it ([`Conn`], in the driver's [`State`]; [`Signals`]), and the handles to it
//! ([`Connection`], [`Connecting`]).

use std::{
    future::Future,
    net::SocketAddr,
    pin::{Pin, pin},
    sync::Arc,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use quinn::{ConnectionError, SendDatagramError, VarInt};
use quinn_proto::{self as proto, ConnectionHandle, Dir, StreamEvent, StreamId};
use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use super::{RecvStream, SendStream, Shared, State};

/// A connection's state in the driver's [`State`].
pub(super) struct Conn {
    pub(super) handle: ConnectionHandle,
    pub(super) inner: proto::Connection,
    /// Handles alive: [`Connection`]s, streams, a [`Connecting`], the accept queue's.
    pub(super) refs: usize,
    /// Listed in `State::dirty`.
    pub(super) dirty: bool,
    /// quinn-proto is done with it: it has left the endpoint's books.
    pub(super) drained: bool,
    /// Its entry in `State::deadlines`.
    pub(super) deadline: Option<Instant>,
    /// Why it ended, once it has (or is closing).
    pub(super) error: Option<ConnectionError>,
    connected: bool,
    stable_id: usize,
    connecting: Option<Waker>,
    pub(super) blocked_writers: FxHashMap<StreamId, Waker>,
    pub(super) blocked_readers: FxHashMap<StreamId, Waker>,
    pub(super) stopped: FxHashMap<StreamId, Waker>,
    pub(super) signals: Arc<Signals>,
}

/// What tasks of a connection wait for, as `Notify`s: any number of tasks may wait, and a
/// wait that is given up takes its registration with it (a waker list would keep it).
#[derive(Default)]
pub(super) struct Signals {
    /// The peer's stream limit may allow another stream.
    opening: Notify,
    /// The peer opened a stream.
    accepting: Notify,
    datagram_received: Notify,
    /// Room for a datagram in the send queue.
    datagrams_unblocked: Notify,
    closed: Notify,
}

fn wake_map(wakers: &mut FxHashMap<StreamId, Waker>) {
    wakers.drain().for_each(|(_, waker)| waker.wake());
}

fn wake_stream(wakers: &mut FxHashMap<StreamId, Waker>, id: StreamId) {
    if let Some(waker) = wakers.remove(&id) {
        waker.wake();
    }
}

impl Conn {
    pub(super) fn new(
        handle: ConnectionHandle,
        inner: proto::Connection,
        refs: usize,
        stable_id: usize,
    ) -> Self {
        Self {
            handle,
            inner,
            refs,
            dirty: false,
            drained: false,
            deadline: None,
            error: None,
            connected: false,
            stable_id,
            connecting: None,
            blocked_writers: FxHashMap::default(),
            blocked_readers: FxHashMap::default(),
            stopped: FxHashMap::default(),
            signals: Arc::default(),
        }
    }

    /// Wakes the tasks waiting on what quinn-proto's application events say happened.
    pub(super) fn forward_app_events(&mut self) {
        while let Some(event) = self.inner.poll() {
            match event {
                proto::Event::HandshakeDataReady => {}
                proto::Event::Connected => {
                    self.connected = true;
                    if let Some(waker) = self.connecting.take() {
                        waker.wake();
                    }
                }
                proto::Event::ConnectionLost { reason } => self.terminate(reason),
                proto::Event::Stream(StreamEvent::Writable { id }) => {
                    wake_stream(&mut self.blocked_writers, id)
                }
                proto::Event::Stream(StreamEvent::Readable { id }) => {
                    wake_stream(&mut self.blocked_readers, id)
                }
                proto::Event::Stream(StreamEvent::Opened { .. }) => {
                    self.signals.accepting.notify_waiters()
                }
                proto::Event::Stream(StreamEvent::Available { .. }) => {
                    self.signals.opening.notify_waiters()
                }
                proto::Event::Stream(StreamEvent::Finished { id }) => {
                    wake_stream(&mut self.stopped, id)
                }
                proto::Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    wake_stream(&mut self.stopped, id);
                    wake_stream(&mut self.blocked_writers, id);
                }
                proto::Event::DatagramReceived => self.signals.datagram_received.notify_waiters(),
                proto::Event::DatagramsUnblocked => {
                    self.signals.datagrams_unblocked.notify_waiters()
                }
            }
        }
    }

    /// The connection has ended (or is closing) for `reason`: every waiting task is woken to
    /// find out. The first reason stands.
    pub(super) fn terminate(&mut self, reason: ConnectionError) {
        if self.error.is_none() {
            self.error = Some(reason);
        }
        if let Some(waker) = self.connecting.take() {
            waker.wake();
        }
        wake_map(&mut self.blocked_writers);
        wake_map(&mut self.blocked_readers);
        wake_map(&mut self.stopped);
        let signals = &self.signals;
        for signal in [
            &signals.opening,
            &signals.accepting,
            &signals.datagram_received,
            &signals.datagrams_unblocked,
            &signals.closed,
        ] {
            signal.notify_waiters();
        }
    }

    /// Closes it now (the driver then sends the CONNECTION_CLOSE).
    pub(super) fn close(&mut self, now: Instant, code: VarInt, reason: Bytes) {
        if self.error.is_none() {
            self.inner.close(now, code, reason);
        }
        self.terminate(ConnectionError::LocallyClosed);
    }
}

/// A QUIC connection (quinn's `Connection`, driven by the endpoint's driver). Cheap to
/// clone; when the last handle to it (streams included) goes, it closes with code 0.
pub struct Connection {
    pub(super) shared: Arc<Shared>,
    pub(super) key: usize,
    signals: Arc<Signals>,
}

impl Connection {
    /// A handle for connection `key` of `state` (locked by the caller), whose reference the
    /// caller has counted already.
    pub(super) fn from_key(shared: &Arc<Shared>, state: &State, key: usize) -> Self {
        Self {
            shared: Arc::clone(shared),
            key,
            signals: Arc::clone(&state.conns[key].signals),
        }
    }

    /// Waits for `signal` until `check`, run under the lock, has an answer: once at once, then
    /// each time after the wait is registered (so that no notification between the two is
    /// missed).
    async fn wait_for<T>(
        &self,
        signal: fn(&Signals) -> &Notify,
        mut check: impl FnMut(&mut State, usize) -> Option<T>,
    ) -> T {
        // Most waits are over at once (a stream to open, a datagram queued): no registration.
        if let Some(answer) = self.with(&mut check) {
            return answer;
        }
        loop {
            let mut notified = pin!(signal(&self.signals).notified());
            notified.as_mut().enable();
            if let Some(answer) = self.with(&mut check) {
                return answer;
            }
            notified.await;
        }
    }

    /// Runs `f` on the connection's state under the lock; `f` gets the whole state too, for
    /// [`State::mark`].
    pub(super) fn with<T>(&self, f: impl FnOnce(&mut State, usize) -> T) -> T {
        let mut state = self.shared.lock();
        f(&mut state, self.key)
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> T) -> T {
        self.with(|state, key| f(&mut state.conns[key]))
    }

    /// Opens a bidirectional stream, waiting for the peer's stream limit if it is reached.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let id = self
            .wait_for(
                |signals| &signals.opening,
                |state, key| {
                    let conn = &mut state.conns[key];
                    if let Some(error) = &conn.error {
                        return Some(Err(error.clone()));
                    }
                    let id = conn.inner.streams().open(Dir::Bi)?;
                    conn.refs += 2;
                    Some(Ok(id))
                },
            )
            .await?;
        Ok(self.streams(id))
    }

    /// The next bidirectional stream the peer opens.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let id = self
            .wait_for(
                |signals| &signals.accepting,
                |state, key| {
                    let conn = &mut state.conns[key];
                    if let Some(id) = conn.inner.streams().accept(Dir::Bi) {
                        conn.refs += 2;
                        // The peer may be owed more stream credit.
                        state.mark(key);
                        return Some(Ok(id));
                    }
                    conn.error.clone().map(Err)
                },
            )
            .await?;
        Ok(self.streams(id))
    }

    /// The two halves of stream `id`, whose two references the caller has counted already
    /// (under the lock it opened or accepted the stream in).
    fn streams(&self, id: StreamId) -> (SendStream, RecvStream) {
        (
            SendStream::new(self.counted(), id),
            RecvStream::new(self.counted(), id),
        )
    }

    /// Another handle, whose reference the caller has counted.
    fn counted(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            key: self.key,
            signals: Arc::clone(&self.signals),
        }
    }

    /// Sends an unreliable datagram, dropping the oldest queued ones if the queue is full.
    pub fn send_datagram(&self, data: Bytes) -> Result<(), SendDatagramError> {
        self.with(|state, key| {
            let conn = &mut state.conns[key];
            if let Some(error) = &conn.error {
                return Err(SendDatagramError::ConnectionLost(error.clone()));
            }
            conn.inner
                .datagrams()
                .send(data, true)
                .map_err(datagram_error)?;
            state.mark(key);
            Ok(())
        })
    }

    /// Sends an unreliable datagram, waiting for room in the queue rather than dropping.
    pub async fn send_datagram_wait(&self, data: Bytes) -> Result<(), SendDatagramError> {
        let mut data = Some(data);
        self.wait_for(
            |signals| &signals.datagrams_unblocked,
            |state, key| {
                let conn = &mut state.conns[key];
                if let Some(error) = &conn.error {
                    return Some(Err(SendDatagramError::ConnectionLost(error.clone())));
                }
                let datagram = data.take().expect("taken back when blocked");
                match conn.inner.datagrams().send(datagram, false) {
                    Ok(()) => {
                        state.mark(key);
                        Some(Ok(()))
                    }
                    Err(proto::SendDatagramError::Blocked(datagram)) => {
                        data = Some(datagram);
                        None
                    }
                    Err(error) => Some(Err(datagram_error(error))),
                }
            },
        )
        .await
    }

    /// The next unreliable datagram from the peer.
    pub async fn read_datagram(&self) -> Result<Bytes, ConnectionError> {
        self.wait_for(
            |signals| &signals.datagram_received,
            |state, key| {
                let conn = &mut state.conns[key];
                match conn.inner.datagrams().recv() {
                    Some(datagram) => Some(Ok(datagram)),
                    None => conn.error.clone().map(Err),
                }
            },
        )
        .await
    }

    /// The largest datagram the peer takes now, if it takes any.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.with_conn(|conn| conn.inner.datagrams().max_size())
    }

    /// Closes the connection now with `code` and `reason`.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        self.with(|state, key| {
            let now = Instant::now();
            state.conns[key].close(now, code, Bytes::copy_from_slice(reason));
            state.mark(key);
        });
    }

    /// Resolves with the reason once the connection has ended.
    pub async fn closed(&self) -> ConnectionError {
        self.wait_for(
            |signals| &signals.closed,
            |state, key| state.conns[key].error.clone(),
        )
        .await
    }

    /// Why the connection ended, if it has.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.with_conn(|conn| conn.error.clone())
    }

    /// quinn-proto's counters for the connection.
    pub fn stats(&self) -> quinn::ConnectionStats {
        self.with_conn(|conn| conn.inner.stats())
    }

    /// The smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.with_conn(|conn| conn.inner.rtt())
    }

    /// The peer's UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.with_conn(|conn| conn.inner.remote_address())
    }

    /// A number that identifies this connection among the endpoint's for as long as it lives.
    pub fn stable_id(&self) -> usize {
        self.with_conn(|conn| conn.stable_id)
    }

    /// Keying material from the TLS session (RFC 5705), as quinn's.
    pub fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), proto::crypto::ExportKeyingMaterialError> {
        self.with_conn(|conn| {
            conn.inner
                .crypto_session()
                .export_keying_material(output, label, context)
        })
    }
}

fn datagram_error(error: proto::SendDatagramError) -> SendDatagramError {
    match error {
        proto::SendDatagramError::UnsupportedByPeer => SendDatagramError::UnsupportedByPeer,
        proto::SendDatagramError::Disabled => SendDatagramError::Disabled,
        proto::SendDatagramError::TooLarge | proto::SendDatagramError::Blocked(_) => {
            SendDatagramError::TooLarge
        }
    }
}

impl Clone for Connection {
    fn clone(&self) -> Self {
        self.with_conn(|conn| conn.refs += 1);
        self.counted()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.with(|state, key| state.release(key));
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("key", &self.key)
            .finish()
    }
}

/// A connection handshaking: resolves to the [`Connection`] once it is established.
pub struct Connecting {
    connection: Option<Connection>,
}

impl Connecting {
    pub(super) fn new(connection: Connection) -> Self {
        Self {
            connection: Some(connection),
        }
    }

    /// The peer's UDP address.
    pub fn remote_address(&self) -> SocketAddr {
        self.connection
            .as_ref()
            .expect("polled after completion")
            .remote_address()
    }
}

impl Future for Connecting {
    type Output = Result<Connection, ConnectionError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<Self::Output> {
        let connection = self.connection.as_ref().expect("polled after completion");
        let ready = connection.with_conn(|conn| {
            if conn.connected {
                return Poll::Ready(Ok(()));
            }
            if let Some(error) = &conn.error {
                return Poll::Ready(Err(error.clone()));
            }
            conn.connecting = Some(cx.waker().clone());
            Poll::Pending
        });
        ready.map(|ready| ready.map(|()| self.connection.take().expect("checked above")))
    }
}
