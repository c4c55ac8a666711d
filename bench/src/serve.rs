//! The service behind the proxies in the data-plane scenarios. It runs as its own process (the
//! hidden `bench serve` subcommand, started by [`start`]) so that it shares no runtime with
//! the load generator: HTTP/1.1 on loopback, `GET /bytes/<N>` streams N bytes, `POST /drain`
//! reads the whole body and answers its length, anything else gets a 1 KiB body.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{
    body::{FILLER, chunked_body, drain},
    procs::{Process, spawn_reading},
};

#[derive(clap::Args)]
pub struct Args {
    /// Port on 127.0.0.1; 0 takes a free one. The address is printed as `listening: ADDR`.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// How long every answer takes (a slow service).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: std::time::Duration,
}

/// Body of every request that is neither a stream nor an upload.
const SMALL_BODY: usize = 1024;

type Body = BoxBody<Bytes, Infallible>;

async fn handle(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let text = |status, text: String| {
        let mut response = Response::new(Full::new(Bytes::from(text)).boxed());
        *response.status_mut() = status;
        response
    };
    let stream_length = request
        .uri()
        .path()
        .strip_prefix("/bytes/")
        .map(str::parse::<u64>);
    Ok(match (request.method(), stream_length) {
        (&Method::GET, Some(Ok(total))) => Response::new(chunked_body(total).boxed()),
        (_, Some(Err(e))) => text(StatusCode::BAD_REQUEST, format!("bad length: {e}\n")),
        (&Method::POST, None) if request.uri().path() == "/drain" => {
            match drain(request.into_body()).await {
                Ok(received) => text(StatusCode::OK, received.to_string()),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("body: {e}\n")),
            }
        }
        _ => Response::new(Full::new(Bytes::from_static(&FILLER[..SMALL_BODY])).boxed()),
    })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, args.port)).await?;
    println!("listening: {}", listener.local_addr()?);
    let delay = args.delay;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let service = service_fn(move |request| async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                handle(request).await
            });
            // A connection error only ends that connection.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Starts the service as a child process of this benchmark; returns it and its address.
pub async fn start() -> anyhow::Result<(Process, SocketAddr)> {
    start_on(0).await
}

/// Starts the service on `port` of 127.0.0.1 (0: any free one).
pub async fn start_on(port: u16) -> anyhow::Result<(Process, SocketAddr)> {
    let port = port.to_string();
    spawn_reading(
        &std::env::current_exe()?,
        &["serve", "--port", &port],
        |line| line.strip_prefix("listening: ")?.parse().ok(),
    )
    .await
}
