//! Bootstrap peers: parsing their addresses, and the pure state machine that joins the overlay
//! through them and reconnects to them when they are lost.
//!
//! The machine performs no I/O: the driver feeds it connection events and timer expiries and
//! carries out the [`Action`]s it returns, so every path is unit-tested without sockets.

use std::{collections::HashSet, fmt, str::FromStr, time::Duration};

use libp2p::{Multiaddr, PeerId, multiaddr::Protocol};

use super::backoff::Backoff;

/// A bootstrap node: its peer ID and the address to dial it at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BootstrapAddr {
    /// The bootstrap's peer ID, taken from the `/p2p/` part at the end of `addr`.
    pub peer: PeerId,
    /// The full address as given, ending in `/p2p/<peer>`.
    pub addr: Multiaddr,
}

impl FromStr for BootstrapAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let addr: Multiaddr = text
            .trim()
            .parse()
            .map_err(|e| format!("'{text}' is not a multiaddr ({e})"))?;
        match addr.iter().last() {
            Some(Protocol::P2p(peer)) => Ok(Self { peer, addr }),
            _ => Err(format!(
                "bootstrap address '{text}' does not end in /p2p/<peer id>: copy the whole \
                 address ping-monitor prints"
            )),
        }
    }
}

impl fmt::Display for BootstrapAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}

/// Joining failed: no bootstrap could be reached in any attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe_join_failure(*.attempts, .tried))]
pub struct JoinError {
    /// How many rounds of dials were made ([`BootstrapPolicy::join_attempts`]).
    pub attempts: u32,
    /// Each bootstrap with the last error dialing it.
    pub tried: Vec<(BootstrapAddr, String)>,
}

fn describe_join_failure(attempts: u32, tried: &[(BootstrapAddr, String)]) -> String {
    let tried: Vec<String> = tried
        .iter()
        .map(|(addr, error)| format!("{addr} ({error})"))
        .collect();
    format!(
        "could not reach any bootstrap in {attempts} attempts; tried: {}",
        tried.join(", ")
    )
}

/// A timer the machine asks the driver to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// The next round of dials while joining.
    JoinRound,
    /// Dial one lost bootstrap again.
    Redial(PeerId),
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    Dial(PeerId, Multiaddr),
    Schedule(Timer, Duration),
    /// The first bootstrap connection came up: the node has joined.
    Joined,
    JoinFailed(JoinError),
    /// A bootstrap came back after the node had joined: re-announce what this node provides,
    /// as the bootstrap (or the DHT behind it) may have lost it.
    Reconnected(PeerId),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Dialing,
    Connected,
}

#[derive(Debug)]
struct Entry {
    addr: BootstrapAddr,
    state: State,
    backoff: Backoff,
    last_error: Option<String>,
}

#[derive(Debug)]
struct Joining {
    round: u32,
    failed: HashSet<PeerId>,
}

/// Reconnection delays and how many rounds joining may take.
#[derive(Debug, Clone, Copy)]
pub struct BootstrapPolicy {
    /// Rounds of parallel dials before joining gives up.
    pub join_attempts: u32,
    /// First delay after a failed round or a lost bootstrap; doubles on each failure.
    pub backoff_initial: Duration,
    /// The longest delay between two attempts.
    pub backoff_max: Duration,
}

impl Default for BootstrapPolicy {
    fn default() -> Self {
        Self {
            join_attempts: 5,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Bootstraps {
    entries: Vec<Entry>,
    joining: Option<Joining>,
    policy: BootstrapPolicy,
    round_backoff: Backoff,
}

impl Bootstraps {
    pub fn new(addrs: &[BootstrapAddr], policy: BootstrapPolicy) -> Self {
        let backoff = Backoff::new(policy.backoff_initial, policy.backoff_max);
        let mut entries: Vec<Entry> = Vec::new();
        for addr in addrs {
            // The same bootstrap given twice (flag and env, say) is dialed once.
            if !entries.iter().any(|e| e.addr.peer == addr.peer) {
                entries.push(Entry {
                    addr: addr.clone(),
                    state: State::Idle,
                    backoff,
                    last_error: None,
                });
            }
        }
        Self {
            entries,
            joining: None,
            policy,
            round_backoff: backoff,
        }
    }

    pub fn addrs(&self) -> impl Iterator<Item = &BootstrapAddr> {
        self.entries.iter().map(|e| &e.addr)
    }

    fn entry(&mut self, peer: &PeerId) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| &e.addr.peer == peer)
    }

    /// Starts joining: dial every bootstrap at once. With none configured (the first bootstrap
    /// of a network), the node has joined already.
    pub fn start(&mut self) -> Vec<Action> {
        if self.entries.is_empty() {
            return vec![Action::Joined];
        }
        self.joining = Some(Joining {
            round: 1,
            failed: HashSet::new(),
        });
        self.dial_idle()
    }

    fn dial_idle(&mut self) -> Vec<Action> {
        self.entries
            .iter_mut()
            .filter(|e| e.state == State::Idle)
            .map(|e| {
                e.state = State::Dialing;
                Action::Dial(e.addr.peer, e.addr.addr.clone())
            })
            .collect()
    }

    /// A connection to `peer` is up (whoever dialed).
    pub fn on_connected(&mut self, peer: &PeerId) -> Vec<Action> {
        let Some(entry) = self.entry(peer) else {
            return vec![];
        };
        let was = entry.state;
        entry.state = State::Connected;
        entry.backoff.reset();
        entry.last_error = None;
        if was == State::Connected {
            return vec![];
        }
        if self.joining.take().is_some() {
            self.round_backoff.reset();
            // Bootstraps that failed this round keep being tried in the background.
            let mut actions = vec![Action::Joined];
            for e in self.entries.iter_mut().filter(|e| e.state == State::Idle) {
                actions.push(Action::Schedule(
                    Timer::Redial(e.addr.peer),
                    e.backoff.next_delay(),
                ));
            }
            actions
        } else {
            vec![Action::Reconnected(*peer)]
        }
    }

    /// Our dial to `peer` failed with `error`.
    pub fn on_dial_failed(&mut self, peer: &PeerId, error: String) -> Vec<Action> {
        let joined = self.joining.is_none();
        let Some(entry) = self.entry(peer) else {
            return vec![];
        };
        if entry.state != State::Dialing {
            // A dial someone else started (kad, a stream), or a connection that already won.
            return vec![];
        }
        entry.state = State::Idle;
        entry.last_error = Some(error);
        if joined {
            let delay = entry.backoff.next_delay();
            return vec![Action::Schedule(Timer::Redial(*peer), delay)];
        }
        let total = self.entries.len();
        let joining = self.joining.as_mut().expect("checked above");
        joining.failed.insert(*peer);
        if joining.failed.len() < total {
            return vec![];
        }
        if joining.round < self.policy.join_attempts {
            joining.round += 1;
            joining.failed.clear();
            return vec![Action::Schedule(
                Timer::JoinRound,
                self.round_backoff.next_delay(),
            )];
        }
        self.joining = None;
        let tried = self
            .entries
            .iter()
            .map(|e| (e.addr.clone(), e.last_error.clone().unwrap_or_default()))
            .collect();
        vec![Action::JoinFailed(JoinError {
            attempts: self.policy.join_attempts,
            tried,
        })]
    }

    /// The last connection to `peer` closed.
    pub fn on_disconnected(&mut self, peer: &PeerId) -> Vec<Action> {
        let Some(entry) = self.entry(peer) else {
            return vec![];
        };
        if entry.state != State::Connected {
            return vec![];
        }
        entry.state = State::Idle;
        let delay = entry.backoff.next_delay();
        vec![Action::Schedule(Timer::Redial(*peer), delay)]
    }

    pub fn on_timer(&mut self, timer: Timer) -> Vec<Action> {
        match timer {
            Timer::JoinRound if self.joining.is_some() => self.dial_idle(),
            Timer::JoinRound => vec![],
            Timer::Redial(peer) => match self.entry(&peer) {
                Some(entry) if entry.state == State::Idle => {
                    entry.state = State::Dialing;
                    vec![Action::Dial(peer, entry.addr.addr.clone())]
                }
                _ => vec![],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> BootstrapAddr {
        let peer = PeerId::random();
        format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
            .parse()
            .unwrap()
    }

    fn policy() -> BootstrapPolicy {
        BootstrapPolicy {
            join_attempts: 2,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(4),
        }
    }

    fn dials(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Dial(..)))
            .count()
    }

    #[test]
    fn parses_full_addresses_and_names_bad_ones() {
        let a = addr(4001);
        assert!(a.to_string().ends_with(&a.peer.to_string()));
        let err = "/ip4/127.0.0.1/tcp/4001"
            .parse::<BootstrapAddr>()
            .unwrap_err();
        assert!(
            err.contains("/ip4/127.0.0.1/tcp/4001") && err.contains("/p2p/"),
            "{err}"
        );
        let err = "not-an-addr".parse::<BootstrapAddr>().unwrap_err();
        assert!(err.contains("'not-an-addr' is not a multiaddr"), "{err}");
    }

    #[test]
    fn no_bootstraps_means_joined_at_once() {
        assert_eq!(Bootstraps::new(&[], policy()).start(), vec![Action::Joined]);
    }

    #[test]
    fn dials_all_in_parallel_and_joins_on_first_success() {
        let (a, b) = (addr(1), addr(2));
        let mut set = Bootstraps::new(&[a.clone(), b.clone(), a.clone()], policy());
        assert_eq!(dials(&set.start()), 2, "duplicates are dialed once");
        assert!(set.on_dial_failed(&a.peer, "refused".into()).is_empty());
        let actions = set.on_connected(&b.peer);
        assert_eq!(actions[0], Action::Joined);
        // The failed one keeps being retried in the background.
        assert_eq!(
            actions[1],
            Action::Schedule(Timer::Redial(a.peer), Duration::from_secs(1))
        );
        assert_eq!(dials(&set.on_timer(Timer::Redial(a.peer))), 1);
    }

    #[test]
    fn gives_up_after_the_attempts_naming_every_address() {
        let (a, b) = (addr(1), addr(2));
        let mut set = Bootstraps::new(&[a.clone(), b.clone()], policy());
        set.start();
        set.on_dial_failed(&a.peer, "refused".into());
        let actions = set.on_dial_failed(&b.peer, "timeout".into());
        assert_eq!(
            actions,
            vec![Action::Schedule(Timer::JoinRound, Duration::from_secs(1))]
        );
        assert_eq!(dials(&set.on_timer(Timer::JoinRound)), 2);
        set.on_dial_failed(&a.peer, "refused again".into());
        let actions = set.on_dial_failed(&b.peer, "timeout again".into());
        let [Action::JoinFailed(error)] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        let text = error.to_string();
        assert!(
            text.contains(&a.to_string()) && text.contains("refused again"),
            "{text}"
        );
        assert!(
            text.contains(&b.to_string()) && text.contains("timeout again"),
            "{text}"
        );
        assert!(text.contains("2 attempts"), "{text}");
    }

    #[test]
    fn lost_bootstrap_is_redialed_with_growing_delays_then_reconnected() {
        let a = addr(1);
        let mut set = Bootstraps::new(std::slice::from_ref(&a), policy());
        set.start();
        set.on_connected(&a.peer);
        let delays: Vec<_> = std::iter::once(set.on_disconnected(&a.peer))
            .chain((0..3).map(|_| {
                set.on_timer(Timer::Redial(a.peer));
                set.on_dial_failed(&a.peer, "refused".into())
            }))
            .map(|actions| match actions.as_slice() {
                [Action::Schedule(Timer::Redial(_), d)] => d.as_secs(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 4]);
        set.on_timer(Timer::Redial(a.peer));
        assert_eq!(set.on_connected(&a.peer), vec![Action::Reconnected(a.peer)]);
        // Backoff starts over after a success.
        assert_eq!(
            set.on_disconnected(&a.peer),
            vec![Action::Schedule(
                Timer::Redial(a.peer),
                Duration::from_secs(1)
            )]
        );
    }

    #[test]
    fn failures_of_dials_we_did_not_start_are_ignored() {
        let a = addr(1);
        let mut set = Bootstraps::new(std::slice::from_ref(&a), policy());
        set.start();
        set.on_connected(&a.peer);
        assert!(set.on_dial_failed(&a.peer, "x".into()).is_empty());
        assert!(set.on_connected(&a.peer).is_empty());
        assert!(set.on_dial_failed(&PeerId::random(), "x".into()).is_empty());
    }
}
