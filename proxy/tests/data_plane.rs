//! The `proxy` program end to end, as real processes on loopback: an ingress and sidecars
//! joined to an overlay whose bootstrap node and lookup service run in this process, test
//! services behind the sidecars.

mod support;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use control::lookup::Limits;
use futures::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use libp2p::identity::Keypair;
use proxy::transport::Transport;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(30);

/// A sidecar for the test service at `upstream`, registered as `service`, its data plane on
/// `quic` (`127.0.0.1:0` for any port).
async fn sidecar(
    network: &Network,
    service: &str,
    upstream: std::net::SocketAddr,
    extra: &[&str],
) -> Proxy {
    let upstream = upstream.to_string();
    let mut args = vec!["--quic-addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["0", service, &upstream]);
    start_proxy(network, &args).await
}

/// A sidecar for `upstream` registered as `service`, reached through a relay that delays
/// each packet by `one_way` (the sidecar advertises the relay's address). Keep the relay:
/// it stops when dropped.
async fn sidecar_behind_relay(
    network: &Network,
    service: &str,
    upstream: std::net::SocketAddr,
    one_way: Duration,
) -> (Proxy, UdpDelayRelay) {
    // The sidecar's own port is chosen first (held, then released) for the relay to point at.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = UdpDelayRelay::start(port, one_way).unwrap();
    let (quic, advertised) = (port.to_string(), relay.addr.to_string());
    let upstream = upstream.to_string();
    let args = [
        "--quic-addr",
        &quic,
        "--quic-advertise-addr",
        &advertised,
        "0",
        service,
        &upstream,
    ];
    (start_proxy(network, &args).await, relay)
}

async fn ingress(network: &Network, extra: &[&str]) -> Proxy {
    let mut args = extra.to_vec();
    args.push("0");
    start_proxy(network, &args).await
}

/// GET `path` through the ingress at `addr`; status and body.
async fn get(addr: &str, path: &str) -> (StatusCode, String) {
    let exchange = async {
        let response = http1_client()
            .request(
                Request::get(format!("http://{addr}{path}"))
                    .body(body(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path} through {addr}: no answer within {DEADLINE:?}"))
}

/// Waits until `path` answers 200 through the ingress (instances take a moment to be found).
async fn wait_for_ok(addr: &str, path: &str) {
    let give_up = Instant::now() + DEADLINE;
    loop {
        let (status, text) = get(addr, path).await;
        if status == StatusCode::OK {
            return;
        }
        assert!(
            Instant::now() < give_up,
            "{path} still answers {status}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics_of(proxy: &Proxy) -> String {
    http_get(&proxy.metrics, "/metrics").await.unwrap().1
}

/// Waits until the ingress has an RTT for `n` instances of `service`.
async fn wait_for_instances(ingress: &Proxy, service: &str, n: usize) {
    let pattern = "proxy_instance_rtt_seconds{instance=";
    let service_label = format!("quantile=\"0.5\",service=\"{service}\"");
    wait_until(
        &format!("{n} measured instances of {service}"),
        DEADLINE,
        || async {
            let text = metrics_of(ingress).await;
            text.lines()
                .filter(|l| l.starts_with(pattern) && l.contains(&service_label))
                .count()
                >= n
        },
    )
    .await;
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_responses_cross_both_proxies_intact_over_http1_and_h2c() {
    let network = Network::start().await;
    network.register("echo", Limits::default()).await;
    let service = test_service("a").await;
    let side = sidecar(&network, "echo", service, &[]).await;
    let front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/echo/tag").await;

    for (protocol, client) in [("HTTP/1.1", http1_client()), ("h2c", h2c_client())] {
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
        ] {
            let sent = format!("{method} body over {protocol}");
            let request = Request::builder()
                .method(method.clone())
                .uri(format!("http://{}/echo/echo?x=1&y=two", front.ingress))
                .header("x-custom", "kept")
                .header("proxy-authorization", "for the proxy only")
                .body(body(sent.clone()))
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{method} {protocol}");
            let headers = response.headers().clone();
            assert_eq!(headers["x-echo-method"], method.as_str());
            assert_eq!(headers["x-echo-target"], "/echo?x=1&y=two");
            assert_eq!(headers["x-echo-x-custom"], "kept");
            assert_eq!(headers["x-echo-x-forwarded-for"], "127.0.0.1");
            assert!(
                headers["x-echo-via"]
                    .to_str()
                    .unwrap()
                    .contains("multi-tier-cloud")
            );
            assert!(
                !headers["x-echo-names"]
                    .to_str()
                    .unwrap()
                    .contains("proxy-authorization"),
                "hop-by-hop and proxy-only headers are dropped: {:?}",
                headers["x-echo-names"]
            );
            assert!(
                headers["via"]
                    .to_str()
                    .unwrap()
                    .contains("multi-tier-cloud")
            );
            let echoed = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(echoed, sent.as_bytes(), "{method} {protocol}");
        }

        // Upstream statuses pass through.
        for code in [404u16, 503] {
            let response = client
                .request(
                    Request::get(format!("http://{}/echo/status/{code}", front.ingress))
                        .body(body(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), code, "{protocol}");
        }

        // Streamed both ways: 16 MiB down, 16 MiB up.
        let size = 16 << 20;
        let response = client
            .request(
                Request::get(format!("http://{}/echo/bytes/{size}", front.ingress))
                    .body(body(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let mut received = 0;
        let mut stream = response.into_body();
        while let Some(frame) = stream.frame().await {
            received += frame.unwrap().into_data().map_or(0, |d| d.len());
        }
        assert_eq!(received, size, "{protocol}");
        let upload = Request::post(format!("http://{}/echo/drain", front.ingress))
            .body(body(vec![1u8; size]))
            .unwrap();
        let response = client.request(upload).await.unwrap();
        let counted = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(counted, size.to_string().as_bytes(), "{protocol}");
    }

    // Trailers reach an HTTP/2 client.
    let response = h2c_client()
        .request(
            Request::get(format!("http://{}/echo/trailers", front.ingress))
                .body(body(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-checksum"], "ok");
    assert_eq!(collected.to_bytes(), "data");

    // Both proxies account for what they did.
    let text = metrics_of(&front).await;
    let ok = metric(
        &text,
        "proxy_requests_total{class=\"2xx\",service=\"echo\"}",
    )
    .unwrap();
    assert!(ok >= 15.0, "{text}");
    assert!(
        metric(
            &text,
            "proxy_requests_total{class=\"5xx\",service=\"echo\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert!(text.contains("proxy_request_duration_seconds_bucket{service=\"echo\""));
    assert!(text.contains("proxy_instance_in_flight{instance="));
    let text = metrics_of(&side).await;
    assert!(
        metric(&text, "proxy_served_requests_total").unwrap() >= 15.0,
        "{text}"
    );
    assert!(metric(&text, "proxy_seconds_since_last_request").unwrap() < 60.0);

    // SIGTERM: both stop cleanly.
    assert!(front.process.terminate().await);
    assert!(side.process.terminate().await);
}

/// One HTTP/1.1 response read off a raw connection: status, head, body (de-chunked) and the
/// trailer section as text.
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
    trailers: String,
}

/// `--worker-threads 2` on both proxies: the ingress's clients are spread over its two
/// workers, each opening its own connection to the sidecar (from a port of its own: a reply
/// to the shared data-plane port could reach the other worker), and every request crosses
/// intact.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_clients_and_lose_no_request() {
    let network = Network::start().await;
    network.register("echo", Limits::default()).await;
    let service = test_service("a").await;
    let _side = sidecar(&network, "echo", service, &["--worker-threads", "2"]).await;
    let front = ingress(&network, &["--worker-threads", "2"]).await;
    wait_for_ok(&front.ingress, "/echo/tag").await;

    for i in 0..32 {
        // A client of its own: a new connection, from a new port, hashed to a worker anew.
        let sent = format!("request {i}");
        let response = http1_client()
            .request(
                Request::post(format!("http://{}/echo/echo", front.ingress))
                    .body(body(sent.clone()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {i}");
        let echoed = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(echoed, sent.as_bytes());
    }
    let text = metrics_of(&front).await;
    let accepted = |worker: &str| -> f64 {
        let series = format!("proxy_connections_accepted_total{{worker=\"{worker}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .map_or(0.0, |value| value.parse().unwrap())
    };
    assert!(
        accepted("0") > 0.0 && accepted("1") > 0.0,
        "both workers accept clients: worker 0 {}, worker 1 {}",
        accepted("0"),
        accepted("1")
    );
}

/// Reads one response from `stream` (what it read past it stays in `buffer`); `head_request`
/// says it answers a HEAD. A body with neither length nor chunking is read until close.
async fn read_response(
    stream: &mut tokio::net::TcpStream,
    buffer: &mut Vec<u8>,
    head_request: bool,
) -> RawResponse {
    async fn more(stream: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("the ingress answers")
            .unwrap();
        buffer.extend_from_slice(&chunk[..n]);
        n > 0
    }
    let (status, head_len, length, chunked) = loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut fields);
        if let httparse::Status::Complete(len) = response.parse(buffer).unwrap() {
            let field = |name: &str| {
                response
                    .headers
                    .iter()
                    .find(|f| f.name.eq_ignore_ascii_case(name))
                    .map(|f| String::from_utf8_lossy(f.value).into_owned())
            };
            let length = field("content-length").map(|l| l.parse::<usize>().unwrap());
            let chunked = field("transfer-encoding").is_some_and(|c| c.contains("chunked"));
            break (response.code.unwrap(), len, length, chunked);
        }
        assert!(more(stream, buffer).await, "closed before a whole head");
    };
    let head = String::from_utf8_lossy(&buffer[..head_len]).into_owned();
    buffer.drain(..head_len);
    let (mut body, mut trailers) = (Vec::new(), String::new());
    if head_request || status == 100 || status == 204 || status == 304 {
    } else if let Some(length) = length {
        while buffer.len() < length {
            assert!(more(stream, buffer).await, "closed before the whole body");
        }
        body = buffer.drain(..length).collect();
    } else if chunked {
        loop {
            let line_end = loop {
                if let Some(at) = buffer.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                assert!(more(stream, buffer).await, "closed in a chunk size");
            };
            let size =
                usize::from_str_radix(std::str::from_utf8(&buffer[..line_end]).unwrap().trim(), 16)
                    .unwrap();
            buffer.drain(..line_end + 2);
            if size == 0 {
                // Trailers, then an empty line.
                loop {
                    if let Some(at) = buffer.windows(2).position(|w| w == b"\r\n") {
                        let line: Vec<u8> = buffer.drain(..at + 2).collect();
                        if at == 0 {
                            break;
                        }
                        trailers.push_str(&String::from_utf8_lossy(&line));
                    } else {
                        assert!(more(stream, buffer).await, "closed in the trailers");
                    }
                }
                break;
            }
            while buffer.len() < size + 2 {
                assert!(more(stream, buffer).await, "closed in a chunk");
            }
            body.extend(buffer.drain(..size));
            buffer.drain(..2);
        }
    } else {
        while more(stream, buffer).await {}
        body = std::mem::take(buffer);
    }
    RawResponse {
        status,
        head,
        body,
        trailers,
    }
}

/// Writes `request` on `stream` and reads the response to it.
async fn exchange(
    stream: &mut tokio::net::TcpStream,
    buffer: &mut Vec<u8>,
    request: &[u8],
) -> RawResponse {
    stream.write_all(request).await.unwrap();
    read_response(stream, buffer, request.starts_with(b"HEAD ")).await
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http1_front_keeps_connections_open_and_frames_bodies_as_rfc_9112_says() {
    let network = Network::start().await;
    network.register("echo", Limits::default()).await;
    let service = test_service("a").await;
    let _side = sidecar(&network, "echo", service, &[]).await;
    let front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/echo/tag").await;
    let connect = || tokio::net::TcpStream::connect(front.ingress.clone());

    // One connection, requests one after the other: no body, a length, chunked, and a
    // chunked answer with trailers for a client that takes them.
    let mut stream = connect().await.unwrap();
    let mut buffer = Vec::new();
    let answer = exchange(
        &mut stream,
        &mut buffer,
        b"GET /echo/tag HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!((answer.status, &answer.body[..]), (200, &b"a"[..]));
    assert!(
        answer.head.contains("via: 1.1 multi-tier-cloud"),
        "{}",
        answer.head
    );
    let answer = exchange(
        &mut stream,
        &mut buffer,
        b"POST /echo/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!((answer.status, &answer.body[..]), (200, &b"hello"[..]));
    let answer = exchange(
        &mut stream,
        &mut buffer,
        b"POST /echo/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nworld\r\n1\r\n!\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!((answer.status, &answer.body[..]), (200, &b"world!"[..]));
    // A GET with a body of unknown length reaches the service with it (the sidecar used to
    // take a GET without a length for one without a body, and drop it).
    let answer = exchange(
        &mut stream,
        &mut buffer,
        b"GET /echo/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\nget!\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!((answer.status, &answer.body[..]), (200, &b"get!"[..]));
    let answer = exchange(
        &mut stream,
        &mut buffer,
        b"GET /echo/trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
    )
    .await;
    assert_eq!(&answer.body[..], b"data");
    assert!(
        answer.trailers.contains("x-checksum: ok"),
        "{}",
        answer.head
    );
    // A HEAD: the length the GET would have, no body.
    let answer = exchange(
        &mut stream,
        &mut buffer,
        b"HEAD /echo/tag HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 200);

    // Pipelined: two requests in one write, two answers in order.
    stream
        .write_all(
            b"GET /echo/status/404 HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /echo/tag HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
    let first = read_response(&mut stream, &mut buffer, false).await;
    let second = read_response(&mut stream, &mut buffer, false).await;
    assert_eq!((first.status, second.status), (404, 200));
    assert_eq!(&second.body[..], b"a");

    // Expect: 100-continue is answered before the body is sent.
    stream
        .write_all(
            b"POST /echo/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\
              Expect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = read_response(&mut stream, &mut buffer, false).await;
    assert_eq!(interim.status, 100);
    stream.write_all(b"abc").await.unwrap();
    let answer = read_response(&mut stream, &mut buffer, false).await;
    assert_eq!((answer.status, &answer.body[..]), (200, &b"abc"[..]));
    // The same connection carried all of it; closing is the client's to say.
    let answer = exchange(
        &mut stream,
        &mut buffer,
        b"GET /echo/tag HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.head.contains("connection: close"), "{}", answer.head);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "the ingress closes after it");

    // HTTP/1.0 without keep-alive: a body of unknown length is delimited by the close.
    let mut old = connect().await.unwrap();
    old.write_all(b"GET /echo/bytes/100000 HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let answer = read_response(&mut old, &mut buffer, false).await;
    assert_eq!(
        (answer.status, answer.body.len()),
        (200, 100_000),
        "{}",
        answer.head
    );
    assert!(
        !answer.head.contains("transfer-encoding"),
        "{}",
        answer.head
    );

    // Both a length and a coding: refused, never forwarded (request smuggling).
    let mut smuggler = connect().await.unwrap();
    smuggler
        .write_all(
            b"POST /echo/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
              Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let mut buffer = Vec::new();
    let answer = read_response(&mut smuggler, &mut buffer, false).await;
    assert_eq!(answer.status, 400, "{}", answer.head);
    // Refused heads are counted too.
    let text = metrics_of(&front).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("proxy_requests_total{class=\"4xx\"") && !l.contains("echo")),
        "{text}"
    );
}

/// Everything the peer sends until it closes the connection. A reset after the answer counts
/// as closing (a server that refuses a request it has not read resets: RFC 9112 9.6 lingering
/// is optional); any other read error, or no close within the deadline, fails the test.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("not closed within {DEADLINE:?}; so far: {answer:?}"));
    match read {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(error) => panic!("reading the answer: {error}"),
    }
    answer
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_missing_services_get_clear_answers() {
    let network = Network::start().await;
    network.register("lonely", Limits::default()).await;
    let front = ingress(
        &network,
        &["--head-timeout", "1s", "--max-head-bytes", "8192"],
    )
    .await;

    let raw = |request: Vec<u8>| {
        let addr = front.ingress.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.write_all(&request).await.unwrap();
            String::from_utf8_lossy(&read_until_closed(&mut stream).await).into_owned()
        }
    };
    let answer = raw(b"NOT A REQUEST\r\n\r\n".to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Issue 16: names no lookup would accept are the client's error, answered here (400), not
    // sent on to the lookup (which made them 503s); so is a length no body can have.
    // (A 5 KB name: over the 128 a name may have, under this ingress's --max-head-bytes.)
    let long_name = "a".repeat(5_000);
    for target in ["/..", "/.", "/-bad", "/../x", &format!("/{long_name}/x")] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = raw(request.into_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(
            answer.contains("is not a service name"),
            "{target}: {answer}"
        );
    }
    let answer = raw(
        b"POST /lonely/ HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551615\r\n\r\n"
            .to_vec(),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 413"),
        "{answer}"
    );
    // Every answer so far is counted: the malformed line, the five names and the length.
    let text = metrics_of(&front).await;
    assert_eq!(
        metric(&text, "proxy_requests_total{class=\"4xx\",service=\"\"}"),
        Some(7.0),
        "{text}"
    );
    let mut huge = b"GET /lonely/ HTTP/1.1\r\nHost: x\r\nx-big: ".to_vec();
    huge.extend(vec![b'a'; 20_000]);
    huge.extend(b"\r\n\r\n");
    let answer = raw(huge).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // A client that never finishes its head is disconnected (after --head-timeout).
    let begin = Instant::now();
    let answer = raw(b"GET /lonely/ HTTP/1.1\r\nHost: x\r\n".to_vec()).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(begin.elapsed() >= Duration::from_secs(1));
    // Both limits are counted.
    let text = metrics_of(&front).await;
    for limit in ["head_bytes", "head_time"] {
        let series = format!("proxy_limit_hits_total{{limit=\"{limit}\"}}");
        assert_eq!(metric(&text, &series), Some(1.0), "{limit}: {text}");
    }

    let (status, text) = get(&front.ingress, "/nobody-here/x").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text.contains("'nobody-here'"), "{text}");
    let (status, text) = get(&front.ingress, "/").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let (status, text) = get(&front.ingress, "/lonely/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(text.contains("no allocator"), "{text}");

    // A network without a lookup service.
    let bare = support::node("bootstrap", &[], Keypair::generate_ed25519(), None).await;
    let boot = bootstrap_of(&bare).await.to_string();
    let process = Process::spawn(
        PROXY,
        &[
            "--bootstrap",
            &boot,
            "--ephemeral",
            "--prom-listen-addr",
            "127.0.0.1:0",
            "0",
        ],
        &[("RUST_LOG", "warn")],
    );
    let line = process.line_containing("ingress: http://", DEADLINE).await;
    let addr = line["ingress: http://".len()..].to_owned();
    let (status, text) = get(&addr, "/lonely/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(text.contains("lookup service is unreachable"), "{text}");
}

#[testkit::deadline_test]
async fn bad_configuration_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let perf = dir.path().join("perf.conf");
    std::fs::write(
        &perf,
        "[defaults]\nsoft-rtt = \"20ms\"\nhard-rt = \"100ms\"\n",
    )
    .unwrap();
    let perf = perf.to_str().unwrap();
    let (ok, _, stderr) =
        run_to_exit(PROXY, &["--ephemeral", "--configfile", perf, "0"], &[]).await;
    assert!(!ok);
    assert!(
        stderr.contains(perf) && stderr.contains("line 3") && stderr.contains("hard-rt"),
        "{stderr}"
    );
    // The seed's single-dash spelling, and a service without its address.
    let (ok, _, stderr) = run_to_exit(PROXY, &["-configfile", perf, "0", "svc"], &[]).await;
    assert!(!ok);
    assert!(stderr.contains("IP:SERVICE_PORT"), "{stderr}");
    let (ok, _, stderr) =
        run_to_exit(PROXY, &["--ephemeral", "0", "svc", "not-an-address"], &[]).await;
    assert!(!ok);
    assert!(stderr.contains("not-an-address"), "{stderr}");
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn the_near_instance_gets_the_traffic_and_traffic_follows_a_change_of_paths() {
    let network = Network::start().await;
    network.register("tiered", Limits::default()).await;
    let (a, b) = (test_service("a").await, test_service("b").await);
    // Each sidecar is reached through a relay whose delay the test sets.
    let mut sidecars = Vec::new();
    let mut relays = Vec::new();
    for (upstream, one_way) in [(a, Duration::ZERO), (b, Duration::from_millis(10))] {
        let (side, relay) = sidecar_behind_relay(&network, "tiered", upstream, one_way).await;
        sidecars.push(side);
        relays.push(relay);
    }
    let front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/tiered/tag").await;
    wait_for_instances(&front, "tiered", 2).await;

    let share_of = |tags: &[String], tag: &str| {
        tags.iter().filter(|t| *t == tag).count() as f64 / tags.len() as f64
    };
    let mut tags = Vec::new();
    for _ in 0..200 {
        tags.push(get(&front.ingress, "/tiered/tag").await.1);
    }
    let near = share_of(&tags, "a");
    assert!(
        near >= 0.95,
        "the near instance got {near:.2} of the requests"
    );

    // Swap the paths: now b is near, and the traffic goes there. (How soon is the routing
    // core's to say, in virtual time: routing::tests::traffic_follows_a_change_of_paths_
    // within_two_seconds; here only that it does, on real sockets.)
    relays[0].set_one_way_delay(Duration::from_millis(10));
    relays[1].set_one_way_delay(Duration::ZERO);
    wait_until("the traffic to follow the swap", DEADLINE, || async {
        let mut tags = Vec::new();
        for _ in 0..20 {
            tags.push(get(&front.ingress, "/tiered/tag").await.1);
        }
        share_of(&tags, "b") >= 0.95
    })
    .await;
}

/// The share of `n` requests through `ingress` answered by instance `tag` (a failure is
/// nobody's).
async fn share_of(ingress: &str, tag: &str, n: usize) -> f64 {
    let mut hits = 0;
    for _ in 0..n {
        let (status, text) = get(ingress, "/tuned/tag").await;
        if status == StatusCode::OK && text == tag {
            hits += 1;
        }
    }
    hits as f64 / n as f64
}

async fn reloads(proxy: &Proxy, result: &str) -> f64 {
    let text = metrics_of(proxy).await;
    metric(
        &text,
        &format!("proxy_config_reloads_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Issue 15: perf.conf changed under running ingresses, by a file edit (polled) and by SIGHUP:
/// traffic follows the new policy and limits with no restart; an invalid edit is refused
/// and counted while traffic goes on as before.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn perf_conf_edited_under_a_running_ingress_takes_effect_and_a_bad_edit_is_refused() {
    let network = Network::start().await;
    network.register("tuned", Limits::default()).await;
    let (a, b) = (test_service("near").await, test_service("far").await);
    let mut keep = Vec::new();
    for (upstream, one_way) in [(a, Duration::ZERO), (b, Duration::from_millis(10))] {
        keep.push(sidecar_behind_relay(&network, "tuned", upstream, one_way).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let perf = dir.path().join("perf.conf");
    std::fs::write(&perf, "[defaults]\npolicy = \"round-robin\"\n").unwrap();
    let perf_arg = perf.to_str().unwrap();
    let polled = ingress(&network, &["--perf-conf", perf_arg, "--perf-poll", "100ms"]).await;
    wait_for_ok(&polled.ingress, "/tuned/tag").await;
    wait_for_instances(&polled, "tuned", 2).await;
    let far = 1.0 - share_of(&polled.ingress, "near", 100).await;
    assert!(far >= 0.3, "round robin sent {far:.2} to the far instance");

    // An edit: the RTT policy, and the near instance gets the traffic, RTTs already known.
    std::fs::write(&perf, "[defaults]\npolicy = \"rtt-histogram\"\n").unwrap();
    wait_until("the edit applied", DEADLINE, || async {
        reloads(&polled, "applied").await >= 1.0
    })
    .await;
    let near = share_of(&polled.ingress, "near", 100).await;
    assert!(
        near >= 0.95,
        "after the edit the near instance got {near:.2}"
    );

    // An invalid edit: refused, counted; the RTT policy stays.
    std::fs::write(
        &perf,
        "[defaults]\npolicy = \"rtt-histogram\"\nprobe-interval = \"0s\"\n",
    )
    .unwrap();
    wait_until("the bad edit counted", DEADLINE, || async {
        reloads(&polled, "invalid").await >= 1.0
    })
    .await;
    let near = share_of(&polled.ingress, "near", 100).await;
    assert!(
        near >= 0.95,
        "after the bad edit the near instance got {near:.2}"
    );
    assert_eq!(reloads(&polled, "applied").await, 1.0);

    // SIGHUP, with polling off: limits no instance meets leave no instance to use.
    let perf = dir.path().join("perf-hup.conf");
    std::fs::write(&perf, "[defaults]\n").unwrap();
    let perf_arg = perf.to_str().unwrap();
    let hup = ingress(
        &network,
        &[
            "--configfile",
            perf_arg,
            "--perf-poll",
            "0s",
            "--instance-wait",
            "1s",
        ],
    )
    .await;
    wait_for_ok(&hup.ingress, "/tuned/tag").await;
    std::fs::write(
        &perf,
        "[defaults]\nsoft-rtt = \"1us\"\nhard-rtt = \"1us\"\n",
    )
    .unwrap();
    signal(&hup, "-HUP");
    wait_until("the SIGHUP applied", DEADLINE, || async {
        reloads(&hup, "applied").await >= 1.0
    })
    .await;
    let (status, text) = get(&hup.ingress, "/tuned/tag").await;
    assert!(
        status.is_server_error(),
        "no instance is within 1us, yet: {status} {text}"
    );
    // And back: served again, by the same running process.
    std::fs::write(&perf, "[defaults]\n").unwrap();
    signal(&hup, "-HUP");
    wait_for_ok(&hup.ingress, "/tuned/tag").await;
    assert_eq!(reloads(&hup, "applied").await, 2.0);
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_under_load_loses_no_idempotent_request() {
    let network = Network::start().await;
    network.register("sturdy", Limits::default()).await;
    let (a, b) = (test_service("a").await, test_service("b").await);
    let doomed = sidecar(&network, "sturdy", a, &[]).await;
    let _survivor = sidecar(&network, "sturdy", b, &[]).await;
    let front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/sturdy/tag").await;
    wait_for_instances(&front, "sturdy", 2).await;

    let failures = Arc::new(Mutex::new(Vec::new()));
    let served = Arc::new(AtomicUsize::new(0));
    let served_by_doomed = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let load = Duration::from_secs(8);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (addr, failures, served, served_by_doomed) = (
                front.ingress.clone(),
                Arc::clone(&failures),
                Arc::clone(&served),
                Arc::clone(&served_by_doomed),
            );
            tokio::spawn(async move {
                // Bounded in count and time.
                for _ in 0..20_000 {
                    if began.elapsed() > load {
                        return;
                    }
                    let (status, text) = get(&addr, "/sturdy/tag").await;
                    if status == StatusCode::OK {
                        served.fetch_add(1, Ordering::Relaxed);
                        if text == "a" {
                            served_by_doomed.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        failures.lock().unwrap().push(format!("{status}: {text}"));
                    }
                }
            })
        })
        .collect();
    // The doomed instance is serving its share when it is killed: the kill can lose requests.
    wait_until("the doomed instance serving under load", DEADLINE, || {
        std::future::ready(served_by_doomed.load(Ordering::Relaxed) >= 50)
    })
    .await;
    let mut doomed = doomed.process;
    doomed.child.start_kill().unwrap();
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(served.load(Ordering::Relaxed) > 100);
    let (status, text) = get(&front.ingress, "/sturdy/tag").await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "b"));
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_a_service_with_no_instance_wait_for_one_allocation() {
    // A real allocator (process runtime) that runs at most two instances.
    let network = Network::start().await;
    register_hello(&network, "on-demand").await;
    // An instance whose service never comes up: its sidecar is never advertised.
    let never = b"#!/bin/sh\nexec sleep 1000\n".to_vec();
    network
        .register_artifact(
            "phantom-service",
            never,
            vec!["never".into()],
            Limits::default(),
        )
        .await;
    network.register("refused-service", Limits::default()).await;
    let allocator = RealAllocator::start(&network, &["--max-instances", "2"]).await;
    let front = ingress(&network, &[]).await;

    let requests: Vec<_> = (0..20)
        .map(|_| {
            let addr = front.ingress.clone();
            tokio::spawn(async move { get(&addr, "/on-demand/").await })
        })
        .collect();
    for request in requests {
        let (status, text) = request.await.unwrap();
        assert_eq!((status, text.as_str()), (StatusCode::OK, "Hello, world\n"));
    }
    assert_eq!(
        allocator.asked().await,
        1.0,
        "one allocation for 20 waiting requests"
    );
    let text = metrics_of(&front).await;
    assert_eq!(
        metric(
            &text,
            "proxy_allocations_total{outcome=\"started\",reason=\"none\",service=\"on-demand\"}"
        ),
        Some(1.0),
        "{text}"
    );

    // An instance that never appears: the waiting requests get a 503 at their deadline; past
    // --max-waiting, the others get theirs at once.
    let impatient = ingress(&network, &["--instance-wait", "2s", "--max-waiting", "2"]).await;
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let addr = impatient.ingress.clone();
            tokio::spawn(async move { get(&addr, "/phantom-service/").await })
        })
        .collect();
    let (mut waited, mut turned_away) = (0, 0);
    for request in requests {
        let (status, text) = request.await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
        if text.contains("within 2s") {
            waited += 1;
        } else {
            assert!(text.contains("2 requests already wait"), "{text}");
            turned_away += 1;
        }
    }
    assert_eq!((waited, turned_away), (2, 3));

    // Two instances run: a third service is refused, and the allocator's reason reaches the
    // client.
    let (status, text) = get(&front.ingress, "/refused-service/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(text.contains("maximum of 2 instances"), "{text}");
    assert_eq!(allocator.starts("refused").await, 1.0);
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_over_the_soft_limit_is_used_until_a_nearer_one_answers() {
    let network = Network::start().await;
    // Its artifact is the hello-world server, which the allocator runs nearer; the far
    // instance is a test service (tag "far") whose sidecar advertises the same record.
    let record = register_hello(&network, "far-away").await;
    // The only instance is 30 ms away (over the default soft limit of 20 ms).
    let far = test_service("far").await;
    let (_far, _relay) =
        sidecar_behind_relay(&network, "far-away", far, Duration::from_millis(15)).await;
    // Findable before the ingress asks: else its first look could find nothing and ask the
    // allocator for an instance for want of any (not a nearer one).
    let key = record.instance_key();
    wait_until("the far instance is a provider", DEADLINE, || async {
        let mut found = network.lookup.find_providers(&key).await;
        tokio::time::timeout(Duration::from_secs(1), found.next())
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    let allocator = RealAllocator::start(&network, &[]).await;
    let front = ingress(&network, &[]).await;
    // The far instance serves (from its first answer on, which may start the nearer
    // allocation) while a nearer one starts, then the nearer one once it answers: wait for
    // 20 answers in a row from it; every request after the first answer must succeed.
    let mut far_served = 0;
    let mut in_a_row = 0;
    let give_up = Instant::now() + DEADLINE;
    while in_a_row < 20 {
        assert!(
            Instant::now() < give_up,
            "traffic never moved to the nearer instance"
        );
        let (status, tag) = get(&front.ingress, "/far-away/tag").await;
        if status != StatusCode::OK && far_served == 0 {
            // The far instance is not found yet.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{tag}");
        in_a_row = if tag == "Hello, world\n" {
            in_a_row + 1
        } else {
            0
        };
        far_served += usize::from(tag == "far");
    }
    assert!(
        far_served > 0,
        "the far instance served until the nearer one answered"
    );
    assert_eq!(allocator.asked().await, 1.0);
    let text = metrics_of(&front).await;
    assert_eq!(
        metric(
            &text,
            "proxy_allocations_total{outcome=\"started\",reason=\"nearer\",service=\"far-away\"}"
        ),
        Some(1.0),
        "{text}"
    );
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_private_network_the_data_plane_answers_nothing() {
    let network = Network::start_with_psk(Some("the right one")).await;
    network.register("guarded", Limits::default()).await;
    let service = test_service("a").await;
    let side = sidecar(&network, "guarded", service, &["--psk", "the right one"]).await;
    let front = ingress(&network, &["--psk", "the right one"]).await;
    wait_for_ok(&front.ingress, "/guarded/tag").await;

    let sidecar_peer = {
        let line = side.process.line_containing("proxy ", DEADLINE).await;
        line.split(' ').nth(1).unwrap().parse().unwrap()
    };
    for key in [
        None,
        Some(control::overlay::NetworkKey::from_passphrase("another one")),
    ] {
        let outsider = Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            Keypair::generate_ed25519(),
            key.as_ref().map(|k| *k.key_bytes()),
        )
        .unwrap();
        let attempt =
            tokio::time::timeout(DEADLINE, outsider.connect(sidecar_peer, side.quic)).await;
        assert!(
            matches!(attempt, Ok(Err(_))),
            "an outsider got a connection"
        );
    }
    // With the key, the same exchange works (so the refusals above are the key's doing).
    let insider = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        Keypair::generate_ed25519(),
        Some(*control::overlay::NetworkKey::from_passphrase("the right one").key_bytes()),
    )
    .unwrap();
    let connection = insider.connect(sidecar_peer, side.quic).await.unwrap();
    proxy::forward::probe(&connection).await.unwrap();
    // An ingress serves nothing over QUIC: even with the key, its endpoint takes no connection.
    let ingress_peer = {
        let line = front.process.line_containing("proxy ", DEADLINE).await;
        line.split(' ').nth(1).unwrap().parse().unwrap()
    };
    let attempt = tokio::time::timeout(DEADLINE, insider.connect(ingress_peer, front.quic)).await;
    assert!(
        matches!(attempt, Ok(Err(_))),
        "the ingress's data plane accepted a connection"
    );

    // Issue 16: an ingress given the wrong key fails before it listens, saying why; it never
    // accepts a client it cannot serve (it used to, for the 10-30 s its join took to fail).
    let mut wrong = Process::spawn(
        PROXY,
        &support::proxy_args(&network.boot_arg(), &["--psk", "not the right one", "0"]),
        &[("RUST_LOG", "warn")],
    );
    let pid = wrong.child.id().unwrap();
    let status = loop {
        if let Some(status) = wrong.child.try_wait().unwrap() {
            break status;
        }
        // The overlay's own listener (one, whose handshake needs the key) and nothing else:
        // no ingress, no /metrics.
        let listening: Vec<_> = support::sockets_of(pid)
            .into_iter()
            .filter(|(proto, _)| proto == "tcp")
            .collect();
        assert!(
            listening.len() <= 1,
            "listening before it joined: {listening:?}"
        );
        // Until it exits (or 20 ms pass, to look again).
        tokio::time::timeout(Duration::from_millis(20), wrong.child.wait())
            .await
            .ok();
    };
    assert!(!status.success());
    let stderr = wrong.stderr();
    assert!(stderr.contains(&network.boot_arg()), "{stderr}");
}

/// Issue 16: an ingress on loopback (`--listen-ip`'s default) listened on the overlay, and
/// served /metrics, on every interface: a user who asked for loopback was exposed.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_on_loopback_listens_on_loopback_alone() {
    let network = Network::start().await;
    let boot = network.boot_arg();
    let process = Process::spawn(
        PROXY,
        &["--bootstrap", &boot, "--ephemeral", "0"],
        &[("RUST_LOG", "warn")],
    );
    process.line_containing("ingress: http://", DEADLINE).await;
    let tcp: Vec<_> = support::sockets_of(process.child.id().unwrap())
        .into_iter()
        .filter(|(proto, _)| proto == "tcp")
        .collect();
    // The ingress, the overlay and /metrics. (Its one UDP socket, the data plane's, is on
    // every interface to reach other machines' instances, but takes no connection:
    // outside_the_private_network_the_data_plane_answers_nothing.)
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    assert!(
        tcp.iter().all(|(_, addr)| addr.starts_with("127.0.0.1:")),
        "{tcp:?}"
    );
}

/// The sidecar's positionals from the environment an allocator sets, and a service it starts
/// and supervises (Python's http.server stands in for a service binary here).
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_configured_by_environment_supervises_its_service() {
    let network = Network::start().await;
    network.register("py", Limits::default()).await;
    let service_port = free_port().to_string();
    let boot = network.boot_arg();
    let args = [
        "--bootstrap",
        &boot,
        "--ephemeral",
        "--quic-addr",
        "127.0.0.1:0",
        "--p2p-listen-addr",
        "127.0.0.1:0",
        "--prom-listen-addr",
        "127.0.0.1:0",
        "--",
        "python3",
        "-m",
        "http.server",
        "${SERVICE_PORT}",
        "--bind",
        "127.0.0.1",
    ];
    let env = [
        ("PROXY_PORT", "0"),
        ("SERVICE_NAME", "py"),
        ("PROXY_IP", "127.0.0.1"),
        ("SERVICE_PORT", service_port.as_str()),
        ("RUST_LOG", "warn"),
    ];
    let mut side = Process::spawn(PROXY, &args, &env);
    side.line_containing("data plane (QUIC)", DEADLINE).await;
    let front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/py/").await;

    // The service dies: so does its sidecar, saying why.
    let pgrep = |pattern: String| async move {
        let out = tokio::process::Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let pattern = format!("http.server {service_port}");
    let pid = pgrep(pattern.clone()).await;
    assert!(!pid.is_empty(), "the service runs");
    tokio::process::Command::new("kill")
        .arg(&pid)
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(DEADLINE, side.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success());
    assert!(
        side.stderr().contains("the service 'python3' exited"),
        "{}",
        side.stderr()
    );

    // SIGTERM to a sidecar stops its service too.
    let side = Process::spawn(PROXY, &args, &env);
    side.line_containing("data plane (QUIC)", DEADLINE).await;
    wait_until("the service started", DEADLINE, || {
        let pattern = pattern.clone();
        async move { !pgrep(pattern).await.is_empty() }
    })
    .await;
    assert!(side.terminate().await);
    wait_until("the service stopped", DEADLINE, || {
        let pattern = pattern.clone();
        async move { pgrep(pattern).await.is_empty() }
    })
    .await;
}

/// What an open-loop load of GETs saw: failures (status and text) and the slowest answer.
struct Load {
    failures: Vec<String>,
    slowest: Duration,
    served: usize,
}

impl Load {
    fn assert_none_failed(&self) {
        assert!(
            self.failures.is_empty(),
            "{} of {} failed: {:?}",
            self.failures.len(),
            self.failures.len() + self.served,
            &self.failures[..self.failures.len().min(5)]
        );
    }
}

/// GETs `path` through the ingress at `addr` at `rate` per second for `length`, each request
/// on its own task (so a slow answer does not hold the next one back).
async fn open_loop(addr: &str, path: &str, rate: u32, length: Duration) -> Load {
    let mut every = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut requests = tokio::task::JoinSet::new();
    // Bounded in count and time.
    for _ in 0..(rate as u64 * length.as_secs()).min(10_000) {
        every.tick().await;
        let (addr, path) = (addr.to_owned(), path.to_owned());
        requests.spawn(async move {
            let begin = Instant::now();
            let answer = tokio::time::timeout(DEADLINE, get(&addr, &path)).await;
            (begin.elapsed(), answer)
        });
    }
    let mut load = Load {
        failures: Vec::new(),
        slowest: Duration::ZERO,
        served: 0,
    };
    while let Some(done) = requests.join_next().await {
        let (took, answer) = done.unwrap();
        load.slowest = load.slowest.max(took);
        match answer {
            Ok((StatusCode::OK, _)) => load.served += 1,
            Ok((status, text)) => load.failures.push(format!("{status}: {text}")),
            Err(_) => load.failures.push(format!("no answer within {DEADLINE:?}")),
        }
    }
    load
}

fn signal(proxy: &Proxy, signal: &str) {
    let pid = proxy
        .process
        .child
        .id()
        .expect("the proxy runs")
        .to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// Issue 12's reproduction: one of two instances frozen for 4 s under 50 requests/s failed
/// 2 of 600 requests and held the slowest for 4.05 s (the QUIC idle timeout). Now the overdue
/// requests are sent to the other instance too, and the frozen one is declared dead within
/// about a second. Here: no request fails on real sockets; how long the slowest took is
/// asserted in virtual time and measured by `bench tiers` (the p99.9 against the hard limit).
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_instances_frozen_fails_no_request() {
    let network = Network::start().await;
    network.register("icy", Limits::default()).await;
    let (a, b) = (test_service("a").await, test_service("b").await);
    let frozen = sidecar(&network, "icy", a, &[]).await;
    // The other instance is a little further (5 ms each way), so that the one frozen has the
    // traffic when it freezes.
    let (_further, _relay) =
        sidecar_behind_relay(&network, "icy", b, Duration::from_millis(5)).await;
    let front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/icy/tag").await;
    wait_for_instances(&front, "icy", 2).await;

    let load = tokio::spawn({
        let addr = front.ingress.clone();
        async move { open_loop(&addr, "/icy/tag", 50, Duration::from_secs(7)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await; // load before the freeze, not a sync
    signal(&frozen, "-STOP");
    tokio::time::sleep(Duration::from_secs(4)).await; // the length of the freeze
    signal(&frozen, "-CONT");
    let thawed = Instant::now();
    let load = load.await.unwrap();
    load.assert_none_failed();
    // How long the slowest request took is measured where time can be trusted: in virtual
    // time (routing::tests::one_of_two_instances_frozen_fails_nothing_and_delays_nothing_
    // past_the_hard_limit) and by `bench tiers` in release; a loaded CI machine cannot.
    eprintln!("the slowest took {:?}", load.slowest);
    // Thawed, the nearer instance gets the traffic back.
    wait_until("the thawed instance answers again", DEADLINE, || {
        let addr = front.ingress.clone();
        async move { get(&addr, "/icy/tag").await.1 == "a" }
    })
    .await;
    eprintln!("back {:?} after the thaw", thawed.elapsed());
}

/// Issue 12's reproduction: with one instance's service killed and its sidecar left running,
/// 281 of 400 requests failed: the sidecar's fast 502 looked like the best instance. Now the
/// sidecar refuses (its service never saw the request), the request goes to the other
/// instance, and the dead one gets no more traffic.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_behind_a_live_sidecar_fails_no_idempotent_request() {
    let network = Network::start().await;
    network.register("halfdead", Limits::default()).await;
    let doomed = support::TestService::start("a", Duration::ZERO).await;
    let b = test_service("b").await;
    let _a = sidecar(&network, "halfdead", doomed.addr, &[]).await;
    let _b = sidecar(&network, "halfdead", b, &[]).await;
    let front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/halfdead/tag").await;
    wait_for_instances(&front, "halfdead", 2).await;

    let load = tokio::spawn({
        let addr = front.ingress.clone();
        async move { open_loop(&addr, "/halfdead/tag", 50, Duration::from_secs(8)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await; // load before the kill, not a sync
    doomed.kill();
    let load = load.await.unwrap();
    load.assert_none_failed();
    let (status, text) = get(&front.ingress, "/halfdead/tag").await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, "b"));
    let metrics = metrics_of(&front).await;
    assert!(
        metrics.contains("proxy_instance_service_down{instance="),
        "the dead service is reported: {metrics}"
    );
}

/// Issue 12's reproduction: a service answering in 150 ms made the ingress ask allocators
/// for "nearer" instances, its service time taken for network RTT. Now the choice uses the
/// network RTT alone, and the service time is reported apart.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_service_on_a_near_instance_asks_for_no_allocation() {
    let network = Network::start().await;
    network.register("sluggish", Limits::default()).await;
    let slow = support::TestService::start("slow", Duration::from_millis(150)).await;
    let allocator = RealAllocator::start(&network, &[]).await;
    let _sidecar = sidecar(&network, "sluggish", slow.addr, &[]).await;
    let front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/sluggish/tag").await;
    let load = open_loop(&front.ingress, "/sluggish/tag", 10, Duration::from_secs(5)).await;
    assert!(load.failures.is_empty(), "{:?}", load.failures);
    assert_eq!(allocator.asked().await, 0.0, "no allocation was asked for");
    let metrics = metrics_of(&front).await;
    assert!(
        !metrics.contains("proxy_allocations_total{"),
        "no allocation counted: {metrics}"
    );
    // The median of an instance's series of `name` (there is one instance).
    let median = |name: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!("{name}{{"))
                    && l.contains("quantile=\"0.5\",service=\"sluggish\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} is exported: {metrics}"))
    };
    let service_time = median("proxy_instance_service_time_seconds");
    assert!(
        (0.14..0.5).contains(&service_time),
        "median service time {service_time}"
    );
    let rtt = median("proxy_instance_rtt_seconds");
    assert!(rtt < 0.1, "median network RTT {rtt}");
}

/// Issue 12's reproduction: a second service registered with the first one's artifact was
/// answered by the first one's instances. Each is now found by a key of its own.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_with_one_artifact_each_get_only_their_own_instances() {
    let network = Network::start().await;
    let artifact = b"one executable, two services".to_vec();
    for (name, flag) in [("twin-a", "--a"), ("twin-b", "--b")] {
        let command = vec!["twin".to_owned(), flag.to_owned()];
        network
            .register_artifact(name, artifact.clone(), command, Limits::default())
            .await;
    }
    let (a, b) = (test_service("a").await, test_service("b").await);
    let _a = sidecar(&network, "twin-a", a, &[]).await;
    let _b = sidecar(&network, "twin-b", b, &[]).await;
    let front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/twin-a/tag").await;
    wait_for_ok(&front.ingress, "/twin-b/tag").await;
    for _ in 0..20 {
        assert_eq!(get(&front.ingress, "/twin-a/tag").await.1, "a");
        assert_eq!(get(&front.ingress, "/twin-b/tag").await.1, "b");
    }
}

/// Issue 12's reproduction: a malformed chunked body was answered 502 "instance failed" and
/// counted against the instance. It is the client's fault: 400, and the instance keeps
/// serving.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_body_is_the_clients_fault() {
    let network = Network::start().await;
    network.register("strict", Limits::default()).await;
    let _sidecar = sidecar(&network, "strict", test_service("s").await, &[]).await;
    let front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/strict/tag").await;
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(&front.ingress)
            .await
            .unwrap();
        stream
            .write_all(
                b"POST /strict/drain HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
                  5\r\nhello\r\nzz-not-a-chunk-size\r\n\r\n",
            )
            .await
            .unwrap();
        let answer = read_until_closed(&mut stream).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    let metrics = metrics_of(&front).await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("proxy_instance_ejected{") && l.ends_with(" 1")),
        "the instance is not ejected: {metrics}"
    );
    assert_eq!(get(&front.ingress, "/strict/tag").await.1, "s");
}

/// A service that reads each request's head and then hangs up without answering, counting
/// the requests it got: a service that crashes mid-request, after it has the request.
async fn hang_up_service(received: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let received = Arc::clone(&received);
            tokio::spawn(async move {
                if read_request_head(&mut stream).await.is_none() {
                    return;
                }
                received.fetch_add(1, Ordering::SeqCst);
                // Dropped: the connection closes with no response.
            });
        }
    });
    addr
}

/// Issue 16: a request that is not idempotent and fails after its service got it is answered
/// 502 and never sent again (a second instance would run it twice); an idempotent one that
/// fails the same way is tried again elsewhere, but at most perf.conf's `max-attempts` (3)
/// times in all: it used to go back and forth between the two instances until the whole
/// proxy's retry budget was spent (11 tries), leaving none for other requests.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_idempotent_request_that_fails_after_sending_is_not_retried() {
    let network = Network::start().await;
    network.register("crashy", Limits::default()).await;
    let received = Arc::new(AtomicUsize::new(0));
    let _a = sidecar(
        &network,
        "crashy",
        hang_up_service(Arc::clone(&received)).await,
        &[],
    )
    .await;
    let _b = sidecar(
        &network,
        "crashy",
        hang_up_service(Arc::clone(&received)).await,
        &[],
    )
    .await;
    let front = ingress(&network, &[]).await;
    let retries = |outcome: &'static str| {
        let front = &front;
        async move {
            let text = metrics_of(front).await;
            let series = format!("proxy_retries_total{{outcome=\"{outcome}\",service=\"crashy\"}}");
            metric(&text, &series).unwrap_or(0.0)
        }
    };

    // Idempotent: three tries, then 502.
    let (status, _) = get(&front.ingress, "/crashy/order").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(received.load(Ordering::SeqCst), 3, "max-attempts tries");
    assert_eq!(retries("taken").await, 2.0);
    assert_eq!(retries("max_attempts").await, 1.0);
    assert_eq!(retries("over_budget").await, 0.0);

    // Not idempotent: one try, then 502.
    received.store(0, Ordering::SeqCst);
    let post = Request::post(format!("http://{}/crashy/order", front.ingress))
        .body(body("one order"))
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, http1_client().request(post))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(received.load(Ordering::SeqCst), 1, "the POST ran once");
    assert_eq!(retries("taken").await, 2.0, "no retry");
}

/// Issue 16: on SIGTERM the ingress stops accepting but finishes the requests in flight
/// (within its 5 s grace), then exits cleanly.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish() {
    let network = Network::start().await;
    network.register("lingering", Limits::default()).await;
    let slow = support::TestService::start("slow", Duration::from_secs(2)).await;
    let _sidecar = sidecar(&network, "lingering", slow.addr, &[]).await;
    let mut front = ingress(&network, &[]).await;
    wait_for_ok(&front.ingress, "/lingering/tag").await;

    let request = tokio::spawn({
        let addr = front.ingress.clone();
        async move { get(&addr, "/lingering/tag").await }
    });
    wait_until("the request in flight", DEADLINE, || async {
        metrics_of(&front).await.lines().any(|line| {
            line.starts_with("proxy_instance_in_flight{")
                && line.contains("service=\"lingering\"")
                && line.ends_with(" 1")
        })
    })
    .await;
    signal(&front, "-TERM");
    let (status, text) = request.await.unwrap();
    assert_eq!((status, text.as_str()), (StatusCode::OK, "slow"));
    let exit = tokio::time::timeout(DEADLINE, front.process.child.wait())
        .await
        .expect("it exits after its requests")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// Issue 16: one client address holds at most `--max-client-connections` connections; one
/// more is answered 503 and closed, and counted; once one closes, the next is served.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_more_than_its_connections() {
    let network = Network::start().await;
    let front = ingress(&network, &["--max-client-connections", "2"]).await;
    let first = tokio::net::TcpStream::connect(&front.ingress)
        .await
        .unwrap();
    let _second = tokio::net::TcpStream::connect(&front.ingress)
        .await
        .unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    // Connections are accepted in order: the third is the one over the limit.
    let hits = || async {
        let text = metrics_of(&front).await;
        metric(
            &text,
            "proxy_limit_hits_total{limit=\"client_connections\"}",
        )
        .unwrap_or(0.0)
    };
    let mut third = tokio::net::TcpStream::connect(&front.ingress)
        .await
        .unwrap();
    third.write_all(request).await.ok();
    let answer = String::from_utf8_lossy(&read_until_closed(&mut third).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too many connections"), "{answer}");
    assert_eq!(hits().await, 1.0);

    drop(first);
    wait_until("a connection admitted again", DEADLINE, || async {
        let mut next = tokio::net::TcpStream::connect(&front.ingress)
            .await
            .unwrap();
        next.write_all(request).await.ok();
        let answer = String::from_utf8_lossy(&read_until_closed(&mut next).await).into_owned();
        // Admitted, it is answered for what it asked: no service in the path.
        answer.starts_with("HTTP/1.1 400")
    })
    .await;
}
