//! Streamed responses through both proxies (issue 17): server-sent events, each of which must
//! reach the client before the service writes the next, as real processes on loopback.

mod support;

use std::time::Duration;

use control::lookup::Limits;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

const DEADLINE: Duration = Duration::from_secs(30);
const EVENTS: usize = 100;

/// An event-stream service: answers its first request with a chunked `text/event-stream` and
/// writes event `i` only once `next` says the client has event `i - 1`.
async fn event_service(mut next: mpsc::Receiver<()>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // The sidecar's liveness checks connect and close: the first connection that sends a
        // request head gets the stream.
        let mut stream = loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            if read_request_head(&mut stream).await.is_some() {
                break stream;
            }
        };
        stream
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                  transfer-encoding: chunked\r\n\r\n",
            )
            .await
            .unwrap();
        for i in 0..EVENTS {
            let event = format!("data: event {i}\n\n");
            let chunk = format!("{:x}\r\n{event}\r\n", event.len());
            stream.write_all(chunk.as_bytes()).await.unwrap();
            if next.recv().await.is_none() {
                return;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
    });
    addr
}

/// Each event reaches the client while the service waits for it to arrive before writing the
/// next: a proxy that held an event back for more bytes would stall this exchange, and the
/// test would fail at its deadline.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_reaches_the_client_before_the_next_is_written() {
    let network = Network::start().await;
    network.register("events", Limits::default()).await;
    let (next, waiting) = mpsc::channel(1);
    let service = event_service(waiting).await.to_string();
    let _sidecar = start_proxy(
        &network,
        &["--quic-addr", "127.0.0.1:0", "0", "events", &service],
    )
    .await;
    let ingress = start_proxy(&network, &["0"]).await;
    // Found once it answers through the ingress (before, 503); the service answers once.
    let mut client = loop {
        let mut client = TcpStream::connect(&ingress.ingress).await.unwrap();
        client
            .write_all(b"GET /events/stream HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        client.read_exact(&mut first).await.unwrap();
        if &first == b"HTTP/1.1 200" {
            break client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    for i in 0..EVENTS {
        let event = format!("data: event {i}\n\n");
        let found = |received: &[u8]| {
            received
                .windows(event.len())
                .any(|window| window == event.as_bytes())
        };
        while !found(&received) {
            let read = tokio::time::timeout(DEADLINE, client.read(&mut buffer)).await;
            let n = read
                .unwrap_or_else(|_| panic!("event {i} was held back (written, never arrived)"))
                .unwrap();
            assert!(n > 0, "the stream ended before event {i}");
            received.extend_from_slice(&buffer[..n]);
        }
        next.send(()).await.unwrap();
    }
}
