use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
};

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use libp2p::identity::Keypair;

use super::*;
use crate::{
    framing::{ResponseHead, decode_request_head, encode_response_head},
    sidecar::Sidecar,
    transport::Transport,
};

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// A service that answers 201 with the request's method and target in headers and its body
/// echoed back, streamed.
async fn echo_service() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let method = request.method().to_string();
                    let target = request
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    let response = Response::builder()
                        .status(StatusCode::CREATED)
                        .header("x-method", method)
                        .header("x-target", target)
                        .body(request.into_body())
                        .unwrap();
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A sidecar for `upstream` behind a QUIC transport; returns a client transport and its
/// connection to the sidecar (the transport must live as long as the connection is used).
async fn sidecar_connection(upstream: SocketAddr) -> (Transport, Connection) {
    let server = Arc::new(Transport::bind(LOOPBACK, Keypair::generate_ed25519(), None).unwrap());
    let sidecar = Sidecar::new(upstream, crate::metrics::Activity::new());
    let serving = Arc::clone(&server);
    tokio::spawn(async move {
        while let Some(Ok((_, connection))) = serving.accept().await {
            tokio::spawn(Arc::clone(&sidecar).serve_connection(connection));
        }
    });
    let client = Transport::bind(LOOPBACK, Keypair::generate_ed25519(), None).unwrap();
    let connection = client
        .connect(server.peer_id(), server.local_addr().unwrap())
        .await
        .unwrap();
    (client, connection)
}

fn head(method: Method, target: &str) -> RequestHead {
    let mut headers = HeaderMap::new();
    headers.insert("x-custom", HeaderValue::from_static("kept"));
    RequestHead {
        method,
        target: target.into(),
        headers,
    }
}

#[tokio::test]
async fn a_streamed_request_reaches_the_service_and_the_answer_streams_back() {
    let (_client, connection) = sidecar_connection(echo_service().await).await;
    // A body of many chunks, larger than one DATA frame in total.
    let chunks: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..40u8)
        .map(|i| Ok(http_body::Frame::data(Bytes::from(vec![i; 64 * 1024]))))
        .collect();
    let body = StreamBody::new(futures::stream::iter(chunks));
    let response = forward(&connection, &head(Method::PUT, "/items/7?x=1"), body)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["x-method"], "PUT");
    assert_eq!(response.headers()["x-target"], "/items/7?x=1");
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), 40 * 64 * 1024);
    assert!(
        echoed
            .chunks(64 * 1024)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == i as u8))
    );
}

#[tokio::test]
async fn many_requests_share_the_connection_concurrently() {
    let (_client, connection) = sidecar_connection(echo_service().await).await;
    let requests = (0..50).map(|i| {
        let connection = connection.clone();
        async move {
            let body = Full::new(Bytes::from(format!("request {i}")));
            let response = forward(&connection, &head(Method::POST, &format!("/r/{i}")), body)
                .await
                .unwrap();
            let text = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(text, format!("request {i}").as_bytes());
        }
    });
    futures::future::join_all(requests).await;
}

#[tokio::test]
async fn trailers_cross_the_stream() {
    // At the stream level (HTTP/1.1 services rarely send trailers): the client's trailers
    // reach the other end of the QUIC stream intact.
    let server = Arc::new(Transport::bind(LOOPBACK, Keypair::generate_ed25519(), None).unwrap());
    let client = Transport::bind(LOOPBACK, Keypair::generate_ed25519(), None).unwrap();
    let serving = Arc::clone(&server);
    let received = tokio::spawn(async move {
        let (_, connection) = serving.accept().await.unwrap().unwrap();
        let (mut send, mut recv) = connection.accept_bi().await.unwrap();
        let (payload, rest) = read_head(&mut recv).await.unwrap();
        let request = decode_request_head(&payload).unwrap();
        let collected = FramedBody::new(recv, rest).collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        let mut encoded = BytesMut::new();
        encode_response_head(
            &ResponseHead {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
            },
            &mut encoded,
        )
        .unwrap();
        send_message(&mut send, encoded.freeze(), Full::new(collected.to_bytes()))
            .await
            .unwrap();
        // Returned so the connection outlives the answer's delivery.
        (request.target, trailers, connection)
    });
    let connection = client
        .connect(server.peer_id(), server.local_addr().unwrap())
        .await
        .unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = vec![
        Ok(http_body::Frame::data(Bytes::from_static(b"payload"))),
        Ok(http_body::Frame::trailers(trailers.clone())),
    ];
    let response = forward(
        &connection,
        &head(Method::POST, "/t"),
        StreamBody::new(futures::stream::iter(frames)),
    )
    .await
    .unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        &b"payload"[..]
    );
    let (target, got, _connection) = received.await.unwrap();
    assert_eq!(target, "/t");
    assert_eq!(got, Some(trailers));
}

#[tokio::test]
async fn a_stream_past_the_peers_limit_waits_its_turn_and_says_so() {
    let (_client, connection) = sidecar_connection(echo_service().await).await;
    let mut held = Vec::new();
    let waiting = loop {
        let hit = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&hit);
        let mut open = Box::pin(open_stream(&connection, move || {
            flag.store(true, std::sync::atomic::Ordering::Relaxed)
        }));
        match futures::FutureExt::now_or_never(open.as_mut()) {
            Some(opened) => held.push(opened.unwrap()),
            None => {
                assert!(hit.load(std::sync::atomic::Ordering::Relaxed), "not told");
                break open;
            }
        }
        assert!(held.len() <= 1024, "past the limit without waiting");
    };
    // Every stream the sidecar allows (1024; one less if the authentication's stream has not
    // been credited back yet), then a wait.
    assert!(held.len() >= 1023, "{} opened", held.len());
    drop(held);
    let opened = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("a stream freed lets the waiting one open");
    assert!(opened.is_ok());
}
