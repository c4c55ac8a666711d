//! The flags every program shares, declared once: the overlay (bootstrap, key, network key),
//! the flags file, logs ([`CommonArgs`]), and for long-running programs where they listen on
//! the overlay and serve metrics ([`DaemonArgs`]). A program flattens one of them into its
//! own flags and says, as a [`Program`], what differs: its name, the environment variable of
//! its flags file, its default ports. `--help` of every daemon so lists the same shared flags
//! under one heading, with that program's defaults.

use std::{net::SocketAddr, path::PathBuf};

use libp2p::Multiaddr;

use super::{
    net::{parse_p2p_listen_addr, parse_socket_addr},
    overlay_args::OverlayArgs,
    telemetry::LogFormat,
};

/// Environment variable of `--p2p-listen-addr`.
pub const P2P_LISTEN_ENV: &str = "MTC_P2P_LISTEN_ADDR";
/// Environment variable of `--prom-listen-addr`.
pub const PROM_LISTEN_ENV: &str = "MTC_PROM_LISTEN_ADDR";

/// The heading of the shared flags in `--help`.
pub const HEADING: &str = "Shared by every program";

/// Flags every program takes.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = HEADING)]
pub struct CommonArgs {
    /// TOML file of flags (not perf.conf): any long flag as a key (`prom-listen-addr =
    /// ":9100"`); flags win over it, it wins over environment variables.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Debug logs (RUST_LOG overrides).
    #[arg(long, global = true)]
    pub debug: bool,

    /// Log lines as text for people or as JSON objects for log collectors.
    #[arg(
        long,
        env = "MTC_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true,
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,

    /// The overlay flags: bootstrap nodes, network key, identity.
    #[command(flatten)]
    pub overlay: OverlayArgs,
}

/// Flags every long-running program takes.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = HEADING)]
pub struct DaemonArgs {
    /// P2P listen address: IP:PORT, :PORT (all interfaces) or a TCP multiaddr.
    #[arg(long, env = P2P_LISTEN_ENV, value_name = "ADDR",
          value_parser = parse_p2p_listen_addr)]
    pub p2p_listen_addr: Option<Multiaddr>,

    /// Address of the Prometheus endpoint (/metrics): IP:PORT or :PORT (`--metrics-addr`,
    /// the proxy's old spelling, still works).
    #[arg(long, alias = "metrics-addr", env = PROM_LISTEN_ENV, value_name = "ADDR",
          value_parser = parse_socket_addr)]
    pub prom_listen_addr: Option<SocketAddr>,

    /// The flags every program takes, long-running or not.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl DaemonArgs {
    /// The P2P listen address: the flag's, else program `P`'s fixed default, else all
    /// interfaces on any port.
    pub fn p2p_listen_addr_of<P: Program>(&self) -> Multiaddr {
        self.p2p_listen_addr.clone().unwrap_or_else(|| {
            parse_p2p_listen_addr(P::P2P_LISTEN_ADDR.unwrap_or(":0"))
                .expect("a program's default is valid")
        })
    }

    /// The Prometheus endpoint: the flag's, else program `P`'s default if it has one.
    pub fn prom_listen_addr_of<P: Program>(&self) -> Option<SocketAddr> {
        self.prom_listen_addr.or_else(|| {
            P::PROM_LISTEN_ADDR
                .map(|addr| parse_socket_addr(addr).expect("a program's default is valid"))
        })
    }
}

/// What a program's flags say about the shared ones.
pub trait Program: clap::CommandFactory + clap::FromArgMatches {
    /// Its name, as in messages.
    const NAME: &'static str;
    /// The environment variable naming its flags file (`--config`).
    const CONFIG_ENV: &'static str;
    /// Its default `--p2p-listen-addr`, for a daemon whose default is fixed (`None`: the
    /// program works it out from its other flags when the flag is not given, and does not
    /// call [`DaemonArgs::p2p_listen_addr_of`], which would take `:0`).
    const P2P_LISTEN_ADDR: Option<&'static str> = Some(":0");
    /// Its default `--prom-listen-addr`, for a daemon whose default is fixed.
    const PROM_LISTEN_ADDR: Option<&'static str> = None;

    /// Its shared flags.
    fn common(&self) -> &CommonArgs;

    /// Its command line definition, with this program's defaults of the shared flags.
    fn definition() -> clap::Command {
        let mut command = Self::command().mut_arg("config", |arg| arg.env(Self::CONFIG_ENV));
        if let Some(addr) = Self::P2P_LISTEN_ADDR
            && command
                .get_arguments()
                .any(|arg| arg.get_id() == "p2p_listen_addr")
        {
            command = command.mut_arg("p2p_listen_addr", |arg| arg.default_value(addr));
        }
        if let Some(addr) = Self::PROM_LISTEN_ADDR {
            command = command.mut_arg("prom_listen_addr", |arg| arg.default_value(addr));
        }
        command
    }
}
