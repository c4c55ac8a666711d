//! Upgrades through both proxies (issue 17): a real WebSocket client and server
//! (tokio-tungstenite) talking through ingress -> QUIC -> sidecar, as real processes on
//! loopback.

mod support;

use std::{net::SocketAddr, time::Duration};

use control::lookup::Limits;
use futures::{SinkExt, StreamExt};
use http::StatusCode;
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        Error as WsError, Message,
        handshake::server::{ErrorResponse, Request, Response},
    },
};

const DEADLINE: Duration = Duration::from_secs(30);
/// Messages each side sends in the exchange.
const MESSAGES: usize = 10_000;

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket service: on `/talk` it sends [`MESSAGES`] messages while echoing back the count
/// of what it received in order (the last message it sends is "got N"); on `/hang-up` it
/// closes at once; anything else is refused with 403 and a body saying so.
async fn websocket_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_websocket(stream));
        }
    });
    addr
}

// tungstenite's handshake callback returns its own large error type.
#[allow(clippy::result_large_err)]
async fn serve_websocket(stream: TcpStream) {
    let mut path = String::new();
    let callback = |request: &Request, response: Response| {
        path = request.uri().path().to_owned();
        if path == "/talk" || path == "/hang-up" {
            Ok(response)
        } else {
            let mut refusal = ErrorResponse::new(Some("no websockets here".into()));
            *refusal.status_mut() = StatusCode::FORBIDDEN;
            // With its length: tungstenite's client reads a refusal's body as it comes, and
            // without one the ingress would chunk it.
            refusal
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, "18".parse().unwrap());
            Err(refusal)
        }
    };
    let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    if path == "/hang-up" {
        let _ = socket.close(None).await;
        // Drains until the client's answer to the close.
        while let Some(Ok(_)) = socket.next().await {}
        return;
    }
    let (mut out, mut incoming) = socket.split();
    let send = async {
        for i in 0..MESSAGES {
            out.send(Message::text(format!("s{i}"))).await?;
        }
        Ok::<_, WsError>(out)
    };
    let receive = async {
        let mut got = 0;
        while let Some(message) = incoming.next().await {
            match message? {
                Message::Text(text) if text.as_str() == format!("c{got}") => got += 1,
                Message::Text(text) => panic!("message {got} came as {text}"),
                Message::Close(_) => break,
                _ => {}
            }
            if got == MESSAGES {
                break;
            }
        }
        Ok::<_, WsError>((got, incoming))
    };
    let Ok((mut out, (got, mut incoming))) = futures::try_join!(send, receive) else {
        return;
    };
    let _ = out.send(Message::text(format!("got {got}"))).await;
    // The client closes: its close frame arrives, the answer goes back, the stream ends.
    while let Some(Ok(message)) = incoming.next().await {
        if message.is_close() {
            break;
        }
    }
    let mut socket = out.reunite(incoming).unwrap();
    let _ = socket.close(None).await;
    while let Some(Ok(_)) = socket.next().await {}
}

/// Connects to `path` through the ingress once the service is found (before, the ingress
/// answers 503).
async fn connect(ingress: &str, path: &str) -> Result<Client, WsError> {
    let url = format!("ws://{ingress}{path}");
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio_tungstenite::connect_async(&url).await {
            Err(WsError::Http(response))
                if response.status() == StatusCode::SERVICE_UNAVAILABLE
                    && tokio::time::Instant::now() < give_up =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            result => return result.map(|(client, _)| client),
        }
    }
}

async fn metric_of(proxy: &Proxy, series: &str) -> f64 {
    let text = http_get(&proxy.metrics, "/metrics").await.unwrap().1;
    metric(&text, series).unwrap_or(0.0)
}

#[testkit::deadline_test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_cross_both_proxies_both_ways_and_either_side_can_close() {
    let network = Network::start().await;
    network.register("chat", Limits::default()).await;
    let service = websocket_service().await;
    let upstream = service.to_string();
    let sidecar = start_proxy(
        &network,
        &["--quic-addr", "127.0.0.1:0", "0", "chat", &upstream],
    )
    .await;
    let ingress = start_proxy(&network, &["0"]).await;

    // 10,000 messages each way at once, in order; then the client closes and the service's
    // close comes back through both proxies.
    let client = connect(&ingress.ingress, "/chat/talk").await.unwrap();
    let (mut out, mut incoming) = client.split();
    let send = async {
        for i in 0..MESSAGES {
            out.send(Message::text(format!("c{i}"))).await.unwrap();
        }
    };
    let receive = async {
        let mut got = 0;
        while got < MESSAGES {
            let message = incoming
                .next()
                .await
                .expect("the stream ended early")
                .unwrap();
            if let Message::Text(text) = message {
                assert_eq!(text.as_str(), format!("s{got}"), "in order");
                got += 1;
            }
        }
    };
    tokio::join!(send, receive);
    let last = incoming.next().await.unwrap().unwrap();
    assert_eq!(last, Message::text(format!("got {MESSAGES}")));
    let mut client = out.reunite(incoming).unwrap();
    client.close(None).await.unwrap();
    loop {
        match client.next().await {
            Some(Ok(message)) if message.is_close() => {}
            Some(Ok(other)) => panic!("after closing, {other:?}"),
            // The service's close came back and the connection ended.
            None | Some(Err(WsError::ConnectionClosed)) => break,
            Some(Err(error)) => panic!("closing: {error}"),
        }
    }
    // The client's socket closes too: the last direction ends.
    drop(client);

    // The service closes first: the client hears it.
    let mut client = connect(&ingress.ingress, "/chat/hang-up").await.unwrap();
    let message = client.next().await.expect("a close").unwrap();
    assert!(message.is_close(), "{message:?}");
    assert!(
        matches!(
            client.next().await,
            None | Some(Err(WsError::ConnectionClosed))
        ),
        "the connection ends after the close handshake"
    );
    drop(client);

    // A refused upgrade is the service's own answer.
    match connect(&ingress.ingress, "/chat/elsewhere").await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            let body = response.body().as_deref().unwrap_or_default();
            assert_eq!(String::from_utf8_lossy(body), "no websockets here");
        }
        Ok(_) => panic!("the upgrade was refused by the service"),
        Err(error) => panic!("refused upgrade: {error}"),
    }

    for (proxy, role) in [(&ingress, "ingress"), (&sidecar, "sidecar")] {
        let upgrades =
            |outcome| format!("proxy_upgrades_total{{outcome=\"{outcome}\",role=\"{role}\"}}");
        assert_eq!(metric_of(proxy, &upgrades("switched")).await, 2.0, "{role}");
        assert_eq!(metric_of(proxy, &upgrades("refused")).await, 1.0, "{role}");
        let open = format!("proxy_upgraded_streams{{role=\"{role}\"}}");
        wait_until("the upgraded streams to be closed", DEADLINE, || async {
            metric_of(proxy, &open).await == 0.0
        })
        .await;
    }
    let to_service = "proxy_upgraded_bytes_total{direction=\"to_service\",role=\"ingress\"}";
    assert!(metric_of(&ingress, to_service).await >= (MESSAGES * 6) as f64);
}
