//! The ingress's end of one request between proxies: [`forward`] sends a request over an
//! authenticated QUIC connection and returns the streaming response, [`probe`] measures the
//! round trip to an instance's proxy and hears its service's health. The other end is
//! [`crate::sidecar::Sidecar`].

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body::Body;

use crate::transport::Connection;
use crate::{
    framing::{
        FrameError, Health, RequestHead, decode_response_head, encode_request_head,
        view_response_head,
    },
    stream::{FramedBody, Opening, StreamError, read_head, read_opening, send_message, send_ping},
};

/// Why an attempt to send a request to an instance failed. The kind decides what the
/// ingress may do next: a request that never left, or that the service never saw, may go to
/// another instance; one that broke after it was sent only if it can be sent again; a
/// client's broken body is the client's fault and no instance's.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// No connection to the instance could be had: nothing sent.
    #[error("unreachable: {0}")]
    Unreachable(#[from] ConnectError),
    /// Nothing of the request left this proxy: no stream could be opened.
    #[error("no stream could be opened: {0}")]
    NotSent(StreamError),
    /// The sidecar did not hand the request to its service, which never saw it.
    #[error("the instance's service did not get it: {0}")]
    Refused(String),
    /// The request was sent, in part or whole, and the exchange broke before a response head
    /// (the connection, or the service: [`StreamError::ServiceFailed`]).
    #[error("the exchange broke: {0}")]
    Broken(StreamError),
    /// The client's request body failed (a malformed chunk, a reset) before the response.
    #[error("the request body could not be read from the client: {0}")]
    Client(String),
}

/// Why no connection to an instance could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Connecting or authenticating failed (the QUIC handshake, the identity proof).
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    /// No connection was had within the given time (the ingress's `CONNECT_TIMEOUT`); the
    /// instance may be frozen or gone.
    #[error("no connection within {0:?}")]
    TimedOut(Duration),
}

/// An instance's answer as it arrived: the payload of its response `HEAD` frame, and the body
/// that follows, streaming from the connection as it is read.
pub struct Answer {
    /// Its status, read off the head (which was checked when it arrived).
    pub status: u16,
    /// The response `HEAD` frame's payload as received, still encoded (status and header
    /// fields); see `crate::framing::decode_response_head`.
    pub head: Bytes,
    /// The response body, read from the stream as it is polled.
    pub body: FramedBody,
}

impl Answer {
    /// The answer as a `Response` with its head decoded into a `HeaderMap` (the HTTP/2 front
    /// and tests; the HTTP/1.1 front writes the head from the frame as it is).
    pub fn into_response(self) -> Result<Response<FramedBody>, FrameError> {
        let head = decode_response_head(&self.head)?;
        let mut response = Response::new(self.body);
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        Ok(response)
    }
}

/// Sends `head` and `body` on a new stream of `connection` and returns the response as soon as
/// its head arrives; its body streams from the connection as the caller reads it.
pub async fn forward<B>(
    connection: &Connection,
    head: &RequestHead,
    body: B,
) -> Result<Response<FramedBody>, AttemptError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display + Send,
{
    let mut encoded = BytesMut::with_capacity(HEAD_CAPACITY);
    encode_request_head(head, &mut encoded).map_err(|e| AttemptError::NotSent(e.into()))?;
    forward_frame(connection, encoded.freeze(), body, || {})
        .await?
        .into_response()
        .map_err(|e| AttemptError::Broken(e.into()))
}

/// Opens a stream on `connection`. `blocked` is called, before it waits, if the peer's limit
/// of concurrent streams ([`crate::transport`]: 1024) is reached, so that the wait is counted.
pub async fn open_stream(
    connection: &Connection,
    blocked: impl FnOnce(),
) -> Result<(crate::transport::SendStream, crate::transport::RecvStream), AttemptError> {
    let mut open = std::pin::pin!(connection.open_bi());
    let opened = match futures::FutureExt::now_or_never(open.as_mut()) {
        Some(opened) => opened,
        None => {
            blocked();
            open.await
        }
    };
    opened.map_err(|e| AttemptError::NotSent(StreamError::Quic(e.to_string())))
}

/// Sends a request whose `HEAD` frame is `head` (encoded, header included) and `body` on a new
/// stream of `connection`, and returns the answer as soon as its head arrives. The request
/// body is sent concurrently, so a service may answer before it has read all of it. `blocked`
/// is told if the stream had to wait for the peer's stream limit ([`open_stream`]).
pub async fn forward_frame<B>(
    connection: &Connection,
    head: Bytes,
    body: B,
    blocked: impl FnOnce(),
) -> Result<Answer, AttemptError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display + Send,
{
    let (mut send, mut recv) = open_stream(connection, blocked).await?;
    // Set by the body's sender when the client's body fails: the client's fault, told
    // apart from the exchange's.
    let mut client_fault = None;
    if body.is_end_stream() {
        // No body (most GETs): the head and the stream's end go out at once, without a task
        // of their own, a spawn and a wake-up less per request.
        send_message(&mut send, head, body)
            .await
            .map_err(AttemptError::Broken)?;
    } else {
        let fault = Arc::new(std::sync::OnceLock::new());
        client_fault = Some(Arc::clone(&fault));
        tokio::spawn(async move {
            if let Err(error) = send_message(&mut send, head, body).await {
                tracing::debug!(%error, "request body not fully sent");
                if let StreamError::Body(reason) = error {
                    let _ = fault.set(reason);
                }
                let _ = send.reset(0u32.into());
            }
        });
    }
    let client_failed = || {
        client_fault
            .as_ref()
            .and_then(|fault| fault.get().cloned())
            .map(AttemptError::Client)
    };
    let (payload, rest) = match read_head(&mut recv).await {
        Ok(head) => head,
        Err(StreamError::Refused(reason)) => return Err(AttemptError::Refused(reason)),
        Err(error) => return Err(client_failed().unwrap_or(AttemptError::Broken(error))),
    };
    if let Some(fault) = client_failed() {
        return Err(fault);
    }
    let (status, _) = view_response_head(&payload).map_err(|e| AttemptError::Broken(e.into()))?;
    Ok(Answer {
        status,
        head: payload,
        body: FramedBody::new(recv, rest),
    })
}

/// Measures the round trip to the proxy at the other end of `connection`: a PING on a new
/// stream, answered by the sidecar without involving its service, with what the sidecar
/// knows of its service's health.
pub async fn probe(connection: &Connection) -> Result<(Duration, Health), StreamError> {
    let begin = Instant::now();
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| StreamError::Quic(e.to_string()))?;
    send_ping(&mut send, &[]).await?;
    match read_opening(&mut recv).await? {
        Opening::Ping(payload) => Ok((begin.elapsed(), Health::decode(&payload))),
        other => Err(StreamError::Unexpected(other.kind())),
    }
}

/// Room for a typical encoded head, so that encoding it does not grow the buffer.
pub(crate) const HEAD_CAPACITY: usize = 512;

#[cfg(test)]
mod tests;
