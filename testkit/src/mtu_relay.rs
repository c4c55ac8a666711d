//! A UDP relay between one client and a server that drops every datagram over a size limit,
//! as a path with a small MTU does (or a peer that says it takes more than it does); a limit
//! of 0 drops everything, as a frozen peer or a cut path does. The limit may change as it
//! runs.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

/// Starts the relay in front of `server` on loopback; returns its address. It runs until the
/// runtime ends.
pub async fn mtu_relay(server: SocketAddr, limit: Arc<AtomicUsize>) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("a loopback UDP socket");
    let addr = socket.local_addr().expect("a bound socket has an address");
    tokio::spawn(async move {
        let mut client = None;
        let mut buffer = vec![0u8; 65_536];
        while let Ok((len, from)) = socket.recv_from(&mut buffer).await {
            let to = if from == server {
                match client {
                    Some(client) => client,
                    None => continue,
                }
            } else {
                client = Some(from);
                server
            };
            if len <= limit.load(Ordering::Relaxed) {
                let _ = socket.send_to(&buffer[..len], to).await;
            }
        }
    });
    addr
}
