//! A gRPC service with one call of each kind (proto/talk.proto), served by tonic over h2c,
//! and its client: what the tests and benchmarks put behind a sidecar to show that gRPC
//! crosses both proxies (issue 17). It counts the calls it started and those cancelled
//! before they ended (the client went away, or the deadline passed), as a service would see.
#![warn(missing_docs)]

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Code, Request, Response, Status, Streaming};

/// The generated messages, client and server of proto/talk.proto.
#[allow(missing_docs)]
pub mod talk {
    tonic::include_proto!("talk");
}

pub use talk::{Word, talk_client::TalkClient};

/// What the service has seen.
#[derive(Debug, Default)]
pub struct Seen {
    /// Calls started (any kind).
    pub started: AtomicUsize,
    /// Unary calls dropped before they ended: cancelled by the client or its deadline.
    pub cancelled: AtomicUsize,
}

impl Seen {
    /// Calls started so far.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Unary calls cancelled so far.
    pub fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }
}

/// Serves the Talk service over h2c on a new port of 127.0.0.1 until the runtime ends.
/// Returns its address and what it sees.
pub async fn serve() -> std::io::Result<(SocketAddr, Arc<Seen>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Seen::default());
    let service = talk::talk_server::TalkServer::new(Service {
        seen: Arc::clone(&seen),
    });
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming),
    );
    Ok((addr, seen))
}

struct Service {
    seen: Arc<Seen>,
}

/// Counts a unary call cancelled if dropped before [`Unfinished::done`].
struct Unfinished<'a>(Option<&'a AtomicUsize>);

impl Unfinished<'_> {
    fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(cancelled) = self.0 {
            cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type Words = Pin<Box<dyn Stream<Item = Result<Word, Status>> + Send>>;

#[tonic::async_trait]
impl talk::talk_server::Talk for Service {
    async fn echo(&self, request: Request<Word>) -> Result<Response<Word>, Status> {
        self.seen.started.fetch_add(1, Ordering::SeqCst);
        let unfinished = Unfinished(Some(&self.seen.cancelled));
        let word = request.into_inner();
        if word.wait_ms > 0 {
            tokio::time::sleep(Duration::from_millis(word.wait_ms.into())).await;
        }
        unfinished.done();
        if word.status != 0 {
            let code = Code::from_i32(word.status as i32);
            return Err(Status::new(
                code,
                format!("asked for status {}", word.status),
            ));
        }
        Ok(Response::new(word))
    }

    type RepeatStream = Words;

    async fn repeat(&self, request: Request<Word>) -> Result<Response<Words>, Status> {
        self.seen.started.fetch_add(1, Ordering::SeqCst);
        let word = request.into_inner();
        let words = (0..word.count).map(move |i| {
            Ok(Word {
                text: format!("{} {i}", word.text),
                ..Word::default()
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(words))))
    }

    async fn gather(&self, request: Request<Streaming<Word>>) -> Result<Response<Word>, Status> {
        self.seen.started.fetch_add(1, Ordering::SeqCst);
        let mut words = request.into_inner();
        let mut texts = Vec::new();
        while let Some(word) = words.next().await {
            texts.push(word?.text);
        }
        Ok(Response::new(Word {
            text: texts.join(" "),
            count: texts.len() as u32,
            ..Word::default()
        }))
    }

    type ChatStream = Words;

    async fn chat(&self, request: Request<Streaming<Word>>) -> Result<Response<Words>, Status> {
        self.seen.started.fetch_add(1, Ordering::SeqCst);
        let mut words = request.into_inner();
        let (out, back) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(word) = words.next().await {
                if out.send(word).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(back))))
    }
}
