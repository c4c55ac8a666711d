//! A sidecar's part in a tunnel: the stream opened with `CHAIN` ([`crate::l4`]).
//!
//! # Rules
//! 1. The hop finds its service in the chain (by name); a chain it is not in, or cannot read,
//!    is `REFUSED` with the reason.
//! 2. It connects to its service as the chain says (a TCP connection, or a UDP socket
//!    connected to the service's address, one per tunnel); a TCP service that cannot be
//!    reached is `REFUSED` naming its address, and reported down as a request's would be.
//! 3. Unless it is last, it opens the rest of the chain through its own ingress, which
//!    chooses (or allocates) an instance of the next service; failing that, `FAILED` with the
//!    reason.
//! 4. Then `READY` with the reverse chain ("Reverse chain: svcN ... this"), and three
//!    directions at once: stream -> service, service -> next hop (the stream back, when
//!    last), next hop -> stream back.
//! 5. A break anywhere resets this tunnel's streams and connection, and only those. A UDP
//!    service has no end of its own: when the stream from the previous hop ends, so does
//!    what the service sends on.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::{
    Direction, TunnelMetrics,
    carry::{DatagramPath, Sink, Source, direction, stream_ends},
    chain::{Chain, Protocol},
    datagrams::DatagramRouter,
};
use crate::transport::{Connection, RecvStream, SendStream};
use crate::{
    framing::{Decoder, Kind},
    ingress::Ingress,
    sidecar::connect_service,
    stream::{StreamError, send_failed, send_refused},
};

/// What a sidecar needs to take part in chains.
pub struct HopRole {
    /// The service this sidecar serves, as chains name it.
    pub service: String,
    /// How the next hop is reached.
    pub ingress: Arc<Ingress>,
    /// Where the tunnels this sidecar takes part in are counted (role `hop`).
    pub metrics: TunnelMetrics,
    /// Where the QUIC datagrams of tunnels go.
    pub datagrams: Arc<DatagramRouter>,
}

/// Where the hop's service is: its address, and how long a connect to it may take.
#[derive(Debug, Clone, Copy)]
pub struct ServiceAddr {
    /// The service's address, spoken to over TCP or UDP as the chain says.
    pub addr: SocketAddr,
    /// How long a TCP connect to the service may take.
    pub connect_timeout: Duration,
}

/// Why a hop could not reach its service.
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    /// The TCP connect failed (refused, unreachable, ...) or took longer than the connect
    /// timeout (an error of kind `TimedOut`).
    #[error("cannot connect to the service at {addr}: {source}")]
    Tcp {
        /// The service's address.
        addr: SocketAddr,
        /// Why the connect failed.
        source: io::Error,
    },
    /// A UDP socket could not be bound, or connected to the service's address (a local
    /// failure: nothing is sent to connect one).
    #[error("no UDP socket to the service at {addr}: {source}")]
    Udp {
        /// The service's address.
        addr: SocketAddr,
        /// Why the socket could not be had.
        source: io::Error,
    },
}

/// Serves one tunnel: `payload` is its `CHAIN` frame's, `rest` what followed it. Returns
/// `Err(Unreachable)` (after answering `REFUSED`) when the service could not be reached, so
/// that the sidecar marks it down.
pub async fn serve(
    role: &HopRole,
    service: ServiceAddr,
    connection: &Connection,
    payload: Bytes,
    rest: Decoder,
    mut send: SendStream,
    recv: RecvStream,
) -> Result<Result<(), Unreachable>, StreamError> {
    let chain = match Chain::decode(&payload) {
        Ok(chain) => chain,
        Err(error) => {
            send_refused(&mut send, &format!("the tunnel's chain: {error}")).await?;
            return Ok(Ok(()));
        }
    };
    let spec = chain.to_string();
    let Some(position) = chain.position(&role.service) else {
        let reason = format!(
            "this is an instance of '{}', which is not in the chain {spec}",
            role.service
        );
        send_refused(&mut send, &reason).await?;
        return Ok(Ok(()));
    };
    let metrics = &role.metrics;
    let protocol = chain.hops()[position].protocol;
    let (mut from_service, mut to_service) = match connect(protocol, service).await {
        Ok(sockets) => sockets,
        Err(unreachable) => {
            metrics.failed(&spec, "hop", "service_unreachable");
            send_refused(&mut send, &unreachable.to_string()).await?;
            return Ok(Err(unreachable));
        }
    };
    let next = match chain.hops().get(position + 1) {
        None => None,
        Some(next) => match role.ingress.open_tunnel(&next.service, &payload).await {
            Ok(tunnel) => Some(tunnel),
            Err(error) => {
                metrics.failed(&spec, "hop", "next_hop");
                send_failed(
                    &mut send,
                    &format!("the next hop, '{}': {error}", next.service),
                )
                .await?;
                return Ok(Ok(()));
            }
        },
    };
    let reverse = match &next {
        Some(tunnel) => format!("{} {}", tunnel.ready, role.service),
        None => format!("Reverse chain: {}", role.service),
    };
    // Registered before READY: the previous hop may send datagrams as soon as it has it.
    let registration = role.datagrams.register(
        connection,
        send.id().into(),
        role.metrics.receive_queue_full(&spec, "hop"),
    );
    let header = Bytes::copy_from_slice(&crate::framing::frame_header(Kind::Ready, reverse.len()));
    send.write_all_chunks(&mut [header, Bytes::from(reverse)])
        .await
        .map_err(|e| StreamError::Quic(e.to_string()))?;
    let mut from_previous = Source::Stream(recv, rest, Some(registration));
    let path = DatagramPath::of(connection, &send);
    let back_to_previous = Sink::Stream(send, Some(path));

    let _open = metrics.opened(&spec, "hop");
    let forward = metrics.counts(&spec, "hop", Direction::Forward);
    let from_service_counts = metrics.counts(&spec, "hop", Direction::FromService);
    let backward = metrics.counts(&spec, "hop", Direction::Backward);
    let (broken, never, service_done) = (
        CancellationToken::new(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let (mut onward, mut back) = match next {
        Some(tunnel) => {
            let (onward, from_next) = stream_ends(
                &role.datagrams,
                &tunnel.connection,
                tunnel.send,
                tunnel.recv,
                tunnel.rest,
                metrics.receive_queue_full(&spec, "hop"),
            );
            (onward, Some((from_next, back_to_previous)))
        }
        None => (back_to_previous, None),
    };
    // A UDP service's output ends when what goes into it does.
    let service_stop = if protocol == Protocol::Udp {
        &service_done
    } else {
        &never
    };
    let into_service = async {
        let result = direction(
            &mut from_previous,
            &mut to_service,
            &forward,
            || {},
            &never,
            &broken,
        )
        .await;
        service_done.cancel();
        result
    };
    let out_of_service = direction(
        &mut from_service,
        &mut onward,
        &from_service_counts,
        || {},
        service_stop,
        &broken,
    );
    let from_next = async {
        match back.as_mut() {
            Some((source, sink)) => {
                direction(source, sink, &backward, || {}, &never, &broken).await
            }
            None => Ok(()),
        }
    };
    let (a, b, c) = tokio::join!(into_service, out_of_service, from_next);
    if let Some(error) = [a, b, c].into_iter().find_map(Result::err) {
        metrics.failed(&spec, "hop", "broken");
        tracing::debug!(chain = %spec, %error, "tunnel broke");
    }
    Ok(Ok(()))
}

/// The hop's sockets to its service: what it sends, and where to send.
async fn connect(protocol: Protocol, service: ServiceAddr) -> Result<(Source, Sink), Unreachable> {
    let ServiceAddr {
        addr,
        connect_timeout,
    } = service;
    match protocol {
        Protocol::Tcp => {
            let stream = connect_service(addr, connect_timeout)
                .await
                .map_err(|source| Unreachable::Tcp { addr, source })?;
            let (read, write) = stream.into_split();
            Ok((Source::Tcp(read), Sink::Tcp(write)))
        }
        Protocol::Udp => {
            let local: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let udp = |source| Unreachable::Udp { addr, source };
            let socket = UdpSocket::bind(local).await.map_err(udp)?;
            crate::transport::size_socket_buffers(&socket);
            socket.connect(addr).await.map_err(udp)?;
            let socket = Arc::new(socket);
            Ok((Source::Udp(Arc::clone(&socket)), Sink::Udp(socket)))
        }
    }
}
