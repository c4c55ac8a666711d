//! The overlay's transport: TCP, then (in a private network) the pnet handshake, then noise for
//! authentication and encryption, then yamux for multiplexing.
//!
//! There is deliberately no libp2p-QUIC listener: QUIC carries its own TLS handshake and would
//! bypass the pre-shared key, letting anyone without it into a private network.

use std::time::Duration;

use either::Either;
use libp2p::{
    PeerId, Transport,
    core::{muxing::StreamMuxerBox, transport::Boxed, upgrade::Version},
    identity::Keypair,
    noise,
    pnet::{PnetConfig, PreSharedKey},
    tcp, yamux,
};

pub(crate) fn build(
    keypair: &Keypair,
    psk: Option<PreSharedKey>,
    handshake_timeout: Duration,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let maybe_private = match psk {
        Some(psk) => {
            Either::Left(tcp.and_then(move |socket, _| PnetConfig::new(psk).handshake(socket)))
        }
        None => Either::Right(tcp),
    };
    Ok(maybe_private
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(keypair)?)
        .multiplex(yamux::Config::default())
        .timeout(handshake_timeout)
        .boxed())
}
