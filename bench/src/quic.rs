//! The data plane's transport on loopback: a new authenticated QUIC connection (TLS 1.3
//! handshake plus the identity and network-key proof exchange), and a request-sized round trip
//! on one bidirectional stream of an open connection.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use libp2p::identity::Keypair;
use proxy::transport::Transport;

use crate::{
    report::{Report, outln},
    stats::print_percentiles,
};

#[derive(clap::Args)]
pub struct Args {
    /// New connections measured.
    #[arg(long, default_value_t = 200)]
    connections: usize,
    /// Stream round trips measured.
    #[arg(long, default_value_t = 5000)]
    round_trips: usize,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            connections: 200,
            round_trips: 5000,
        }
    }
}

impl Args {
    pub fn quick() -> Self {
        Self {
            connections: 10,
            round_trips: 200,
        }
    }
}

const LOOPBACK: &str = "127.0.0.1:0";
const NETWORK_KEY: [u8; 32] = [42; 32];

pub async fn run(args: Args, out: &mut Report) -> anyhow::Result<()> {
    let command = out.command("quic");
    let addr: SocketAddr = LOOPBACK.parse()?;
    let server = Arc::new(Transport::bind(
        addr,
        Keypair::generate_ed25519(),
        Some(NETWORK_KEY),
    )?);
    let server_addr = server.local_addr()?;
    let serving = Arc::clone(&server);
    tokio::spawn(async move {
        while let Some(accepted) = serving.accept().await {
            let Ok((_, connection)) = accepted else {
                continue;
            };
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    tokio::spawn(async move {
                        let request = recv.read_to_end(64 * 1024).await.unwrap_or_default();
                        let _ = send.write_all(&vec![b'x'; 1024]).await;
                        drop(request);
                        let _ = send.finish();
                    });
                }
            });
        }
    });

    let mut handshakes = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        // A fresh client each time: the measure is a first connection between two proxies.
        let client = Transport::bind(addr, Keypair::generate_ed25519(), Some(NETWORK_KEY))?;
        let begin = Instant::now();
        client.connect(server.peer_id(), server_addr).await?;
        handshakes.push(begin.elapsed());
        client.close();
    }

    let client = Transport::bind(addr, Keypair::generate_ed25519(), Some(NETWORK_KEY))?;
    let request = vec![b'r'; 512];
    let mut round_trips = Vec::with_capacity(args.round_trips);
    for _ in 0..args.round_trips {
        let begin = Instant::now();
        let connection = client.connect(server.peer_id(), server_addr).await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&request).await?;
        send.finish()?;
        let response = recv.read_to_end(64 * 1024).await?;
        anyhow::ensure!(response.len() == 1024, "short response");
        round_trips.push(begin.elapsed());
    }

    outln!(
        out,
        "## Data-plane QUIC transport on loopback\n\n`{command}`\n\n\
         {} connections (each a QUIC handshake plus the identity and network-key proofs) and \
         {} stream round trips on one open connection, client and server in this process.\n",
        args.connections,
        args.round_trips
    );
    print_percentiles(
        out,
        "measure",
        &[50.0, 90.0, 99.0, 100.0],
        &mut [
            (
                "new connection: handshake + identity/PSK proofs",
                &mut handshakes,
            ),
            (
                "512 B request / 1 KiB response on a new stream of an open connection",
                &mut round_trips,
            ),
        ],
    );
    Ok(())
}
