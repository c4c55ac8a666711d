//! gRPC and HTTP/2 services through both proxies (issue 17): a tonic client and a tonic service
//! (testkit-grpc), the client speaking h2c to the ingress, the sidecar speaking h2c to its
//! service, as real processes on loopback. The client reaches the service under
//! `/<service>/`, as every request through the ingress does (tonic's `with_origin`).

mod support;

use std::{sync::atomic::Ordering, time::Duration};

use control::lookup::Limits;
use support::*;
use testkit_grpc::{TalkClient, Word};
use tokio_stream::StreamExt;
use tonic::{Code, Request, transport::Channel};

const DEADLINE: Duration = Duration::from_secs(30);

/// A client of the service `name` through the ingress at `ingress`, once the service answers
/// (before its instance is found the ingress answers 503, which tonic reads as Unavailable).
async fn client(ingress: &str, name: &str) -> TalkClient<Channel> {
    let channel = Channel::from_shared(format!("http://{ingress}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let origin = format!("http://{ingress}/{name}").parse().unwrap();
    let mut client = TalkClient::with_origin(channel, origin);
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        let hello = Word {
            text: "hello".into(),
            ..Word::default()
        };
        match client.echo(hello).await {
            Ok(_) => return client,
            Err(status) if tokio::time::Instant::now() < give_up => {
                assert_eq!(status.code(), Code::Unavailable, "{status}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("the service never answered: {status}"),
        }
    }
}

fn word(text: &str) -> Word {
    Word {
        text: text.into(),
        ..Word::default()
    }
}

/// A gRPC service behind a sidecar started with `protocol` (none: undeclared) as `name`.
async fn grpc_sidecar(
    network: &Network,
    name: &str,
    protocol: Option<&str>,
) -> (Proxy, std::sync::Arc<testkit_grpc::Seen>) {
    network.register(name, Limits::default()).await;
    let (service, seen) = testkit_grpc::serve().await.unwrap();
    let upstream = service.to_string();
    let mut args = vec!["--quic-addr", "127.0.0.1:0"];
    if let Some(protocol) = protocol {
        args.extend(["--protocol", protocol]);
    }
    args.extend(["0", name, &upstream]);
    (start_proxy(network, &args).await, seen)
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_of_every_kind_cross_both_proxies() {
    let network = Network::start().await;
    let (_sidecar, seen) = grpc_sidecar(&network, "talk", Some("h2c")).await;
    let ingress = start_proxy(&network, &["0"]).await;
    let mut client = client(&ingress.ingress, "talk").await;

    // Unary, and an error status with its message (a trailers-only answer).
    let answer = client.echo(word("unary")).await.unwrap().into_inner();
    assert_eq!(answer.text, "unary");
    let failing = Word {
        status: Code::NotFound as u32,
        ..word("x")
    };
    let status = client.echo(failing).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status}");
    assert_eq!(status.message(), "asked for status 5");

    // Server streaming: every message, in order.
    let many = Word {
        count: 1000,
        ..word("w")
    };
    let stream = client.repeat(many).await.unwrap().into_inner();
    let texts: Vec<String> = stream.map(|w| w.unwrap().text).collect().await;
    let expected: Vec<String> = (0..1000).map(|i| format!("w {i}")).collect();
    assert_eq!(texts, expected);

    // Client streaming.
    let words = tokio_stream::iter((0..1000).map(|i| word(&i.to_string())));
    let gathered = client.gather(words).await.unwrap().into_inner();
    assert_eq!(gathered.count, 1000);
    assert!(gathered.text.starts_with("0 1 2 ") && gathered.text.ends_with(" 998 999"));

    // Bidirectional, in lockstep: each message's answer arrives before the next is sent, so
    // neither proxy holds a message back waiting for more.
    let (out, outgoing) = tokio::sync::mpsc::channel(1);
    let mut answers = client
        .chat(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .unwrap()
        .into_inner();
    for i in 0..100 {
        out.send(word(&format!("m{i}"))).await.unwrap();
        let answer = answers.next().await.expect("an answer").unwrap();
        assert_eq!(answer.text, format!("m{i}"));
    }
    drop(out);
    assert!(
        answers.next().await.is_none(),
        "the call ends when the client's side does"
    );

    // A deadline carried as grpc-timeout: the service gives up on the call at its expiry.
    let slow = Word {
        wait_ms: 10_000,
        ..word("slow")
    };
    let mut request = Request::new(slow.clone());
    request.set_timeout(Duration::from_millis(300));
    let status = client.echo(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status}"
    );
    wait_until("the service to drop the expired call", DEADLINE, || async {
        seen.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;

    // A call the client cancels (RST_STREAM at the ingress) is cancelled at the service.
    let started = seen.started();
    let mut cancelling = client.clone();
    let call = tokio::spawn(async move { cancelling.echo(slow).await });
    wait_until("the slow call to reach the service", DEADLINE, || async {
        seen.started() > started
    })
    .await;
    call.abort();
    wait_until(
        "the service to see the call cancelled",
        DEADLINE,
        || async { seen.cancelled() == 2 },
    )
    .await;
}

/// A gRPC service whose sidecar was told nothing of its protocol (HTTP/1.1 by default) is
/// reached too: gRPC calls go over HTTP/2 whatever the declaration.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_grpc_service_is_reached_over_http2() {
    let network = Network::start().await;
    let (_sidecar, _) = grpc_sidecar(&network, "plain", None).await;
    let ingress = start_proxy(&network, &["0"]).await;
    let mut client = client(&ingress.ingress, "plain").await;
    let many = Word {
        count: 10,
        ..word("w")
    };
    let stream = client.repeat(many).await.unwrap().into_inner();
    assert_eq!(stream.collect::<Vec<_>>().await.len(), 10);
}

/// A service that speaks HTTP/2 only (h2c, prior knowledge): every answer says so.
async fn h2_only_service() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let answer = hyper::service::service_fn(|_request| async {
                    let body = http_body_util::Full::new(bytes::Bytes::from_static(b"in h2"));
                    Ok::<_, std::convert::Infallible>(http::Response::new(body))
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let executor = hyper_util::rt::TokioExecutor::new();
                let _ = hyper::server::conn::http2::Builder::new(executor)
                    .serve_connection(io, answer)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/2-only service registered without a protocol is reached by a client that speaks
/// HTTP/2 to the ingress: the sidecar sees the client's protocol in the ingress's `Via` and
/// finds the service speaks h2c.
#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeclared_http2_only_service_is_reached_by_http2_clients() {
    use http_body_util::BodyExt;

    let network = Network::start().await;
    network.register("h2only", Limits::default()).await;
    let service = h2_only_service().await.to_string();
    let _sidecar = start_proxy(
        &network,
        &["--quic-addr", "127.0.0.1:0", "0", "h2only", &service],
    )
    .await;
    let ingress = start_proxy(&network, &["0"]).await;
    let uri: http::Uri = format!("http://{}/h2only/x", ingress.ingress)
        .parse()
        .unwrap();
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        let request = http::Request::get(uri.clone()).body(body("")).unwrap();
        let response = h2c_client().request(request).await.unwrap();
        let status = response.status();
        let text = response.into_body().collect().await.unwrap().to_bytes();
        if status == http::StatusCode::OK {
            assert_eq!(&text[..], b"in h2");
            break;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "still {status}: {}",
            String::from_utf8_lossy(&text)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
