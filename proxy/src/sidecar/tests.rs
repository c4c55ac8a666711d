//! The sidecar over a real QUIC connection and real service sockets on loopback: what it
//! answers when its service refuses, breaks or is missing, and what its probes say.

use std::{convert::Infallible, net::Ipv4Addr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use libp2p::identity::Keypair;
use testkit::wait_until;

use super::*;
use crate::{
    forward::{AttemptError, forward, probe},
    framing,
    framing::{Health, RequestHead},
    metrics::{SidecarCollector, SidecarView},
    sidecar::health::ServiceState,
    stream::{FramedBody, StreamError},
    transport::Transport,
};

const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
const DEADLINE: Duration = Duration::from_secs(10);

/// Checks often, so that tests see changes quickly.
fn fast() -> HealthPolicy {
    HealthPolicy {
        interval: Duration::from_millis(20),
        ..HealthPolicy::default()
    }
}

/// A loopback address nobody listens on (until a test does).
fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind(LOOPBACK)
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An HTTP/1.1 service on `listener` answering every request with `answer` (heads up to
/// 1 MiB). Stops accepting (its port closes) when the returned task is aborted.
fn http1_service<F, A>(listener: tokio::net::TcpListener, answer: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> A + Clone + Send + Sync + 'static,
    A: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let answered = answer(request);
                    async move { Ok::<_, Infallible>(answered.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(1 << 20)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// A service on `listener` that reads each request's whole body, then answers 200 with its
/// length. Stops accepting (its port closes) when the returned task is aborted.
fn draining_service(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    http1_service(listener, |request: Request<Incoming>| async move {
        let length = match request.into_body().collect().await {
            Ok(body) => body.to_bytes().len(),
            Err(_) => 0,
        };
        Response::new(Full::new(Bytes::from(length.to_string())))
    })
}

/// A sidecar for `upstream` behind a QUIC transport; returns it, a client transport and the
/// client's connection to it (the transport must live as long as the connection is used).
async fn sidecar_connection(upstream: SocketAddr) -> (Arc<Sidecar>, Transport, Connection) {
    sidecar_connection_with(upstream, fast()).await
}

/// [`sidecar_connection`] with its service checked as `policy` says.
async fn sidecar_connection_with(
    upstream: SocketAddr,
    policy: HealthPolicy,
) -> (Arc<Sidecar>, Transport, Connection) {
    let server = Arc::new(Transport::bind(LOOPBACK, Keypair::generate_ed25519(), None).unwrap());
    let sidecar = Sidecar::with_policy(upstream, Activity::new(), policy);
    let serving = Arc::clone(&server);
    let serves = Arc::clone(&sidecar);
    tokio::spawn(async move {
        while let Some(Ok((_, connection))) = serving.accept().await {
            tokio::spawn(Arc::clone(&serves).serve_connection(connection));
        }
    });
    let client = Transport::bind(LOOPBACK, Keypair::generate_ed25519(), None).unwrap();
    let connection = client
        .connect(server.peer_id(), server.local_addr().unwrap())
        .await
        .unwrap();
    (sidecar, client, connection)
}

fn get() -> RequestHead {
    RequestHead {
        method: Method::GET,
        target: "/".into(),
        headers: HeaderMap::new(),
    }
}

async fn health_of(connection: &Connection) -> Health {
    probe(connection).await.unwrap().1
}

/// Waits until a probe on `connection` answers `wanted`.
async fn until_probe_says(connection: &Connection, wanted: Health) {
    wait_until(
        &format!("a probe answering {wanted:?}"),
        DEADLINE,
        || async { health_of(connection).await == wanted },
    )
    .await;
}

#[tokio::test]
async fn a_request_to_a_service_whose_port_is_closed_is_refused_naming_the_service() {
    let dead = closed_port();
    let (sidecar, _client, connection) = sidecar_connection(dead).await;
    let answer = forward(&connection, &get(), Full::new(Bytes::new())).await;
    match answer {
        Err(AttemptError::Refused(reason)) => {
            assert!(reason.contains(&dead.to_string()), "{reason}");
            assert!(reason.to_lowercase().contains("refused"), "{reason}");
        }
        Err(other) => panic!("not refused: {other}"),
        Ok(response) => panic!("not refused: answered {}", response.status()),
    }
    // A service that never answered is starting, not down; either way probes hear "down".
    assert_eq!(sidecar.health().state(), ServiceState::Starting);
    assert_eq!(health_of(&connection).await, Health::Down);
}

#[tokio::test]
async fn probes_say_down_until_the_service_listens_and_down_again_when_it_stops() {
    let addr = closed_port();
    let (sidecar, _client, connection) = sidecar_connection(addr).await;
    assert_eq!(health_of(&connection).await, Health::Down);
    assert_eq!(sidecar.health().state(), ServiceState::Starting);

    let service = draining_service(tokio::net::TcpListener::bind(addr).await.unwrap());
    until_probe_says(&connection, Health::Serving).await;
    assert_eq!(sidecar.health().state(), ServiceState::Serving);
    let response = forward(&connection, &get(), Full::new(Bytes::new()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The service goes (its listener closes): the next check is refused.
    service.abort();
    until_probe_says(&connection, Health::Down).await;
    assert_eq!(sidecar.health().state(), ServiceState::Down);
    assert!(sidecar.probes_answered() >= 4);
}

#[tokio::test]
async fn a_refused_request_makes_a_serving_service_down_before_any_check() {
    // Checks so rare that only the request can tell.
    let addr = closed_port();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let service = draining_service(listener);
    let slow = HealthPolicy {
        interval: Duration::from_secs(3600),
        ..HealthPolicy::default()
    };
    let (sidecar, _client, connection) = sidecar_connection_with(addr, slow).await;
    // The first check (due at once) sees the service.
    until_probe_says(&connection, Health::Serving).await;
    service.abort();
    wait_until("the service's port closed", DEADLINE, || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // The sidecar's client has no pooled connection (it sent nothing yet), so the request
    // connects, and is refused; no check runs for an hour.
    let answer = forward(&connection, &get(), Full::new(Bytes::new())).await;
    assert!(
        matches!(answer, Err(AttemptError::Refused(_))),
        "{:?}",
        answer.map(|r| r.status())
    );
    assert_eq!(sidecar.health().state(), ServiceState::Down);
    assert_eq!(health_of(&connection).await, Health::Down);
}

#[tokio::test]
async fn a_service_that_breaks_the_exchange_is_a_failure_not_a_response_and_is_not_marked_down() {
    // Accepts connections and closes them without answering.
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    let (sidecar, _client, connection) = sidecar_connection(addr).await;
    until_probe_says(&connection, Health::Serving).await;
    let answer = forward(&connection, &get(), Full::new(Bytes::new())).await;
    match answer {
        Err(AttemptError::Broken(StreamError::ServiceFailed(reason))) => {
            assert!(reason.contains(&addr.to_string()), "{reason}");
        }
        other => panic!("{:?}", other.map(|r| r.status())),
    }
    assert_eq!(sidecar.health().state(), ServiceState::Serving);
}

#[tokio::test]
async fn a_request_body_broken_by_the_ingress_does_not_make_the_service_down() {
    // A service that says when the first chunk of a request body reached it, then reads on.
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reached, mut first_chunk) = tokio::sync::mpsc::unbounded_channel::<()>();
    http1_service(listener, move |request: Request<Incoming>| {
        let reached = reached.clone();
        async move {
            let mut body = request.into_body();
            let _ = body.frame().await;
            let _ = reached.send(());
            while let Some(Ok(_)) = body.frame().await {}
            Response::new(Full::new(Bytes::new()))
        }
    });
    let (sidecar, _client, connection) = sidecar_connection(addr).await;
    until_probe_says(&connection, Health::Serving).await;
    // A body that fails once its first chunk reached the service: forward() resets its side
    // of the stream, and the body the sidecar streams to the service fails mid-request.
    let first = futures::stream::iter([Ok(http_body::Frame::data(Bytes::from_static(
        b"a first chunk",
    )))]);
    let then_fail = futures::stream::once(async move {
        first_chunk.recv().await;
        Err::<http_body::Frame<Bytes>, _>("the client went away")
    });
    let head = RequestHead {
        method: Method::POST,
        ..get()
    };
    let answer = forward(
        &connection,
        &head,
        StreamBody::new(futures::StreamExt::chain(first, then_fail)),
    )
    .await;
    assert!(
        matches!(answer, Err(AttemptError::Client(_))),
        "{:?}",
        answer.map(|r| r.status())
    );
    // forward() returned on the sidecar's answer, so its verdict is in: the service is not
    // blamed.
    assert_eq!(sidecar.health().state(), ServiceState::Serving);
    assert_eq!(health_of(&connection).await, Health::Serving);
}

#[tokio::test]
async fn probes_answered_and_the_service_state_are_on_the_metrics() {
    let addr = closed_port();
    let (sidecar, _client, connection) = sidecar_connection(addr).await;
    let registry = prometheus::Registry::new();
    let viewed = Arc::clone(&sidecar);
    SidecarCollector::register(&registry, move || SidecarView {
        probes_answered: viewed.probes_answered(),
        service_up: viewed.health().state() == ServiceState::Serving,
    })
    .unwrap();
    let text = || {
        prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap()
    };
    assert!(
        text().contains("proxy_probes_answered_total 0"),
        "{}",
        text()
    );
    assert!(text().contains("proxy_service_up 0"), "{}", text());
    let _service = draining_service(tokio::net::TcpListener::bind(addr).await.unwrap());
    until_probe_says(&connection, Health::Serving).await;
    let answered = sidecar.probes_answered();
    assert!(answered >= 1);
    for _ in 0..3 {
        health_of(&connection).await;
    }
    let text = text();
    assert!(
        text.contains(&format!("proxy_probes_answered_total {}", answered + 3)),
        "{text}"
    );
    assert!(text.contains("proxy_service_up 1"), "{text}");
}

/// A service speaking raw HTTP/1.1: on each connection, the `n`th request head (bodiless
/// requests only) is answered with `answer(n)`'s bytes, and the connection closed without a
/// word where it gives `None` (or after the bytes, where it says so).
fn raw_service(
    listener: tokio::net::TcpListener,
    answer: fn(usize) -> (Option<&'static [u8]>, bool),
) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                for n in 0.. {
                    while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                        }
                    }
                    buffer.clear();
                    let (bytes, close) = answer(n);
                    let Some(bytes) = bytes else { return };
                    if stream.write_all(bytes).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    })
}

async fn body_of(response: http::Response<FramedBody>) -> Result<Bytes, StreamError> {
    Ok(response.into_body().collect().await?.to_bytes())
}

#[tokio::test]
async fn a_pooled_connection_the_service_closed_as_a_request_was_written_costs_no_request() {
    // Every connection answers its first request and drops the second unanswered, as a
    // service closing an idle keep-alive connection just as a request arrives does.
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _service = raw_service(listener, |n| match n {
        0 => (
            Some(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            false,
        ),
        _ => (None, true),
    });
    let (_sidecar, _client, connection) = sidecar_connection(addr).await;
    for i in 0..10 {
        let response = forward(&connection, &get(), Full::new(Bytes::new()))
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_of(response).await.unwrap(), "ok");
    }
}

#[tokio::test]
async fn a_response_delimited_by_the_close_of_its_connection_arrives_whole() {
    static ANSWER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ANSWER.get_or_init(|| {
        let mut answer = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        answer.extend((0..100_000).map(|i| b'a' + (i % 26) as u8));
        answer
    });
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _service = raw_service(listener, |_| (Some(ANSWER.get().unwrap()), true));
    let (_sidecar, _client, connection) = sidecar_connection(addr).await;
    for _ in 0..2 {
        let response = forward(&connection, &get(), Full::new(Bytes::new()))
            .await
            .unwrap();
        let body = body_of(response).await.unwrap();
        assert_eq!(body.len(), 100_000);
        assert_eq!(&body[..], &ANSWER.get().unwrap()[19..]);
    }
}

#[tokio::test]
async fn a_response_broken_after_its_head_is_an_error_never_a_shorter_whole_body() {
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _service = raw_service(listener, |_| {
        (
            Some(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"),
            true,
        )
    });
    let (sidecar, _client, connection) = sidecar_connection(addr).await;
    // The sidecar resets the stream: the ingress gets the head and part of the body and then
    // an error, or (the reset overtaking them) an error at once.
    match forward(&connection, &get(), Full::new(Bytes::new())).await {
        Ok(response) => {
            let body = body_of(response).await;
            assert!(body.is_err(), "a truncated body read as whole: {body:?}");
        }
        Err(AttemptError::Broken(_)) => {}
        Err(other) => panic!("{other}"),
    }
    // The service answered: it is serving, whatever became of the body.
    assert_eq!(sidecar.health().state(), ServiceState::Serving);
}

#[tokio::test]
async fn a_slow_reader_slows_the_service_instead_of_growing_the_sidecar() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A service answering with a 1 GiB body as fast as its socket takes it, counting what it
    // wrote.
    const LENGTH: u64 = 1 << 30;
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&written);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                if stream.read(&mut head).await.unwrap_or(0) == 0 {
                    return; // a liveness check
                }
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {LENGTH}\r\n\r\n");
                stream.write_all(answer.as_bytes()).await.unwrap();
                let chunk = vec![b'x'; 64 * 1024];
                while stream.write_all(&chunk).await.is_ok() {
                    counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let (_sidecar, _client, connection) = sidecar_connection(addr).await;
    let response = forward(&connection, &get(), Full::new(Bytes::new()))
        .await
        .unwrap();
    // Read 64 MiB, one frame at a time: however slowly this reader goes, the service can
    // be ahead of it only by what the QUIC windows and the two sockets' buffers hold (a
    // sidecar that read the service's body as fast as it came would let it run a gigabyte
    // ahead).
    const BOUND: u64 = 24 << 20;
    let mut body = response.into_body();
    let mut read = 0u64;
    while read < 64 << 20 {
        let frame = body.frame().await.unwrap().unwrap();
        read += frame.into_data().map_or(0, |d| d.len() as u64);
        let ahead = written.load(Ordering::Relaxed).saturating_sub(read);
        assert!(
            ahead < BOUND,
            "the service ran {ahead} bytes ahead of the reader"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_slow_service_reading_an_upload_slows_the_client_instead_of_growing_the_sidecar() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LENGTH: u64 = 1 << 30;
    const BOUND: u64 = 24 << 20;
    // What the client has produced of its body so far.
    let produced = Arc::new(AtomicU64::new(0));
    // A service reading the upload one read at a time, checking after each how far the
    // client is ahead of it; it answers once it has 64 MiB.
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (verdict, mut verdicts) = tokio::sync::mpsc::unbounded_channel::<Result<(), u64>>();
    let seen = Arc::clone(&produced);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (seen, verdict) = (Arc::clone(&seen), verdict.clone());
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                let mut consumed = 0u64;
                let mut in_head = true;
                while consumed < 64 << 20 {
                    let read = stream.read(&mut buffer).await.unwrap_or(0);
                    if read == 0 {
                        return; // a liveness check, or the exchange ended
                    }
                    if in_head {
                        // The head is small and arrives first; count only the body after it.
                        let end = buffer[..read].windows(4).position(|w| w == b"\r\n\r\n");
                        let Some(end) = end else { continue };
                        in_head = false;
                        consumed += (read - end - 4) as u64;
                        continue;
                    }
                    consumed += read as u64;
                    let ahead = seen.load(Ordering::Relaxed).saturating_sub(consumed);
                    if ahead >= BOUND {
                        let _ = verdict.send(Err(ahead));
                        return;
                    }
                    tokio::task::yield_now().await;
                }
                let _ = verdict.send(Ok(()));
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    let (_sidecar, _client, connection) = sidecar_connection(addr).await;
    let counter = Arc::clone(&produced);
    let chunks = futures::stream::repeat_with(move || {
        counter.fetch_add(64 * 1024, Ordering::Relaxed);
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![
            b'x';
            64 * 1024
        ])))
    });
    let chunks = futures::StreamExt::take(chunks, (LENGTH / (64 * 1024)) as usize);
    let mut head = RequestHead {
        method: Method::POST,
        ..get()
    };
    head.headers
        .insert(http::header::CONTENT_LENGTH, LENGTH.into());
    let sending = forward(&connection, &head, StreamBody::new(chunks));
    tokio::select! {
        verdict = verdicts.recv() => {
            if let Some(Err(ahead)) = verdict {
                panic!("the client ran {ahead} bytes ahead of the service");
            }
        }
        answer = sending => panic!("answered before the service's verdict: {:?}", answer.map(|r| r.status())),
    }
}

#[tokio::test]
async fn heads_at_the_limit_cross_both_ways_and_one_over_it_is_a_failure_not_a_crash() {
    // A service that echoes the request's x-big header in its response, and adds as many
    // bytes again in x-more when asked to go over the limit.
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    http1_service(listener, |request: Request<Incoming>| async move {
        let big = request.headers().get("x-big").cloned();
        let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
        if let Some(big) = big {
            if request.uri().path() == "/over" {
                response.headers_mut().insert("x-more", big.clone());
            }
            response.headers_mut().insert("x-big", big);
        }
        response
    });
    let (_sidecar, _client, connection) = sidecar_connection(addr).await;
    let big = "b".repeat(framing::MAX_HEAD_BYTES - 1024);
    let mut head = get();
    head.headers.insert("x-big", big.parse().unwrap());
    let response = forward(&connection, &head, Full::new(Bytes::new()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-big"].len(), big.len());
    assert_eq!(body_of(response).await.unwrap(), "ok");
    // A response head twice the limit: the sidecar says the service failed, and goes on.
    head.target = "/over".into();
    match forward(&connection, &head, Full::new(Bytes::new())).await {
        Err(AttemptError::Broken(StreamError::ServiceFailed(reason))) => {
            assert!(reason.contains("over"), "{reason}");
        }
        other => panic!("{:?}", other.map(|r| r.status())),
    }
    head.target = "/".into();
    let again = forward(&connection, &head, Full::new(Bytes::new())).await;
    assert_eq!(again.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn a_request_the_ingress_gave_up_on_holds_no_connection_to_a_service_that_never_answers() {
    use tokio::io::AsyncReadExt;
    // A service that reads requests and never answers; it reports when a connection that
    // carried a request is closed by the sidecar.
    let listener = tokio::net::TcpListener::bind(LOOPBACK).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed, mut closes) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                if stream.read(&mut buffer).await.unwrap_or(0) == 0 {
                    return; // a liveness check
                }
                while stream.read(&mut buffer).await.unwrap_or(0) > 0 {}
                let _ = closed.send(());
            });
        }
    });
    let (_sidecar, _client, connection) = sidecar_connection(addr).await;
    // The ingress gives up after a moment: the attempt's streams are dropped.
    let head = get();
    let attempt = forward(&connection, &head, Full::new(Bytes::new()));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), attempt)
            .await
            .is_err()
    );
    tokio::time::timeout(DEADLINE, closes.recv())
        .await
        .expect("the sidecar still holds the abandoned request's connection to the service");
}
