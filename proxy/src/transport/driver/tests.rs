//! The driver against itself and against quinn, on loopback UDP sockets, with the data
//! plane's own TLS and transport configuration.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use quinn::{AsyncUdpSocket, ConnectionError, VarInt};

use super::{Connection, Endpoint, RecvStream, SendStream};
use crate::transport::{STREAM_WINDOW, endpoint_config, quic_configs, tls, udp};

const DEADLINE: Duration = Duration::from_secs(20);

fn server_config() -> quinn::ServerConfig {
    quic_configs().unwrap().0
}

fn client_config() -> quinn::ClientConfig {
    quic_configs().unwrap().1
}

fn socket() -> Arc<udp::Socket> {
    udp::Socket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap()
}

/// One of ours, serving or not, on `socket`.
fn ours_on(socket: Arc<dyn AsyncUdpSocket>, serve: bool) -> Endpoint {
    let server = serve.then(server_config);
    Endpoint::new(endpoint_config(), server, client_config(), socket)
}

fn ours(serve: bool) -> Endpoint {
    ours_on(socket(), serve)
}

/// A quinn endpoint, serving.
fn theirs() -> quinn::Endpoint {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut endpoint = quinn::Endpoint::new(
        endpoint_config(),
        Some(server_config()),
        socket,
        quinn::default_runtime().unwrap(),
    )
    .unwrap();
    endpoint.set_default_client_config(client_config());
    endpoint
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} within {DEADLINE:?}"))
}

/// A connected pair of ours: (client side, server side).
async fn pair(client: &Endpoint, server: &Endpoint) -> (Connection, Connection) {
    let addr = server.local_addr().unwrap();
    let dialled = client.connect(addr, tls::SERVER_NAME).unwrap();
    let (dialled, accepted) = within("a handshake", async {
        tokio::join!(dialled, async { server.accept().await.unwrap().await })
    })
    .await;
    (dialled.unwrap(), accepted.unwrap())
}

/// Echoes every stream the peer opens on `connection` until it closes.
async fn echo(connection: Connection) {
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        tokio::spawn(async move {
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.unwrap() {
                send.write_chunk(chunk.bytes).await.unwrap();
            }
            send.finish().unwrap();
        });
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Sends `data` on a new stream of ours and reads the echo back.
async fn round_trip(connection: &Connection, data: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let write = async {
        send.write_all(data).await.unwrap();
        send.finish().unwrap();
    };
    let (_, echoed) = tokio::join!(write, recv.read_to_end(usize::MAX));
    echoed.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_echo_one_and_many_at_once() {
    let (client, server) = (ours(false), ours(true));
    let (dialled, accepted) = pair(&client, &server).await;
    tokio::spawn(echo(accepted));
    let one = pattern(1 << 20, 1);
    assert!(within("one echo", round_trip(&dialled, &one)).await == one);
    let many = (0..64u8).map(|i| {
        let dialled = dialled.clone();
        tokio::spawn(async move {
            let data = pattern(20_000 + 997 * i as usize, i);
            assert!(round_trip(&dialled, &data).await == data, "stream {i}");
        })
    });
    within("64 echoes", futures::future::try_join_all(many))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ours_and_quinn_talk_both_ways() {
    // Our client, quinn's server.
    let quinn_server = theirs();
    let ours_client = ours(false);
    let accept = async {
        let connection = quinn_server.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = connection.accept_bi().await.unwrap();
        let data = recv.read_to_end(usize::MAX).await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        connection.closed().await
    };
    let dial = async {
        let connection = ours_client
            .connect(quinn_server.local_addr().unwrap(), tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let data = pattern(300_000, 7);
        assert!(round_trip(&connection, &data).await == data);
        connection.close(VarInt::from_u32(3), b"done");
    };
    let (closed, ()) = within("our client and quinn's server", async {
        tokio::join!(accept, dial)
    })
    .await;
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(close) if close.error_code == VarInt::from_u32(3)),
        "{closed:?}"
    );

    // quinn's client, our server.
    let ours_server = ours(true);
    let quinn_client = theirs();
    let accepted = async {
        let connection = ours_server.accept().await.unwrap().await.unwrap();
        echo(connection).await;
    };
    let dial = async {
        let connection = quinn_client
            .connect(ours_server.local_addr().unwrap(), tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        let data = pattern(300_000, 9);
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        assert!(recv.read_to_end(usize::MAX).await.unwrap() == data);
        connection.close(0u32.into(), b"");
    };
    within("quinn's client and our server", async {
        tokio::select! {
            () = accepted => {}
            () = dial => {}
        }
    })
    .await;
}

/// Writes to `send` until `reader` has received at least a stream window, and checks that
/// the writer took no more than the window the reader grants; then lets the reader read
/// everything.
async fn a_slow_reader_stops_the_writer(
    mut send: SendStream,
    mut recv: RecvStream,
    receiver: Connection,
) {
    const TOTAL: usize = 4 * STREAM_WINDOW as usize;
    let before = receiver.stats().udp_rx.bytes;
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let written = Arc::clone(&written);
        async move {
            let chunk = Bytes::from(vec![5; 64 << 10]);
            while written.load(Ordering::Relaxed) < TOTAL {
                send.write_chunk(chunk.clone()).await.unwrap();
                written.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            send.finish().unwrap();
        }
    });
    // The receiver's connection has taken in a window's worth: whatever the writer had
    // taken beyond it would be under way by now.
    within("a window received", async {
        while receiver.stats().udp_rx.bytes - before < u64::from(STREAM_WINDOW) {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let taken = written.load(Ordering::Relaxed);
    assert!(
        taken <= STREAM_WINDOW as usize,
        "the writer took {taken} bytes with a window of {STREAM_WINDOW} unread"
    );
    assert!(!writer.is_finished());
    let read = within("everything read", recv.read_to_end(usize::MAX))
        .await
        .unwrap();
    assert_eq!(read.len(), TOTAL);
    within("the writer done", writer).await.unwrap();
}

/// A stream `opener` opens and its peer `peer` has accepted (one byte crossed): the
/// opener's sending half, the peer's receiving half, and the opener's receiving half, of no
/// use here but kept open (a dropped one would stop the peer's sending half).
async fn stream_between(
    opener: &Connection,
    peer: &Connection,
) -> (SendStream, RecvStream, RecvStream) {
    let (mut send, recv) = opener.open_bi().await.unwrap();
    // The peer sees a stream once something is sent on it.
    send.write_all(b"x").await.unwrap();
    let (_, mut accepted) = within("the stream", peer.accept_bi()).await.unwrap();
    let mut byte = [0];
    accepted.read_exact(&mut byte).await.unwrap();
    (send, accepted, recv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_on_either_side_holds_the_writer_to_its_window() {
    let (client, server) = (ours(false), ours(true));
    let (dialled, accepted) = pair(&client, &server).await;
    let (send, recv, _unused) = stream_between(&dialled, &accepted).await;
    a_slow_reader_stops_the_writer(send, recv, accepted.clone()).await;
    let (send, recv, _unused) = stream_between(&accepted, &dialled).await;
    a_slow_reader_stops_the_writer(send, recv, dialled.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_reports_the_peers_stop_and_the_end_of_a_finished_stream() {
    let (client, server) = (ours(false), ours(true));
    let (dialled, accepted) = pair(&client, &server).await;
    let peer = tokio::spawn(async move {
        // The first stream is stopped with 7 after its first bytes; the second read whole.
        let (_send, mut recv) = accepted.accept_bi().await.unwrap();
        let mut byte = [0];
        recv.read_exact(&mut byte).await.unwrap();
        recv.stop(VarInt::from_u32(7)).unwrap();
        let (_send, mut recv) = accepted.accept_bi().await.unwrap();
        recv.read_to_end(usize::MAX).await.unwrap();
        accepted
    });
    let (mut send, _recv) = dialled.open_bi().await.unwrap();
    send.write_all(b"a").await.unwrap();
    let stopped = within("the stop", send.stopped()).await.unwrap();
    assert_eq!(stopped, Some(VarInt::from_u32(7)));
    let writing = within("a write after the stop", send.write_all(b"more")).await;
    assert!(
        matches!(writing, Err(quinn::WriteError::Stopped(code)) if code == VarInt::from_u32(7)),
        "{writing:?}"
    );
    let (mut send, _recv) = dialled.open_bi().await.unwrap();
    send.write_all(&pattern(100_000, 3)).await.unwrap();
    send.finish().unwrap();
    assert_eq!(within("the end", send.stopped()).await.unwrap(), None);
    drop(within("the peer", peer).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_closes_the_connection_with_code_zero() {
    let (client, server) = (ours(false), ours(true));
    let (dialled, accepted) = pair(&client, &server).await;
    let (send, recv) = dialled.open_bi().await.unwrap();
    drop(dialled);
    // The streams still hold the connection open.
    assert!(accepted.close_reason().is_none());
    drop((send, recv));
    // The peer hears of it at once: the CONNECTION_CLOSE with code 0, or, when quinn-proto
    // holds that back behind congestion control (path MTU probes of 60 KB fill the initial
    // window) until the closing side drains, the stateless reset the closed side then
    // answers with. Not the idle timeout.
    let closed = within("the close", accepted.closed()).await;
    assert!(
        matches!(&closed, ConnectionError::ApplicationClosed(close) if close.error_code == VarInt::from_u32(0))
            || closed == ConnectionError::Reset,
        "{closed:?}"
    );
    within("every connection drained", async {
        client.wait_idle().await;
        drop(accepted);
        server.wait_idle().await;
    })
    .await;
    // With the endpoints gone too, the drivers end and free everything.
    let states = [client.state_weak(), server.state_weak()];
    drop((client, server));
    within("the drivers' end", async {
        while states.iter().any(|state| state.strong_count() > 0) {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_cross_both_ways() {
    let (client, server) = (ours(false), ours(true));
    let (dialled, accepted) = pair(&client, &server).await;
    let max = dialled.max_datagram_size().expect("datagrams are on");
    assert!(max >= 1000, "{max}");
    dialled.send_datagram(Bytes::from_static(b"ping")).unwrap();
    assert_eq!(
        within("a datagram", accepted.read_datagram())
            .await
            .unwrap(),
        Bytes::from_static(b"ping")
    );
    accepted
        .send_datagram_wait(Bytes::from_static(b"pong"))
        .await
        .unwrap();
    assert_eq!(
        within("the answer", dialled.read_datagram()).await.unwrap(),
        Bytes::from_static(b"pong")
    );
    // Larger than any UDP payload, whatever the path MTU has grown to.
    let too_big = dialled.send_datagram(Bytes::from(vec![0; 1 << 16]));
    assert!(
        matches!(too_big, Err(quinn::SendDatagramError::TooLarge)),
        "{too_big:?}"
    );
}

/// A test double of the socket that loses every fifth datagram it is given to send and holds
/// every seventh back until after the next: the kernel's loopback neither loses nor reorders
/// packets, and making it (netem) needs privileges and namespaces these tests do not have.
#[derive(Debug)]
struct Lossy {
    socket: Arc<udp::Socket>,
    sends: AtomicUsize,
    /// A datagram held back: its destination and bytes.
    held: std::sync::Mutex<Option<(std::net::SocketAddr, Vec<u8>)>>,
}

impl Lossy {
    fn wrap(socket: Arc<udp::Socket>) -> Arc<dyn AsyncUdpSocket> {
        Arc::new(Self {
            socket,
            sends: AtomicUsize::new(0),
            held: std::sync::Mutex::default(),
        })
    }
}

impl AsyncUdpSocket for Lossy {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        Arc::clone(&self.socket).create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        let send = self.sends.fetch_add(1, Ordering::Relaxed);
        if send % 5 == 4 {
            return Ok(());
        }
        let mut held = self.held.lock().unwrap();
        if send % 7 == 6 && held.is_none() {
            *held = Some((transmit.destination, transmit.contents.to_vec()));
            return Ok(());
        }
        self.socket.try_send(transmit)?;
        if let Some((destination, contents)) = held.take() {
            // Lost if the socket is full, as a late datagram may be.
            let _ = self.socket.try_send(&quinn::udp::Transmit {
                destination,
                ecn: None,
                contents: &contents,
                segment_size: None,
                src_ip: None,
            });
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.socket.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.socket.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        // One datagram per send, so that the losses fall on single datagrams.
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.socket.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.socket.may_fragment()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_arrive_whole_over_a_socket_that_loses_and_reorders_what_it_sends() {
    let client = ours_on(Lossy::wrap(socket()), false);
    let server = ours_on(Lossy::wrap(socket()), true);
    let (dialled, accepted) = pair(&client, &server).await;
    tokio::spawn(echo(accepted));
    let data = pattern(2 << 20, 11);
    assert!(within("an echo through losses", round_trip(&dialled, &data)).await == data);
    let lost = dialled.stats().path.lost_packets;
    assert!(lost > 0, "nothing was lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_into_a_buffer_end_at_the_streams_end_without_an_error() {
    let (client, server) = (ours(false), ours(true));
    let (dialled, accepted) = pair(&client, &server).await;
    for _ in 0..2 {
        let (mut send, _recv) = dialled.open_bi().await.unwrap();
        send.write_all(b"0123456789").await.unwrap();
        send.finish().unwrap();
    }
    // The bytes and the end arrive together: a read takes both, the next says "the end".
    let (_send, mut recv) = within("a stream", accepted.accept_bi()).await.unwrap();
    let mut read = Vec::new();
    let mut buf = [0; 100];
    while let Some(n) = within("a read", recv.read(&mut buf)).await.unwrap() {
        read.extend_from_slice(&buf[..n]);
    }
    assert_eq!(read, b"0123456789");
    let (_send, mut recv) = within("a stream", accepted.accept_bi()).await.unwrap();
    let short = within("a read", recv.read_exact(&mut buf)).await;
    assert!(
        matches!(short, Err(quinn::ReadExactError::FinishedEarly(10))),
        "{short:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drivers_end_when_the_endpoints_go_before_their_connections() {
    let (client, server) = (ours(false), ours(true));
    let (dialled, accepted) = pair(&client, &server).await;
    let states = [client.state_weak(), server.state_weak()];
    drop(dialled);
    within("the close", accepted.closed()).await;
    within("both sides drained", async {
        client.wait_idle().await;
        server.wait_idle().await;
    })
    .await;
    // The endpoints go first; the last handle, to a connection long drained, after them.
    drop((client, server));
    drop(accepted);
    within("the drivers' end", async {
        while states.iter().any(|state| state.strong_count() > 0) {
            tokio::task::yield_now().await;
        }
    })
    .await;
}
