//! What a withdrawal leaves behind for a while, so that an announcement sent before it cannot
//! put the record back (pure; the driver passes the time).
//!
//! kad counts an `ADD_PROVIDER` message sent once it is queued (to a peer not yet connected:
//! once the dial starts), so a provider that withdraws right after announcing cannot know that
//! its announcements have arrived; one that arrives after the withdrawal would leave a record
//! of a stopped provider for its whole lifetime. Waiting for kad's queries and telling the
//! peers a second time 100 ms later still lost that race in one run of three on a loaded
//! machine (the test of issue 16's burst). So the peers told of a withdrawal refuse the rest:
//!
//! # Rules
//! 1. A peer that withdraws its record of a key at `t` leaves a tombstone for (peer, key)
//!    until `t + LINGER`, whether or not the record was held here: the announcement it guards
//!    against is the one that has not arrived yet.
//! 2. An announcement (`ADD_PROVIDER`) from that peer for that key is dropped while its
//!    tombstone stands. Nobody else's records are affected: the provider of a record is the
//!    peer the authenticated connection comes from.
//! 3. The provider keeps a tombstone of its own withdrawal, from when it starts (`t`) until
//!    `t +` [`OWN_LINGER`]: the peers lay theirs when told, up to the withdrawal's two
//!    deadlines later. Advertising the key again meanwhile is announced when it falls, when
//!    the holders take announcements again. (Others find the provider again that much later.)
//! 4. At most [`MAX_TOMBSTONES`] stand; past that the oldest goes first. A peer that withdraws
//!    more than that within [`LINGER`] can only reopen the race for its own records, and for
//!    those of the others' withdrawals it pushes out: the cost is a stale record, as before.
//!
//! An announcement delayed beyond [`LINGER`] (a dial that takes longer) still puts the record
//! back until it expires, as a crash leaves it.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use libp2p::{PeerId, kad::RecordKey};

use super::withdraw::WITHDRAW_DEADLINE;

/// How long a withdrawal refuses the announcements it may have overtaken: far longer than a
/// queued message takes to go out on an open or opening connection.
pub(crate) const LINGER: Duration = Duration::from_secs(10);

/// How long a provider's tombstone of its own withdrawal stands (rule 3): [`LINGER`], after
/// the longest a withdrawal takes to reach its peers (waiting for announcements under way,
/// then telling the holders), and a second for a slow peer.
pub(crate) const OWN_LINGER: Duration = LINGER
    .saturating_add(WITHDRAW_DEADLINE)
    .saturating_add(WITHDRAW_DEADLINE)
    .saturating_add(Duration::from_secs(1));

/// Tombstones kept at most (about 150 bytes each).
pub(crate) const MAX_TOMBSTONES: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    /// When each (provider, key)'s tombstone falls.
    until: HashMap<(PeerId, RecordKey), Instant>,
    /// The same entries in the order they were laid, for pruning and rule 4. Pruning stops at
    /// the first that stands (a provider's own last longer, so a few fallen ones may wait
    /// behind it; [`Tombstones::standing`] checks the time). An entry laid again is found here
    /// twice; the older one is skipped when it comes up.
    order: VecDeque<(Instant, PeerId, RecordKey)>,
}

impl Tombstones {
    /// `peer` withdrew its record of `key` at `now`: its announcements are refused for
    /// `linger` ([`LINGER`] at others, [`OWN_LINGER`] at itself; rules 1, 3, 4).
    pub fn lay(&mut self, peer: PeerId, key: RecordKey, now: Instant, linger: Duration) {
        self.prune(now);
        let until = now + linger;
        self.until.insert((peer, key.clone()), until);
        self.order.push_back((until, peer, key));
        while self.until.len() > MAX_TOMBSTONES {
            self.drop_oldest();
        }
    }

    /// When the tombstone of `peer`'s record of `key` falls, if it stands at `now` (rules 2, 3).
    pub fn standing(&self, peer: &PeerId, key: &RecordKey, now: Instant) -> Option<Instant> {
        if self.until.is_empty() {
            return None; // the common case, without a clone of the key
        }
        let until = *self.until.get(&(*peer, key.clone()))?;
        (now < until).then_some(until)
    }

    /// Drops the tombstones that have fallen by `now`.
    pub fn prune(&mut self, now: Instant) {
        while self.order.front().is_some_and(|(until, ..)| *until <= now) {
            self.drop_oldest();
        }
    }

    /// How many tombstones stand (some may have fallen since the last [`Tombstones::prune`]).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.until.len()
    }

    fn drop_oldest(&mut self) {
        let Some((until, peer, key)) = self.order.pop_front() else {
            return;
        };
        let entry = (peer, key);
        // Laid again since: the newer entry further back in `order` owns it.
        if self.until.get(&entry) == Some(&until) {
            self.until.remove(&entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> RecordKey {
        RecordKey::new(&name)
    }

    #[test]
    fn a_withdrawal_refuses_that_peers_announcements_of_that_key_until_it_falls() {
        let (mut stones, t0) = (Tombstones::default(), Instant::now());
        let (peer, other) = (PeerId::random(), PeerId::random());
        stones.lay(peer, key("a"), t0, LINGER);
        let at = |d: Duration| t0 + d;
        assert_eq!(
            stones.standing(&peer, &key("a"), at(Duration::ZERO)),
            Some(t0 + LINGER)
        );
        assert!(stones.standing(&peer, &key("a"), at(LINGER / 2)).is_some());
        assert_eq!(
            stones.standing(&peer, &key("a"), at(LINGER)),
            None,
            "fallen"
        );
        assert_eq!(stones.standing(&peer, &key("b"), t0), None, "another key");
        assert_eq!(stones.standing(&other, &key("a"), t0), None, "another peer");
    }

    #[test]
    fn a_tombstone_laid_again_stands_from_the_latest_withdrawal() {
        let (mut stones, t0) = (Tombstones::default(), Instant::now());
        let peer = PeerId::random();
        stones.lay(peer, key("a"), t0, LINGER);
        let later = t0 + LINGER / 2;
        stones.lay(peer, key("a"), later, LINGER);
        // The first entry's time comes and goes without taking the second with it.
        stones.prune(t0 + LINGER);
        assert_eq!(
            stones.standing(&peer, &key("a"), t0 + LINGER),
            Some(later + LINGER)
        );
        assert_eq!(stones.len(), 1);
        stones.prune(later + LINGER);
        assert_eq!(stones.len(), 0);
    }

    #[test]
    fn fallen_tombstones_are_dropped_and_at_most_the_limit_stand() {
        let (mut stones, t0) = (Tombstones::default(), Instant::now());
        let peer = PeerId::random();
        for i in 0..MAX_TOMBSTONES + 10 {
            stones.lay(peer, key(&i.to_string()), t0, LINGER);
        }
        assert_eq!(stones.len(), MAX_TOMBSTONES);
        assert_eq!(stones.standing(&peer, &key("0"), t0), None, "oldest gone");
        assert!(stones.standing(&peer, &key("10"), t0).is_some());
        // Laying one after the others fell prunes them all.
        stones.lay(peer, key("x"), t0 + LINGER, LINGER);
        assert_eq!(stones.len(), 1);
        assert_eq!(stones.order.len(), 1);
    }
}
