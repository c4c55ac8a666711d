//! Chain specs: what a client asks `l4-proxy` for, and what crosses to each hop at set-up.
//!
//! A spec is a path, `/<tcp|udp>/<svc1>[/<svc2>...]`: a protocol token says how the services
//! after it are spoken to (their sockets), until the next token, so `/tcp/a/b/udp/c` is TCP
//! to `a` and `b` and UDP to `c`. The first token also says what the client's listener is.
//! Refused, each with its reason: a query string, fewer than two tokens, a spec that does not
//! start with a protocol, a protocol token with no service after it, an invalid service name,
//! a service named `tcp` or `udp` (a spec could not name it: it reads as a protocol), and a
//! service named twice (a looped chain: its hop could not tell which place is its own).
//!
//! On the wire (the payload of a `CHAIN` frame, [`crate::l4`]):
//! `version 1 | hops: u8 | per hop: protocol u8 (0 tcp, 1 udp) | name (u16 length)`.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mtc_overlay::lookup::record::validate_name;

/// Version of the encoded chain.
const VERSION: u8 = 1;
/// Most services in one chain.
pub const MAX_HOPS: usize = 16;

/// How a service (or the client) is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP: a byte stream; token `tcp`, byte 0 on the wire.
    Tcp,
    /// UDP: datagrams; token `udp`, byte 1 on the wire.
    Udp,
}

impl Protocol {
    /// Its token in a spec: `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        match token {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            _ => None,
        }
    }
}

/// One service of a chain and how it is spoken to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hop {
    /// How the hop's sidecar speaks to its service.
    pub protocol: Protocol,
    /// The service's name, valid as a lookup record's name.
    pub service: String,
}

/// The services a chain passes through, in order: at least one, each named once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    hops: Vec<Hop>,
}

/// Why a spec, or a list of hops, is not a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The spec holds a `?`.
    #[error("a chain spec takes no query string")]
    Query,
    /// The spec has fewer than two tokens, or the chain no hop at all.
    #[error("a chain spec is /<tcp|udp>/<service>[/<service>...]: at least two tokens")]
    TooShort,
    /// The first token (given) is not `tcp` or `udp`.
    #[error("a chain spec starts with a protocol, tcp or udp, not '{0}'")]
    NoProtocol(String),
    /// A protocol token (given) is followed by another one or ends the spec.
    #[error("'{0}' is not followed by a service")]
    ProtocolWithoutService(&'static str),
    /// A service name is not valid as a lookup record's name; holds why.
    #[error("{0}")]
    Name(String),
    /// A service (given) is named twice.
    #[error("'{0}' appears twice: a chain may not loop")]
    Loop(String),
    /// More than [`MAX_HOPS`] services.
    #[error("a chain has at most {MAX_HOPS} services")]
    TooLong,
    /// A service (given) named like a protocol token, which no spec can name.
    #[error("a service named '{0}' cannot be in a chain: a spec reads it as a protocol")]
    ProtocolName(String),
    /// An empty segment: `//`, or a `/` at the end.
    #[error("an empty segment (//) in the spec")]
    Empty,
}

/// Why the payload of a `CHAIN` frame is not a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload opens with a version (given) this proxy does not speak.
    #[error("chain version {0} is not supported (this proxy speaks {VERSION})")]
    Version(u8),
    /// The payload ends part way through a hop, or has bytes after the last one.
    #[error("truncated chain")]
    Truncated,
    /// A hop's protocol byte (given) is neither 0 (TCP) nor 1 (UDP).
    #[error("unknown protocol {0} in chain")]
    Protocol(u8),
    /// A service name is not UTF-8.
    #[error("a service name in the chain is not UTF-8")]
    Utf8,
    /// The hops fail the checks a parsed spec must pass (a bad name, a loop, too many, none).
    #[error(transparent)]
    Spec(#[from] SpecError),
}

impl Chain {
    /// Parses a spec from the path (and query, if any) of a control request.
    pub fn parse(path_and_query: &str) -> Result<Self, SpecError> {
        if path_and_query.contains('?') {
            return Err(SpecError::Query);
        }
        let trimmed = path_and_query.trim_start_matches('/');
        let tokens: Vec<&str> = trimmed.split('/').collect();
        if tokens.len() < 2 {
            return Err(SpecError::TooShort);
        }
        let Some(mut protocol) = Protocol::parse(tokens[0]) else {
            return Err(SpecError::NoProtocol(tokens[0].to_owned()));
        };
        let mut hops = Vec::new();
        let mut pending = Some(protocol);
        for token in &tokens[1..] {
            if token.is_empty() {
                return Err(SpecError::Empty);
            }
            if let Some(next) = Protocol::parse(token) {
                if let Some(unused) = pending {
                    return Err(SpecError::ProtocolWithoutService(unused.as_str()));
                }
                protocol = next;
                pending = Some(next);
                continue;
            }
            pending = None;
            hops.push(Hop {
                protocol,
                service: (*token).to_owned(),
            });
        }
        if let Some(unused) = pending {
            return Err(SpecError::ProtocolWithoutService(unused.as_str()));
        }
        Self::new(hops)
    }

    /// A chain of `hops`, checked: names valid and not protocol tokens, none twice, at most
    /// [`MAX_HOPS`]. (A hop named `udp` decoded from a frame was a chain whose spelling read
    /// back as another: found by the chain_spec fuzz target.)
    pub fn new(hops: Vec<Hop>) -> Result<Self, SpecError> {
        if hops.is_empty() {
            return Err(SpecError::TooShort);
        }
        if hops.len() > MAX_HOPS {
            return Err(SpecError::TooLong);
        }
        for (i, hop) in hops.iter().enumerate() {
            validate_name(&hop.service).map_err(SpecError::Name)?;
            if Protocol::parse(&hop.service).is_some() {
                return Err(SpecError::ProtocolName(hop.service.clone()));
            }
            if hops[..i].iter().any(|h| h.service == hop.service) {
                return Err(SpecError::Loop(hop.service.clone()));
            }
        }
        Ok(Self { hops })
    }

    /// The hops, in the order the client's traffic passes through them.
    pub fn hops(&self) -> &[Hop] {
        &self.hops
    }

    /// What the client's listener speaks: the first hop's protocol.
    pub fn client_protocol(&self) -> Protocol {
        self.hops[0].protocol
    }

    /// Where `service` is in the chain.
    pub fn position(&self, service: &str) -> Option<usize> {
        self.hops.iter().position(|hop| hop.service == service)
    }

    /// The encoded chain (see the module doc).
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(VERSION);
        out.put_u8(self.hops.len() as u8);
        for hop in &self.hops {
            out.put_u8(match hop.protocol {
                Protocol::Tcp => 0,
                Protocol::Udp => 1,
            });
            out.put_u16(hop.service.len() as u16);
            out.put_slice(hop.service.as_bytes());
        }
    }

    /// Decodes and checks an encoded chain, as a hop receives it.
    pub fn decode(mut payload: &[u8]) -> Result<Self, DecodeError> {
        if payload.remaining() < 2 {
            return Err(DecodeError::Truncated);
        }
        let version = payload.get_u8();
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let count = payload.get_u8() as usize;
        if count > MAX_HOPS {
            return Err(SpecError::TooLong.into());
        }
        let mut hops = Vec::with_capacity(count);
        for _ in 0..count {
            if payload.remaining() < 3 {
                return Err(DecodeError::Truncated);
            }
            let protocol = match payload.get_u8() {
                0 => Protocol::Tcp,
                1 => Protocol::Udp,
                other => return Err(DecodeError::Protocol(other)),
            };
            let len = payload.get_u16() as usize;
            if payload.remaining() < len {
                return Err(DecodeError::Truncated);
            }
            let service = std::str::from_utf8(&payload[..len])
                .map_err(|_| DecodeError::Utf8)?
                .to_owned();
            payload.advance(len);
            hops.push(Hop { protocol, service });
        }
        if payload.has_remaining() {
            return Err(DecodeError::Truncated);
        }
        Ok(Self::new(hops)?)
    }

    /// The encoded chain as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }
}

/// The spec in its canonical spelling: a protocol token only where it changes.
impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut current = None;
        for hop in &self.hops {
            if current != Some(hop.protocol) {
                write!(f, "/{}", hop.protocol.as_str())?;
                current = Some(hop.protocol);
            }
            write!(f, "/{}", hop.service)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hops(chain: &Chain) -> Vec<(Protocol, &str)> {
        chain
            .hops()
            .iter()
            .map(|h| (h.protocol, h.service.as_str()))
            .collect()
    }

    #[test]
    fn protocol_tokens_apply_until_the_next_one() {
        let chain = Chain::parse("/tcp/s1/s2/udp/s3").unwrap();
        assert_eq!(
            hops(&chain),
            [
                (Protocol::Tcp, "s1"),
                (Protocol::Tcp, "s2"),
                (Protocol::Udp, "s3")
            ]
        );
        assert_eq!(chain.client_protocol(), Protocol::Tcp);
        assert_eq!(chain.to_string(), "/tcp/s1/s2/udp/s3");
        assert_eq!(chain.position("s2"), Some(1));
        assert_eq!(chain.position("s4"), None);
        // A repeated token changes nothing, and the canonical spelling drops it.
        let same = Chain::parse("/tcp/s1/tcp/s2/udp/s3").unwrap();
        assert_eq!(same, chain);
        assert_eq!(Chain::parse("udp/echo").unwrap().to_string(), "/udp/echo");
    }

    #[test]
    fn bad_specs_are_refused_with_their_reason() {
        let cases = [
            ("/tcp/a?x=1", SpecError::Query),
            ("/tcp", SpecError::TooShort),
            ("/", SpecError::TooShort),
            ("/sctp/a", SpecError::NoProtocol("sctp".into())),
            ("/a/b", SpecError::NoProtocol("a".into())),
            ("/tcp/a/udp", SpecError::ProtocolWithoutService("udp")),
            ("/tcp/udp/a", SpecError::ProtocolWithoutService("tcp")),
            ("/tcp/a//b", SpecError::Empty),
            ("/tcp/a/", SpecError::Empty),
            ("/tcp/a/b/a", SpecError::Loop("a".into())),
            ("/tcp/a/udp/a", SpecError::Loop("a".into())),
        ];
        for (spec, expected) in cases {
            assert_eq!(Chain::parse(spec), Err(expected), "{spec}");
        }
        assert!(matches!(Chain::parse("/tcp/-bad"), Err(SpecError::Name(_))));
        assert!(matches!(Chain::parse("/tcp/.."), Err(SpecError::Name(_))));
        let long = format!(
            "/tcp{}",
            (0..=MAX_HOPS).map(|i| format!("/s{i}")).collect::<String>()
        );
        assert_eq!(Chain::parse(&long), Err(SpecError::TooLong));
    }

    #[test]
    fn a_chain_crosses_as_it_was() {
        let chain = Chain::parse("/udp/a/tcp/b.c/d_e").unwrap();
        let bytes = chain.to_bytes();
        assert_eq!(Chain::decode(&bytes).unwrap(), chain);
        for cut in 0..bytes.len() {
            assert!(Chain::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(Chain::decode(&longer), Err(DecodeError::Truncated));
        let mut version = bytes.to_vec();
        version[0] = 2;
        assert_eq!(Chain::decode(&version), Err(DecodeError::Version(2)));
        let mut protocol = bytes.to_vec();
        protocol[2] = 7;
        assert_eq!(Chain::decode(&protocol), Err(DecodeError::Protocol(7)));
    }

    #[test]
    fn a_decoded_chain_is_checked_as_a_parsed_one() {
        // A peer cannot slip in a loop or a bad name that the parser would refuse.
        let looped = Chain {
            hops: vec![
                Hop {
                    protocol: Protocol::Tcp,
                    service: "a".into(),
                },
                Hop {
                    protocol: Protocol::Tcp,
                    service: "a".into(),
                },
            ],
        };
        assert_eq!(
            Chain::decode(&looped.to_bytes()),
            Err(DecodeError::Spec(SpecError::Loop("a".into())))
        );
        let empty = Chain { hops: vec![] };
        assert_eq!(
            Chain::decode(&empty.to_bytes()),
            Err(DecodeError::Spec(SpecError::TooShort))
        );
        // The fuzzer's find: a hop named `udp` spelled `/tcp/b/udp`, which reads back as a
        // protocol without a service.
        let named_udp = Chain {
            hops: vec![
                Hop {
                    protocol: Protocol::Tcp,
                    service: "b".into(),
                },
                Hop {
                    protocol: Protocol::Tcp,
                    service: "udp".into(),
                },
            ],
        };
        assert_eq!(
            Chain::decode(&named_udp.to_bytes()),
            Err(DecodeError::Spec(SpecError::ProtocolName("udp".into())))
        );
    }
}
