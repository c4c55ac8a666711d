//! Listen addresses as the original programs wrote them: `IP:PORT` or just `:PORT` (all
//! interfaces).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libp2p::{Multiaddr, multiaddr::Protocol};

/// Parses `IP:PORT`, `[IPv6]:PORT` or `:PORT` (meaning every IPv4 interface).
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    let bad = || format!("'{text}' is not a listen address: expected IP:PORT or :PORT");
    if let Some(port) = text.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| bad())?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    text.parse().map_err(|_| bad())
}

/// The IP address a multiaddr names (`/ip4/...` or `/ip6/...`), if it names one.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|part| match part {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

/// Parses a P2P listen address: a TCP multiaddr (`/ip4/0.0.0.0/tcp/4001`) or the seed's
/// `IP:PORT` / `:PORT` form.
pub fn parse_p2p_listen_addr(text: &str) -> Result<Multiaddr, String> {
    if text.starts_with('/') {
        let addr: Multiaddr = text
            .parse()
            .map_err(|e| format!("'{text}' is not a multiaddr ({e})"))?;
        return Ok(addr);
    }
    let socket = parse_socket_addr(text)?;
    let ip = match socket.ip() {
        IpAddr::V4(ip) => Protocol::Ip4(ip),
        IpAddr::V6(ip) => Protocol::Ip6(ip),
    };
    Ok(Multiaddr::empty()
        .with(ip)
        .with(Protocol::Tcp(socket.port())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_forms_and_multiaddrs() {
        assert_eq!(
            parse_socket_addr(":9100").unwrap().to_string(),
            "0.0.0.0:9100"
        );
        assert_eq!(
            parse_socket_addr("127.0.0.1:1").unwrap().to_string(),
            "127.0.0.1:1"
        );
        assert_eq!(
            parse_socket_addr("[::1]:80").unwrap().to_string(),
            "[::1]:80"
        );
        assert_eq!(
            parse_p2p_listen_addr(":4001").unwrap().to_string(),
            "/ip4/0.0.0.0/tcp/4001"
        );
        assert_eq!(
            parse_p2p_listen_addr("/ip4/127.0.0.1/tcp/0")
                .unwrap()
                .to_string(),
            "/ip4/127.0.0.1/tcp/0"
        );
    }

    #[test]
    fn errors_name_the_value() {
        for bad in [":99999", "localhost:80", "9100", ""] {
            let error = parse_socket_addr(bad).unwrap_err();
            assert!(error.contains(&format!("'{bad}'")), "{error}");
        }
        assert!(
            parse_p2p_listen_addr("/ip4/x")
                .unwrap_err()
                .contains("'/ip4/x'")
        );
    }
}
