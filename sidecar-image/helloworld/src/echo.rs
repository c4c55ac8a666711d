//! `echoserver PORT`: a second example service, to show baking a service other than hello
//! world (sidecar-image/examples/echo). Answers every request with its method and path, e.g.
//! "GET /hi", on 0.0.0.0:PORT (HTTP/1.1); exits on SIGINT or SIGTERM.

use std::{convert::Infallible, net::SocketAddr, process::ExitCode};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

const USAGE: &str = "usage: echoserver PORT";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(port), None) = (args.next(), args.next()) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let Ok(port) = port.parse::<u16>() else {
        eprintln!("echoserver: '{port}' is not a port\n{USAGE}");
        return ExitCode::from(2);
    };
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("echoserver: cannot listen on {addr}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                tokio::spawn(async move {
                    let echo = service_fn(|request: Request<Incoming>| async move {
                        let line = format!("{} {}", request.method(), request.uri().path());
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(line))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), echo)
                        .await;
                });
            }
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            _ = term.recv() => return ExitCode::SUCCESS,
        }
    }
}
