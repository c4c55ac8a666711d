//! `echoserver PORT`: a second example service, to show baking a service other than hello
//! world (sidecar-image/examples/echo). Answers every request with its method and path, e.g.
//! "GET /hi", on 0.0.0.0:PORT (HTTP/1.1); exits on SIGINT or SIGTERM.

use std::process::ExitCode;

use bytes::Bytes;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    helloworld::serve("echoserver", |request| {
        Bytes::from(format!("{} {}", request.method(), request.uri().path()))
    })
    .await
}
