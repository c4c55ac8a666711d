use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
};

use super::*;

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

fn transport(key: Option<[u8; 32]>) -> Arc<Transport> {
    Arc::new(Transport::bind(LOOPBACK, Keypair::generate_ed25519(), key).unwrap())
}

/// Serves echo on every authenticated connection; reports each accept's outcome.
fn serve_echo(
    server: Arc<Transport>,
) -> tokio::sync::mpsc::UnboundedReceiver<Result<PeerId, String>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(accepted) = server.accept().await {
            match accepted {
                Ok((peer, connection)) => {
                    let _ = tx.send(Ok(peer));
                    tokio::spawn(async move {
                        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                            let data = recv.read_to_end(1 << 20).await.unwrap();
                            send.write_all(&data).await.unwrap();
                            send.finish().unwrap();
                        }
                    });
                }
                Err(error) => {
                    let _ = tx.send(Err(error.to_string()));
                }
            }
        }
    });
    rx
}

async fn echo(connection: &Connection, data: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(data).await.unwrap();
    send.finish().unwrap();
    recv.read_to_end(1 << 20).await.unwrap()
}

#[tokio::test]
async fn peers_authenticate_each_other_and_share_one_connection() {
    let key = Some([9; 32]);
    let (server, client) = (transport(key), transport(key));
    let mut accepted = serve_echo(Arc::clone(&server));
    let addr = server.local_addr().unwrap();
    let connection = client.connect(server.peer_id(), addr).await.unwrap();
    assert_eq!(accepted.recv().await.unwrap(), Ok(client.peer_id()));
    assert_eq!(echo(&connection, b"hello").await, b"hello");
    // Every further request, concurrent or not, reuses the connection.
    let again =
        futures::future::join_all((0..8).map(|_| client.connect(server.peer_id(), addr))).await;
    for other in again {
        assert_eq!(other.unwrap().stable_id(), connection.stable_id());
    }
}

#[tokio::test]
async fn dials_leave_nothing_behind_whether_they_succeed_or_fail() {
    let (server, client) = (transport(None), transport(None));
    let _accepted = serve_echo(Arc::clone(&server));
    let addr = server.local_addr().unwrap();
    let shared =
        futures::future::join_all((0..8).map(|_| client.connect(server.peer_id(), addr))).await;
    assert!(shared.iter().all(Result::is_ok));
    // One that fails: the wrong peer at that address.
    let someone_else = Keypair::generate_ed25519().public().to_peer_id();
    assert!(client.connect(someone_else, addr).await.is_err());
    assert!(client.connecting.lock().await.is_empty());
}

#[tokio::test]
async fn the_wrong_peer_is_refused() {
    let (server, client) = (transport(None), transport(None));
    let _accepted = serve_echo(Arc::clone(&server));
    let someone_else = Keypair::generate_ed25519().public().to_peer_id();
    let error = client
        .connect(someone_else, server.local_addr().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            TransportError::Auth {
                source: AuthError::WrongPeer { .. },
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn outside_the_network_nothing_is_served() {
    for (server_key, client_key) in [
        (Some([1; 32]), Some([2; 32])),
        (Some([1; 32]), None),
        (None, Some([2; 32])),
    ] {
        let (server, client) = (transport(server_key), transport(client_key));
        let mut accepted = serve_echo(Arc::clone(&server));
        let result = client
            .connect(server.peer_id(), server.local_addr().unwrap())
            .await;
        assert!(result.is_err(), "{server_key:?} vs {client_key:?}");
        let outcome = accepted.recv().await.unwrap();
        assert!(
            outcome.is_err(),
            "the server served an outsider: {outcome:?}"
        );
    }
}

#[tokio::test]
async fn a_peer_that_stalls_its_handshake_holds_up_no_other() {
    let (server, client) = (transport(None), transport(None));
    let mut accepted = serve_echo(Arc::clone(&server));
    let addr = server.local_addr().unwrap();
    // A peer that completes the QUIC handshake and then says nothing: its proof never comes
    // (a frozen proxy, or a slow one). Its connection is kept open meanwhile.
    let stalled = Transport::bind(LOOPBACK, Keypair::generate_ed25519(), None).unwrap();
    let _silent = stalled
        .endpoint
        .connect(addr, tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    // Another peer is served at once, not after the stalled one's proof times out.
    let connection = tokio::time::timeout(AUTH_TIMEOUT / 2, client.connect(server.peer_id(), addr))
        .await
        .expect("connected while the other handshake stalls")
        .unwrap();
    assert_eq!(echo(&connection, b"hello").await, b"hello");
    assert_eq!(accepted.recv().await.unwrap(), Ok(client.peer_id()));
}

#[tokio::test]
async fn on_loopback_datagrams_grow_far_past_ethernets_and_stay_large_under_streaming() {
    let (server, client) = (transport(None), transport(None));
    let _accepted = serve_echo(Arc::clone(&server));
    let connection = client
        .connect(server.peer_id(), server.local_addr().unwrap())
        .await
        .unwrap();
    let data = vec![7u8; 256 * 1024];
    testkit::wait_until(
        "path MTU discovery to pass 16 KB",
        std::time::Duration::from_secs(10),
        || async {
            assert_eq!(echo(&connection, &data).await.len(), data.len());
            connection.stats().path.current_mtu > 16_000
        },
    )
    .await;
    // Full batches of large datagrams must not be lost (a lost batch looks like a black hole
    // to MTU discovery, which then falls back to 1200 bytes).
    for _ in 0..8 {
        assert_eq!(echo(&connection, &data).await.len(), data.len());
    }
    let mtu = connection.stats().path.current_mtu;
    assert!(mtu > 16_000, "the path fell back to {mtu}-byte datagrams");
}

#[tokio::test]
async fn a_path_that_drops_large_datagrams_settles_below_them_and_keeps_working() {
    const LIMIT: usize = 1500;
    let (server, client) = (transport(None), transport(None));
    let _accepted = serve_echo(Arc::clone(&server));
    let relay = testkit::mtu_relay(server.local_addr().unwrap(), Arc::new(LIMIT.into())).await;
    let connection = client.connect(server.peer_id(), relay).await.unwrap();
    let data = vec![7u8; 256 * 1024];
    for _ in 0..20 {
        assert_eq!(echo(&connection, &data).await.len(), data.len());
    }
    let mtu = usize::from(connection.stats().path.current_mtu);
    assert!(
        (1200..=LIMIT).contains(&mtu),
        "datagrams of {mtu} bytes on a path that carries {LIMIT}"
    );
}

#[tokio::test]
async fn a_connection_is_silent_only_when_its_peer_acknowledges_nothing() {
    let (server, client) = (transport(None), transport(None));
    let _accepted = serve_echo(Arc::clone(&server));
    let limit = Arc::new(AtomicUsize::new(usize::MAX));
    let relay = testkit::mtu_relay(server.local_addr().unwrap(), Arc::clone(&limit)).await;
    let connection = client.connect(server.peer_id(), relay).await.unwrap();
    assert_eq!(echo(&connection, b"hello").await, b"hello");
    // Idle, with nothing under way (nothing heard for 300 ms: keep-alives are 1 s apart), the
    // check's own datagram gets an acknowledgement. Three times, so that a keep-alive falling
    // into the check cannot pass for its answer.
    for _ in 0..3 {
        let mut heard = (
            connection.stats().udp_rx.datagrams,
            std::time::Instant::now(),
        );
        testkit::wait_until("a quiet connection", Duration::from_secs(10), || {
            let now = connection.stats().udp_rx.datagrams;
            if now != heard.0 {
                heard = (now, std::time::Instant::now());
            }
            std::future::ready(heard.1.elapsed() > Duration::from_millis(300))
        })
        .await;
        assert_eq!(
            client.check_silence(&server.peer_id()).await,
            Silence::Heard
        );
    }
    // The path goes dark, as when the peer freezes.
    limit.store(0, Ordering::Relaxed);
    assert_eq!(
        client.check_silence(&server.peer_id()).await,
        Silence::Silent
    );
    // No connection (a peer never dialled, or one being dialled): nothing to judge.
    assert_eq!(
        client.check_silence(&client.peer_id()).await,
        Silence::Unconnected
    );
}
