//! The small HTTP server of every long-running binary: Prometheus `/metrics` plus a few JSON
//! routes (`/peers` on the ping-monitor). Plain HTTP/1.1, no body buffering concerns: answers
//! are generated in memory and small.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

/// A route's handler: builds the content type and body at request time.
pub type Handler = Arc<dyn Fn() -> BoxFuture<'static, (&'static str, String)> + Send + Sync>;

/// Binds the metrics address without listening yet: the port is taken (a port in use fails
/// here, before anything else starts), but no client is accepted until [`listen`], once
/// there is something to answer it with.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind`: a restarted daemon may listen again at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Starts listening on a socket [`bind`] bound.
pub fn listen(socket: TcpSocket) -> std::io::Result<TcpListener> {
    socket.listen(1024)
}

/// Serves `/metrics` from `registry` and the extra `routes` until `shutdown` is cancelled.
pub fn spawn(
    listener: TcpListener,
    registry: Registry,
    routes: Vec<(&'static str, Handler)>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut table: HashMap<&'static str, Handler> = routes.into_iter().collect();
    table.insert(
        "/metrics",
        Arc::new(move || {
            let mut text = Vec::new();
            // Encoding our own well-formed families cannot fail.
            let _ = TextEncoder::new().encode(&registry.gather(), &mut text);
            let text = String::from_utf8_lossy(&text).into_owned();
            futures::future::ready((prometheus::TEXT_FORMAT, text)).boxed()
        }),
    );
    let table = Arc::new(table);
    tokio::spawn(accept_until(
        listener,
        shutdown,
        "metrics endpoint",
        move |stream, _| {
            let table = Arc::clone(&table);
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let table = Arc::clone(&table);
                async move { Ok::<_, Infallible>(answer(&table, &request).await) }
            });
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "metrics connection failed");
                }
            });
        },
    ))
}

/// Accepts connections on `listener` until `shutdown`, handing each (with the client's
/// address) to `on_connection`, which is expected to spawn whatever serves it. `what` names
/// the listener in logs.
pub async fn accept_until(
    listener: TcpListener,
    shutdown: CancellationToken,
    what: &'static str,
    mut on_connection: impl FnMut(tokio::net::TcpStream, std::net::SocketAddr),
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => on_connection(stream, client),
                Err(error) => tracing::warn!(%error, "{what} accept failed"),
            },
            () = shutdown.cancelled() => return,
        }
    }
}

async fn answer<B>(
    table: &HashMap<&'static str, Handler>,
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(format!("{text}\n"))))
            .expect("static response is valid")
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
    }
    match table.get(request.uri().path()) {
        Some(handler) => {
            let (content_type, body) = handler().await;
            Response::builder()
                .header(header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("handler response is valid")
        }
        None => {
            let mut paths: Vec<_> = table.keys().copied().collect();
            paths.sort_unstable();
            plain(
                StatusCode::NOT_FOUND,
                &format!("not found; try {}", paths.join(", ")),
            )
        }
    }
}
