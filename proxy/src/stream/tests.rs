use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http_body_util::Full;
use libp2p::identity::Keypair;

use super::*;
use crate::transport::Transport;

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
const SIZE: usize = 1 << 20;

#[tokio::test]
async fn small_chunks_are_gathered_and_every_byte_arrives_in_order() {
    // Through a path that carries 1500-byte datagrams quinn hands over chunks of about 1.2
    // KB; the receiver, reading once the body is (nearly) all there, gets them gathered.
    let server = Arc::new(Transport::bind(LOOPBACK, Keypair::generate_ed25519(), None).unwrap());
    let client = Transport::bind(LOOPBACK, Keypair::generate_ed25519(), None).unwrap();
    let relay = testkit::mtu_relay(server.local_addr().unwrap(), Arc::new(1500.into())).await;
    let serving = Arc::clone(&server);
    let received = tokio::spawn(async move {
        let (_, connection) = serving.accept().await.unwrap().unwrap();
        let (_send, mut recv) = connection.accept_bi().await.unwrap();
        let (head, rest) = read_head(&mut recv).await.unwrap();
        assert_eq!(head, &b"head"[..]);
        testkit::wait_until("the body to arrive", Duration::from_secs(20), || {
            std::future::ready(connection.stats().udp_rx.bytes >= SIZE as u64)
        })
        .await;
        let mut body = FramedBody::new(recv, rest);
        let (mut pieces, mut bytes) = (0, Vec::with_capacity(SIZE));
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            pieces += 1;
            bytes.extend_from_slice(&data);
        }
        (pieces, bytes)
    });
    let connection = client.connect(server.peer_id(), relay).await.unwrap();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    let sent: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let head = Bytes::from([&frame_header(Kind::Head, 4)[..], b"head"].concat());
    send_message(&mut send, head, Full::new(Bytes::from(sent.clone())))
        .await
        .unwrap();
    let (pieces, bytes) = received.await.unwrap();
    assert!(bytes == sent, "the body arrived changed");
    assert!(
        connection.stats().path.current_mtu <= 1500,
        "the relay let larger datagrams through"
    );
    // Some 870 chunks; gathered, a few dozen pieces (what arrives while it is read comes
    // as it comes).
    assert!(pieces <= 80, "{pieces} pieces for {SIZE} bytes");
}
