//! The example services' one server loop: `NAME PORT` on the command line, HTTP/1.1 on
//! 0.0.0.0:PORT, every request answered by `respond`, exit on SIGINT or SIGTERM.
#![warn(missing_docs)]

use std::{convert::Infallible, net::SocketAddr, process::ExitCode};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

/// Serves until a signal; `name` is the program's, for messages.
pub async fn serve(name: &str, respond: fn(&Request<Incoming>) -> Bytes) -> ExitCode {
    let usage = format!("usage: {name} PORT");
    let mut args = std::env::args().skip(1);
    let (Some(port), None) = (args.next(), args.next()) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Ok(port) = port.parse::<u16>() else {
        eprintln!("{name}: '{port}' is not a port\n{usage}");
        return ExitCode::from(2);
    };
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("{name}: cannot listen on {addr}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                tokio::spawn(async move {
                    let service = service_fn(|request: Request<Incoming>| async move {
                        Ok::<_, Infallible>(Response::new(Full::new(respond(&request))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
            _ = term.recv() => return ExitCode::SUCCESS,
        }
    }
}
