//! Which peers are alive, from the node-to-node heartbeat: pure bookkeeping over
//! "heard node X at time t", so that the rules are unit-tested without sockets.
//!
//! Rules (with the default interval of 200 ms):
//! - A peer is dead once nothing was heard from it for [`Timing::dead_after`]
//!   (3 intervals plus half of one, for jitter: 700 ms).
//! - A peer that was dead (or never heard) counts as live only after it has been heard
//!   without a gap for [`Timing::rise`] (5 intervals: 1 s). A node that comes back
//!   therefore takes its addresses back once, after 1 s of steady heartbeats, and a
//!   node whose heartbeats come and go never takes anything.
//! - Except at start: peers heard within the first `dead_after` after this agent
//!   started count as live at once, since they were most likely running before it.
//! - This node itself announces nothing until it has run for `rise`: that is when its
//!   peers start counting it as live, so the two views agree.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// The heartbeat's timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub interval: Duration,
    pub dead_after: Duration,
    pub rise: Duration,
}

impl Timing {
    /// The timing for a heartbeat every `interval`.
    pub fn from_interval(interval: Duration) -> Self {
        Self {
            interval,
            dead_after: interval * 3 + interval / 2,
            rise: interval * 5,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Peer {
    /// Start of the current run of heartbeats without a gap.
    since: Instant,
    last: Instant,
}

/// What this agent heard from its peers.
#[derive(Debug)]
pub struct Liveness {
    timing: Timing,
    started: Instant,
    peers: HashMap<String, Peer>,
}

impl Liveness {
    pub fn new(timing: Timing, started: Instant) -> Self {
        Self {
            timing,
            started,
            peers: HashMap::new(),
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// A heartbeat from `node` arrived at `now`.
    pub fn heard(&mut self, node: &str, now: Instant) {
        let dead_after = self.timing.dead_after;
        match self.peers.get_mut(node) {
            Some(p) => {
                if now.saturating_duration_since(p.last) > dead_after {
                    p.since = now;
                }
                p.last = now;
            }
            None => {
                self.peers.insert(
                    node.to_owned(),
                    Peer {
                        since: now,
                        last: now,
                    },
                );
            }
        }
    }

    /// Whether peer `node` counts as live at `now`.
    pub fn is_live(&self, node: &str, now: Instant) -> bool {
        let Some(p) = self.peers.get(node) else {
            return false;
        };
        if now.saturating_duration_since(p.last) > self.timing.dead_after {
            return false;
        }
        let heard_at_start =
            p.since.saturating_duration_since(self.started) <= self.timing.dead_after;
        heard_at_start || now.saturating_duration_since(p.since) >= self.timing.rise
    }

    /// Whether this node may announce yet (see the module's rules).
    pub fn self_ready(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.started) >= self.timing.rise
    }

    /// Whether `node` was heard and not pruned since.
    pub fn knows(&self, node: &str) -> bool {
        self.peers.contains_key(node)
    }

    /// Forgets peers not heard for a long time (Nodes that were deleted).
    pub fn prune(&mut self, now: Instant) {
        let keep = self.timing.dead_after * 20;
        self.peers
            .retain(|_, p| now.saturating_duration_since(p.last) <= keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + MS * u32::try_from(ms).unwrap()
    }

    #[test]
    fn timing_from_interval() {
        let t = Timing::from_interval(MS * 200);
        assert_eq!(t.dead_after, MS * 700);
        assert_eq!(t.rise, MS * 1000);
    }

    #[test]
    fn peers_heard_at_start_are_live_at_once_and_die_after_three_misses() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Timing::from_interval(MS * 200), t0);
        assert!(!l.is_live("b", t0));
        l.heard("b", at(t0, 150));
        assert!(l.is_live("b", at(t0, 150)));
        assert!(!l.self_ready(at(t0, 999)));
        assert!(l.self_ready(at(t0, 1000)));
        // Heard every 200 ms, then silent after 1150.
        for ms in (350..=1150).step_by(200) {
            l.heard("b", at(t0, ms));
            assert!(l.is_live("b", at(t0, ms + 100)));
        }
        assert!(l.is_live("b", at(t0, 1850)));
        assert!(!l.is_live("b", at(t0, 1851)));
    }

    #[test]
    fn a_returning_peer_must_be_heard_for_rise_without_gaps() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Timing::from_interval(MS * 200), t0);
        l.heard("b", at(t0, 100));
        assert!(l.is_live("b", at(t0, 100)));
        // Dies, comes back at 5000.
        assert!(!l.is_live("b", at(t0, 5000)));
        for ms in (5000..5800).step_by(200) {
            l.heard("b", at(t0, ms));
            assert!(!l.is_live("b", at(t0, ms)), "live too early at {ms}");
        }
        l.heard("b", at(t0, 6000));
        assert!(l.is_live("b", at(t0, 6000)));
    }

    #[test]
    fn a_flapping_peer_never_counts() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Timing::from_interval(MS * 200), t0);
        // Starts being heard after the start window, with a gap of 800 ms every 600 ms.
        let mut ms = 2000;
        while ms < 10_000 {
            for k in 0..3 {
                l.heard("b", at(t0, ms + k * 200));
                assert!(!l.is_live("b", at(t0, ms + k * 200)));
            }
            ms += 400 + 800;
        }
    }

    #[test]
    fn unknown_and_pruned_peers_are_dead() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Timing::from_interval(MS * 200), t0);
        l.heard("b", t0);
        l.prune(at(t0, 100_000));
        assert!(!l.is_live("b", at(t0, 100_000)));
        assert!(l.peers.is_empty());
    }
}
