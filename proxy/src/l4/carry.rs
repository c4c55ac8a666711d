//! Carrying what a tunnel transports, one direction at a time, from a [`Source`] to a
//! [`Sink`]: TCP bytes, UDP datagrams, or the frames of a QUIC stream.
//!
//! # Rules
//! 1. **Units.** What a TCP socket gives is bytes, cut wherever a read ends ([`Unit::Bytes`]);
//!    what a UDP socket gives is one datagram, whole ([`Unit::Datagram`]). Between proxies
//!    bytes cross as `DATA` frames on the tunnel's stream (received in whatever pieces QUIC
//!    hands over) and datagrams whole, as QUIC datagrams or `DATAGRAM` frames (rule 6), so
//!    each side of every link knows which it got.
//! 2. **Into a socket.** Bytes and datagrams are written to a TCP socket as bytes; into a
//!    UDP socket each datagram is sent as one, and bytes as they were read (at most
//!    [`MAX_DATAGRAM_BYTES`] each), as the original did with its 65495-byte reads. A UDP send
//!    that fails (the service's port unreachable) drops that datagram and is counted; UDP
//!    promises no more.
//! 3. **Back-pressure.** One unit is in hand at a time: a direction reads only when its sink
//!    took the last unit (QUIC flow control, a TCP socket's buffer), so a slow reader slows the
//!    writer and memory stays at one read buffer per direction.
//! 4. **Ends.** A source's clean end (TCP FIN, QUIC FIN) is passed on as one ([`Sink::finish`]:
//!    TCP half-close, QUIC FIN). A broken source (TCP reset, QUIC reset) or sink aborts the
//!    sink ([`Sink::abort`]: QUIC reset, TCP reset by closing with a zero linger), so that a
//!    truncated transfer is never taken for a whole one at the far end. UDP has no end: a
//!    direction from UDP ends when its tunnel does (idle, or the other side finished).
//! 5. **No copies of bytes.** A read's bytes go out as the frame's payload (a 5-byte header
//!    written in front of them); received payloads are slices of QUIC's chunks. A datagram
//!    sent as a QUIC datagram is copied once, behind its 8-byte header.
//! 6. **Datagrams between proxies** go as QUIC datagrams where the path takes them
//!    ([`super::datagrams`]; a tunnel stream's [`DatagramPath`] and [`Registration`]), else
//!    on the stream.

use std::{io, net::SocketAddr, sync::Arc};

use bytes::{Bytes, BytesMut};
use prometheus::IntCounter;
use quinn::SendDatagramError;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        UdpSocket,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;

use super::datagrams::{self, DatagramRouter, HEADER_BYTES, Registration};
use crate::transport::{Connection, RecvStream, SendStream};
use crate::{
    framing::{Decoder, Kind, MAX_DATAGRAM_BYTES, Piece, frame_header},
    stream::{StreamError, next_piece},
};

/// Bytes asked of a TCP socket per read (and the most a `DATA` frame of a tunnel carries).
pub const READ_BYTES: usize = 64 * 1024;
/// Application error code of a tunnel stream reset because its other end broke.
pub const RESET_TUNNEL: u32 = 2;

/// What crosses: see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// Bytes of a byte stream, cut wherever a read ended.
    Bytes(Bytes),
    /// One UDP datagram, whole.
    Datagram(Bytes),
}

impl Unit {
    /// Its length, in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Bytes(b) | Self::Datagram(b) => b.len(),
        }
    }

    /// Whether it holds no bytes (as an empty UDP datagram does).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why one direction of a tunnel broke.
#[derive(Debug, thiserror::Error)]
pub enum CarryError {
    /// The source's socket failed to read (a TCP reset, ...).
    #[error("reading: {0}")]
    Read(io::Error),
    /// The sink's socket failed to write, or the sink was aborted already.
    #[error("writing: {0}")]
    Write(io::Error),
    /// The tunnel's QUIC stream failed: reset, connection lost, or a malformed or unexpected
    /// frame.
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// Where one direction of a tunnel reads.
pub enum Source {
    /// A TCP connection's read half (a client's at the l4-proxy, or a hop's service).
    Tcp(OwnedReadHalf),
    /// A UDP socket connected to one peer (a hop's service).
    Udp(Arc<UdpSocket>),
    /// The datagrams of one client, handed over by the listener's socket reader.
    Datagrams(mpsc::Receiver<Bytes>),
    /// A tunnel's stream, and the QUIC datagrams that arrive for it if registered.
    Stream(RecvStream, Decoder, Option<Registration>),
}

impl Source {
    /// The next unit, `None` at a clean end. `buffer` is this direction's read buffer.
    pub async fn next(&mut self, buffer: &mut BytesMut) -> Result<Option<Unit>, CarryError> {
        match self {
            Self::Tcp(read) => {
                buffer.reserve(READ_BYTES);
                let n = read.read_buf(buffer).await.map_err(CarryError::Read)?;
                Ok((n > 0).then(|| Unit::Bytes(buffer.split().freeze())))
            }
            Self::Udp(socket) => loop {
                buffer.reserve(MAX_DATAGRAM_BYTES);
                match socket.recv_buf(buffer).await {
                    Ok(_) => return Ok(Some(Unit::Datagram(buffer.split().freeze()))),
                    // An ICMP port unreachable for an earlier send: nothing to read here.
                    Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(error) => return Err(CarryError::Read(error)),
                }
            },
            Self::Datagrams(receiver) => Ok(receiver.recv().await.map(Unit::Datagram)),
            Self::Stream(recv, decoder, registration) => {
                let piece = match registration {
                    Some(registration) => tokio::select! {
                        Some(datagram) = registration.datagrams.recv() => {
                            return Ok(Some(Unit::Datagram(datagram)));
                        }
                        piece = next_piece(recv, decoder) => piece?,
                    },
                    None => next_piece(recv, decoder).await?,
                };
                match piece {
                    None => Ok(None),
                    Some(Piece::Data(data)) => Ok(Some(Unit::Bytes(data))),
                    Some(Piece::Frame(frame)) if frame.kind == Kind::Datagram => {
                        Ok(Some(Unit::Datagram(frame.payload)))
                    }
                    Some(Piece::Frame(frame)) => Err(StreamError::Unexpected(frame.kind).into()),
                }
            }
        }
    }
}

/// Where one direction of a tunnel writes.
pub enum Sink {
    /// A TCP connection's write half (a client's at the l4-proxy, or a hop's service).
    Tcp(OwnedWriteHalf),
    /// A UDP socket connected to one peer (a hop's service).
    Udp(Arc<UdpSocket>),
    /// The listener's UDP socket, to one client.
    UdpTo(Arc<UdpSocket>, SocketAddr),
    /// A tunnel's stream, and where its datagrams may go as QUIC datagrams.
    Stream(SendStream, Option<DatagramPath>),
    /// A TCP sink after [`Sink::abort`]: its socket is reset when the read half goes.
    Aborted,
}

/// The two ends of a tunnel's stream on `connection`: the sink it is written to and the
/// source it is read from (`rest` holding what arrived after its opening), with its QUIC
/// datagrams registered with `router` before anything is sent (and those dropped for a full
/// queue counted in `dropped`).
pub fn stream_ends(
    router: &Arc<DatagramRouter>,
    connection: &Connection,
    send: SendStream,
    recv: RecvStream,
    rest: Decoder,
    dropped: IntCounter,
) -> (Sink, Source) {
    let registration = router.register(connection, send.id().into(), dropped);
    let path = DatagramPath::of(connection, &send);
    (
        Sink::Stream(send, Some(path)),
        Source::Stream(recv, rest, Some(registration)),
    )
}

/// What became of a unit put into a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Written: to a socket, or as a frame on the tunnel's stream.
    Sent,
    /// Sent as a QUIC datagram (a tunnel's datagram that the path takes).
    AsQuicDatagram,
    /// A datagram a socket refused.
    Dropped,
}

/// Where a tunnel stream's datagrams go as QUIC datagrams: its connection, and the stream's
/// ID that names the tunnel in each.
pub struct DatagramPath {
    /// The QUIC connection the tunnel's stream is on.
    pub connection: Connection,
    /// The stream's ID, which opens every QUIC datagram of the tunnel.
    pub stream: u64,
}

impl DatagramPath {
    /// The path of the tunnel on `send`, over `connection`.
    pub fn of(connection: &Connection, send: &SendStream) -> Self {
        Self {
            connection: connection.clone(),
            stream: send.id().into(),
        }
    }

    /// Sends `datagram` as a QUIC datagram, waiting for room; `Ok(false)` if it must go on
    /// the stream instead (too large for the path, or the peer takes none).
    async fn send(&self, datagram: &Bytes) -> Result<bool, CarryError> {
        let fits = self
            .connection
            .max_datagram_size()
            .is_some_and(|max| HEADER_BYTES + datagram.len() <= max);
        if !fits {
            return Ok(false);
        }
        let sent = self
            .connection
            .send_datagram_wait(datagrams::join(self.stream, datagram))
            .await;
        match sent {
            Ok(()) => Ok(true),
            Err(SendDatagramError::ConnectionLost(error)) => {
                Err(CarryError::Stream(StreamError::Quic(error.to_string())))
            }
            // Too large after all (the path shrank), or not taken: the stream carries it.
            Err(_) => Ok(false),
        }
    }
}

impl Sink {
    /// Writes one unit.
    pub async fn put(&mut self, unit: Unit) -> Result<Put, CarryError> {
        let sent_or_dropped = |sent| if sent { Put::Sent } else { Put::Dropped };
        match self {
            Self::Tcp(write) => {
                let (Unit::Bytes(bytes) | Unit::Datagram(bytes)) = unit;
                write.write_all(&bytes).await.map_err(CarryError::Write)?;
                Ok(Put::Sent)
            }
            Self::Udp(socket) => Ok(sent_or_dropped(send_datagrams(unit, socket, None).await)),
            Self::UdpTo(socket, to) => Ok(sent_or_dropped(
                send_datagrams(unit, socket, Some(*to)).await,
            )),
            Self::Stream(send, path) => {
                let (kind, payload) = match unit {
                    Unit::Bytes(bytes) => (Kind::Data, bytes),
                    Unit::Datagram(datagram) => {
                        if let Some(path) = path
                            && path.send(&datagram).await?
                        {
                            return Ok(Put::AsQuicDatagram);
                        }
                        (Kind::Datagram, datagram)
                    }
                };
                let header = Bytes::copy_from_slice(&frame_header(kind, payload.len()));
                send.write_all_chunks(&mut [header, payload])
                    .await
                    .map_err(|e| CarryError::Stream(StreamError::Quic(e.to_string())))?;
                Ok(Put::Sent)
            }
            Self::Aborted => Err(CarryError::Write(io::ErrorKind::BrokenPipe.into())),
        }
    }

    /// Passes on a clean end: TCP half-close, QUIC FIN; nothing for UDP.
    pub async fn finish(&mut self) {
        match self {
            Self::Tcp(write) => {
                let _ = write.shutdown().await;
            }
            Self::Stream(send, _) => {
                let _ = send.finish();
            }
            Self::Udp(_) | Self::UdpTo(..) | Self::Aborted => {}
        }
    }

    /// Passes on a break: a QUIC reset, or a TCP reset once the socket is closed (its read
    /// half dropped). A dropped TCP write half would send a FIN first, which the peer would
    /// read as a clean end, so it is forgotten instead.
    pub fn abort(&mut self) {
        match self {
            Self::Tcp(_) => {
                let Self::Tcp(write) = std::mem::replace(self, Self::Aborted) else {
                    unreachable!("matched as TCP");
                };
                #[allow(deprecated)] // set_linger(0) is meant here: it makes close send a reset
                let _ = write.as_ref().set_linger(Some(std::time::Duration::ZERO));
                write.forget();
            }
            Self::Stream(send, _) => {
                let _ = send.reset(RESET_TUNNEL.into());
            }
            Self::Udp(_) | Self::UdpTo(..) | Self::Aborted => {}
        }
    }
}

/// Sends `unit` on `socket` (to `to`, or where it is connected) as datagrams, bytes cut at
/// the largest datagram; whether all went.
async fn send_datagrams(unit: Unit, socket: &UdpSocket, to: Option<SocketAddr>) -> bool {
    let (Unit::Bytes(bytes) | Unit::Datagram(bytes)) = unit;
    let mut all = true;
    for piece in bytes.chunks(MAX_DATAGRAM_BYTES) {
        let sent = match to {
            Some(to) => socket.send_to(piece, to).await,
            None => socket.send(piece).await,
        };
        if let Err(error) = sent {
            tracing::debug!(%error, "datagram dropped");
            all = false;
        }
    }
    all
}

/// Counters of one direction: bytes carried, datagrams that could not be sent, datagrams
/// sent as QUIC datagrams.
#[derive(Debug, Clone)]
pub struct Counts {
    /// Bytes of the units put into the sink (`l4_bytes_total`).
    pub bytes: IntCounter,
    /// Units a UDP socket refused, each counted once even when cut into several datagrams
    /// (`l4_datagrams_dropped_total`, reason `send_failed`).
    pub dropped: IntCounter,
    /// Datagrams sent to the other proxy as QUIC datagrams (`l4_quic_datagrams_total`).
    pub quic_datagrams: IntCounter,
}

/// Carries units from `source` to `sink` until the source ends (passed on) or either breaks
/// (the sink aborted); each unit counted in `counts`, and `touched` called after each.
pub async fn carry(
    source: &mut Source,
    sink: &mut Sink,
    counts: &Counts,
    mut touched: impl FnMut(),
) -> Result<(), CarryError> {
    let mut buffer = BytesMut::new();
    loop {
        let unit = match source.next(&mut buffer).await {
            Ok(Some(unit)) => unit,
            Ok(None) => {
                sink.finish().await;
                return Ok(());
            }
            Err(error) => {
                sink.abort();
                return Err(error);
            }
        };
        let len = unit.len() as u64;
        match sink.put(unit).await {
            Ok(Put::Sent) => counts.bytes.inc_by(len),
            Ok(Put::AsQuicDatagram) => {
                counts.bytes.inc_by(len);
                counts.quic_datagrams.inc();
            }
            Ok(Put::Dropped) => counts.dropped.inc(),
            Err(error) => {
                sink.abort();
                return Err(error);
            }
        }
        touched();
    }
}

/// One direction of a tunnel, torn down with the others: [`carry`] until the source ends or
/// `broken` is cancelled (then the sink is aborted; a failure here cancels it for the
/// others), or until `stop` is cancelled (then the sink is finished: how a direction from
/// UDP, which has no end of its own, ends with its tunnel).
pub async fn direction(
    source: &mut Source,
    sink: &mut Sink,
    counts: &Counts,
    touched: impl FnMut(),
    stop: &CancellationToken,
    broken: &CancellationToken,
) -> Result<(), CarryError> {
    let result = tokio::select! {
        result = carry(source, sink, counts, touched) => result,
        () = broken.cancelled() => {
            sink.abort();
            return Ok(());
        }
        () = stop.cancelled() => {
            sink.finish().await;
            return Ok(());
        }
    };
    if result.is_err() {
        broken.cancel();
    }
    result
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair: ours (split) and the peer's.
    async fn pair() -> ((OwnedReadHalf, OwnedWriteHalf), TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        (ours.into_split(), peer)
    }

    #[tokio::test]
    async fn an_aborted_tcp_sink_resets_its_connection_and_a_finished_one_ends_it() {
        let ((read, write), mut peer) = pair().await;
        let mut sink = Sink::Tcp(write);
        sink.abort();
        drop(read);
        let mut buffer = [0; 8];
        let error = peer.read(&mut buffer).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);

        let ((read, write), mut peer) = pair().await;
        let mut sink = Sink::Tcp(write);
        sink.finish().await;
        assert_eq!(peer.read(&mut buffer).await.unwrap(), 0);
        drop(read);
    }
}
