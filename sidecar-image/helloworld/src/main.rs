//! `helloworldserver PORT`: the example service. Answers every request with "Hello, world"
//! on 0.0.0.0:PORT (HTTP/1.1), as the original demo did; exits on SIGINT or SIGTERM.

use std::process::ExitCode;

use bytes::Bytes;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    helloworld::serve("helloworldserver", |_| {
        Bytes::from_static(b"Hello, world\n")
    })
    .await
}
