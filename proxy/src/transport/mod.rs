//! The data plane's transport: QUIC (quinn) between proxies, one connection per pair of
//! proxies, reused by every request, authenticated by overlay identity and network key
//! ([`auth`]) before any request is served.

pub mod auth;
mod tls;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use libp2p::{PeerId, identity::Keypair};
use quinn::{
    Connection, Endpoint,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};

use auth::{AuthError, EXPORTER_LABEL, KEYING_MATERIAL_BYTES, MAX_PROOF_BYTES, Proof, Role};

/// How long the proof exchange after the TLS handshake may take.
const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections are closed after this; keep-alives (below) prevent it while in use.
const MAX_IDLE: Duration = Duration::from_secs(30);
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Application close codes.
const CLOSE_AUTH_FAILED: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot set up QUIC: {0}")]
    Setup(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("authentication with {addr} failed: {source}")]
    Auth { addr: SocketAddr, source: AuthError },
    #[error("{addr} did not authenticate within {AUTH_TIMEOUT:?}")]
    AuthTimeout { addr: SocketAddr },
    #[error("connection to {addr} failed during authentication: {reason}")]
    Stream { addr: SocketAddr, reason: String },
}

/// This proxy's QUIC endpoint: listens for other proxies and connects to them.
pub struct Transport {
    endpoint: Endpoint,
    keypair: Keypair,
    network_key: Option<[u8; 32]>,
    /// Authenticated connections by peer. Read on every request, written on (re)connect.
    connections: RwLock<HashMap<PeerId, Connection>>,
    /// Serialises connecting to one peer, so concurrent requests share one new connection.
    connecting: tokio::sync::Mutex<HashMap<PeerId, Arc<tokio::sync::Mutex<()>>>>,
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    config
        .max_idle_timeout(Some(
            MAX_IDLE.try_into().expect("30 s is a valid idle timeout"),
        ))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_concurrent_bidi_streams(1024u32.into());
    Arc::new(config)
}

impl Transport {
    /// Binds the endpoint on `addr` (UDP). `network_key` is the 32-byte pre-shared key of a
    /// private network, if any.
    pub fn bind(
        addr: SocketAddr,
        keypair: Keypair,
        network_key: Option<[u8; 32]>,
    ) -> Result<Self, TransportError> {
        let setup = |e: &dyn std::fmt::Display| TransportError::Setup(e.to_string());
        let server_crypto =
            QuicServerConfig::try_from(tls::server_config().map_err(|e| setup(&e))?)
                .map_err(|e| setup(&e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport_config());
        let client_crypto =
            QuicClientConfig::try_from(tls::client_config().map_err(|e| setup(&e))?)
                .map_err(|e| setup(&e))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport_config());
        let mut endpoint = Endpoint::server(server, addr)
            .map_err(|e| TransportError::Setup(format!("cannot listen on {addr} (UDP): {e}")))?;
        endpoint.set_default_client_config(client);
        Ok(Self {
            endpoint,
            keypair,
            network_key,
            connections: RwLock::default(),
            connecting: tokio::sync::Mutex::default(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    fn keying_material(connection: &Connection) -> Result<[u8; KEYING_MATERIAL_BYTES], String> {
        let mut material = [0; KEYING_MATERIAL_BYTES];
        connection
            .export_keying_material(&mut material, EXPORTER_LABEL, b"")
            .map_err(|e| format!("{e:?}"))?;
        Ok(material)
    }

    /// The authenticated connection to `peer` at `addr`: the open one if there is one, else a
    /// new one (concurrent callers share it).
    pub async fn connect(
        &self,
        peer: PeerId,
        addr: SocketAddr,
    ) -> Result<Connection, TransportError> {
        if let Some(connection) = self.open_connection(&peer) {
            return Ok(connection);
        }
        let lock = {
            let mut connecting = self.connecting.lock().await;
            Arc::clone(connecting.entry(peer).or_default())
        };
        let _guard = lock.lock().await;
        if let Some(connection) = self.open_connection(&peer) {
            return Ok(connection);
        }
        let connection = self.dial(peer, addr).await?;
        self.connections
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, connection.clone());
        Ok(connection)
    }

    fn open_connection(&self, peer: &PeerId) -> Option<Connection> {
        let connections = self.connections.read().unwrap_or_else(|p| p.into_inner());
        connections
            .get(peer)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    async fn dial(&self, peer: PeerId, addr: SocketAddr) -> Result<Connection, TransportError> {
        let failed = |reason: String| TransportError::Connect { addr, reason };
        let connecting = self
            .endpoint
            .connect(addr, tls::SERVER_NAME)
            .map_err(|e| failed(e.to_string()))?;
        let connection = connecting.await.map_err(|e| failed(e.to_string()))?;
        let exchange = async {
            let material = Self::keying_material(&connection)
                .map_err(|reason| TransportError::Stream { addr, reason })?;
            let stream_error = |e: &dyn std::fmt::Display| TransportError::Stream {
                addr,
                reason: e.to_string(),
            };
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| stream_error(&e))?;
            let proof = Proof::new(
                &self.keypair,
                self.network_key.as_ref(),
                Role::Client,
                &material,
            );
            send.write_all(&proof.encode())
                .await
                .map_err(|e| stream_error(&e))?;
            send.finish().map_err(|e| stream_error(&e))?;
            let answer = recv
                .read_to_end(MAX_PROOF_BYTES)
                .await
                .map_err(|e| stream_error(&e))?;
            Proof::decode(&answer)
                .and_then(|proof| {
                    proof.verify(
                        Some(peer),
                        self.network_key.as_ref(),
                        Role::Server,
                        &material,
                    )
                })
                .map_err(|source| TransportError::Auth { addr, source })
        };
        match tokio::time::timeout(AUTH_TIMEOUT, exchange).await {
            Ok(Ok(_)) => Ok(connection),
            Ok(Err(error)) => {
                connection.close(CLOSE_AUTH_FAILED.into(), b"");
                Err(error)
            }
            Err(_) => {
                connection.close(CLOSE_AUTH_FAILED.into(), b"");
                Err(TransportError::AuthTimeout { addr })
            }
        }
    }

    /// The next authenticated inbound connection and the peer on it. Connections that fail
    /// to authenticate are closed without a word and reported as errors; `None` once the
    /// endpoint is closed.
    pub async fn accept(&self) -> Option<Result<(PeerId, Connection), TransportError>> {
        let incoming = self.endpoint.accept().await?;
        let addr = incoming.remote_address();
        let connection = match incoming.await {
            Ok(connection) => connection,
            Err(e) => {
                return Some(Err(TransportError::Connect {
                    addr,
                    reason: e.to_string(),
                }));
            }
        };
        let exchange = async {
            let material = Self::keying_material(&connection)
                .map_err(|reason| TransportError::Stream { addr, reason })?;
            let stream_error = |e: &dyn std::fmt::Display| TransportError::Stream {
                addr,
                reason: e.to_string(),
            };
            let (mut send, mut recv) =
                connection.accept_bi().await.map_err(|e| stream_error(&e))?;
            let claim = recv
                .read_to_end(MAX_PROOF_BYTES)
                .await
                .map_err(|e| stream_error(&e))?;
            let peer = Proof::decode(&claim)
                .and_then(|proof| {
                    proof.verify(None, self.network_key.as_ref(), Role::Client, &material)
                })
                .map_err(|source| TransportError::Auth { addr, source })?;
            // Only now does the server say who it is.
            let proof = Proof::new(
                &self.keypair,
                self.network_key.as_ref(),
                Role::Server,
                &material,
            );
            send.write_all(&proof.encode())
                .await
                .map_err(|e| stream_error(&e))?;
            send.finish().map_err(|e| stream_error(&e))?;
            Ok(peer)
        };
        Some(match tokio::time::timeout(AUTH_TIMEOUT, exchange).await {
            Ok(Ok(peer)) => Ok((peer, connection)),
            Ok(Err(error)) => {
                connection.close(CLOSE_AUTH_FAILED.into(), b"");
                Err(error)
            }
            Err(_) => {
                connection.close(CLOSE_AUTH_FAILED.into(), b"");
                Err(TransportError::AuthTimeout { addr })
            }
        })
    }

    /// Closes every connection and stops listening.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"shutting down");
    }
}

#[cfg(test)]
mod tests;
