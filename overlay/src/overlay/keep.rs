//! Which idle connections stay open.
//!
//! A connection on which no stream is open is closed after
//! [`Connections::idle_timeout`](super::Connections::idle_timeout): a node is connected to
//! what it is using (the DHT peers of a running query, the lookup service or allocator it is
//! asking, the peers it serves) and not to everyone it ever met, so its cost does not grow
//! with the network. Kademlia keeps its contacts in the routing table, not as connections.
//!
//! Some connections must outlive idleness: a node's connection to its bootstraps (losing one
//! makes it reconnect and re-advertise everything) and the ping monitor's to every member (it
//! measures them all). A node keeps such a connection by holding a stream of protocol
//! `/mtc/keep/1` on it. Both ends count an open stream as use, so one side's wish keeps the
//! connection at both: a member holds one to each bootstrap, a monitor to everyone.
//!
//! Wire format: the stream carries nothing; it is opened, held, and dropped with the
//! connection.
//!
//! Threat model: a peer can make this node hold at most one inbound keep stream per
//! connection (a second replaces the first), so it keeps that connection open and nothing
//! more; how many connections a node takes is bounded by its water marks, which a kept
//! connection is spared by ([`super::connections`]).

use std::{
    collections::HashSet,
    convert::Infallible,
    task::{Context, Poll},
};

use libp2p::{
    Multiaddr, PeerId, Stream, StreamProtocol,
    core::{Endpoint, transport::PortUse, upgrade::ReadyUpgrade},
    swarm::{
        ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
        NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
        handler::{ConnectionEvent, FullyNegotiatedInbound, FullyNegotiatedOutbound},
    },
};

/// The protocol whose open stream keeps a connection.
pub const KEEP_PROTOCOL: StreamProtocol = StreamProtocol::new("/mtc/keep/1");

/// A connection is now kept open at the peer's request (it holds a keep stream on it).
#[derive(Debug)]
pub(crate) struct KeptByPeer {
    pub peer: PeerId,
    pub connection: ConnectionId,
}

/// Opens keep streams on the connections this node wants kept, and holds the ones peers open.
pub(crate) struct Behaviour {
    /// Keep every connection (the ping monitor).
    keep_all: bool,
    /// Keep connections to these peers (the bootstraps).
    peers: HashSet<PeerId>,
    events: Vec<KeptByPeer>,
}

impl Behaviour {
    pub fn new(keep_all: bool, peers: impl IntoIterator<Item = PeerId>) -> Self {
        Self {
            keep_all,
            peers: peers.into_iter().collect(),
            events: Vec::new(),
        }
    }

    /// Whether this node wants its connections to `peer` kept.
    pub fn wants(&self, peer: &PeerId) -> bool {
        self.keep_all || self.peers.contains(peer)
    }

    fn handler(&self, peer: &PeerId) -> Handler {
        Handler {
            want: self.wants(peer),
            asked: false,
            ours: None,
            theirs: None,
            report: false,
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = KeptByPeer;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(&peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(&peer))
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        _: THandlerOutEvent<Self>,
    ) {
        self.events.push(KeptByPeer { peer, connection });
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.events.pop() {
            Some(event) => Poll::Ready(ToSwarm::GenerateEvent(event)),
            None => Poll::Pending,
        }
    }
}

/// One connection's keep streams.
pub(crate) struct Handler {
    /// This node wants the connection kept.
    want: bool,
    /// Our keep stream was asked for (once: a peer that refuses it is not asked again).
    asked: bool,
    /// Held, never read or written: their existence is the message.
    ours: Option<Stream>,
    theirs: Option<Stream>,
    /// The peer's first keep stream is not yet reported to the behaviour.
    report: bool,
}

impl ConnectionHandler for Handler {
    type FromBehaviour = Infallible;
    /// The peer opened a keep stream.
    type ToBehaviour = ();
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(KEEP_PROTOCOL), ())
    }

    /// Our own wish counts before our stream is open (and if the peer refuses it).
    fn connection_keep_alive(&self) -> bool {
        self.want
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        if self.report {
            self.report = false;
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(()));
        }
        if self.want && !self.asked {
            self.asked = true;
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(KEEP_PROTOCOL), ()),
            });
        }
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => {
                self.report |= self.theirs.replace(stream).is_none();
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                ..
            }) => self.ours = Some(stream),
            // A peer that does not keep (an older version) or a connection on its way out:
            // our side keeps it anyway.
            _ => {}
        }
    }
}
