//! The service behind the proxies in the data-plane scenarios. It runs as its own process (the
//! hidden `bench serve` subcommand, started by [`start`]) so that it shares no runtime with
//! the load generator: HTTP/1.1 on loopback, `GET /bytes/<N>` streams N bytes, `POST /drain`
//! reads the whole body and answers its length, anything else gets a 1 KiB body.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
};

use anyhow::Context;
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
    /// Port; 0 takes a free one. The address is printed as `listening: ADDR`.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Address to listen on (an instance's sidecar reaches its service at `$PROXY_IP`).
    #[arg(long, default_value_t = Ipv4Addr::LOCALHOST)]
    host: Ipv4Addr,
    /// How long every answer takes (a slow service).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: std::time::Duration,
    /// Sent back as `x-served-by` on every answer, so that a client can tell which instance
    /// answered.
    #[arg(long)]
    tag: Option<String>,
}

/// The header that carries `--tag`.
pub const SERVED_BY: &str = "x-served-by";

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
    let listener = TcpListener::bind((args.host, args.port)).await?;
    println!("listening: {}", listener.local_addr()?);
    let delay = args.delay;
    let tag = args
        .tag
        .map(|tag| http::HeaderValue::try_from(tag).context("--tag"))
        .transpose()?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let tag = tag.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let tag = tag.clone();
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let mut response = handle(request).await?;
                    if let Some(tag) = tag {
                        response.headers_mut().insert(SERVED_BY, tag);
                    }
                    Ok::<_, Infallible>(response)
                }
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
