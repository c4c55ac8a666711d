//! What one UDP source can make an l4-proxy hold or carry. Every source address sending to a
//! chain's UDP listener is a client with a tunnel of its own, so addresses are what a flood
//! (spoofed or not) multiplies, and datagrams what one client can send too many of. Each limit
//! is a flag; each datagram dropped for one is counted in
//! `l4_datagrams_dropped_total{reason}`:
//!
//! | limit | flag | when hit |
//! |---|---|---|
//! | `too_many_clients` | `--max-udp-clients` (1024 per chain listener) | a datagram from a new source while that many clients are held is dropped; clients leave after `--udp-idle-timeout` |
//! | `rate_limited` | `--udp-rate` (100,000 datagrams/s per source) | a source's datagrams over that rate are dropped; bursts of a tenth of a second's worth pass |
//!
//! Past both, a client's queue ([`super::front::CLIENT_QUEUE`]) and QUIC's flow control bound
//! what it holds. [`TokenBucket`] is pure: the time is a parameter.

use std::time::Duration;

/// The UDP limits of an l4-proxy's chain listeners.
#[derive(Debug, Clone, Copy)]
pub struct UdpLimits {
    /// A client that sends and receives nothing for this long is forgotten, and its tunnel
    /// closed.
    pub idle: Duration,
    /// Clients held at once by one chain listener.
    pub max_clients: usize,
    /// Datagrams a second one source may send.
    pub rate: u32,
}

impl UdpLimits {
    /// The burst a source may send at once: a tenth of a second at its rate, at least one.
    pub fn burst(&self) -> f64 {
        (f64::from(self.rate) / 10.0).max(1.0)
    }
}

/// A token bucket: `rate` tokens a second, holding at most `burst`; one per datagram.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms` (milliseconds on any clock that does not go back).
    pub fn new(now_ms: u64, burst: f64) -> Self {
        Self {
            tokens: burst,
            last_ms: now_ms,
        }
    }

    /// Takes a token at `now_ms` if there is one, after adding what `rate` gave since the last
    /// call (up to `burst`); whether the datagram passes.
    pub fn admit(&mut self, now_ms: u64, rate: u32, burst: f64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + elapsed as f64 * f64::from(rate) / 1000.0).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let limits = UdpLimits {
            idle: Duration::from_secs(60),
            max_clients: 1,
            rate: 1000,
        };
        let burst = limits.burst();
        assert_eq!(burst, 100.0);
        let mut bucket = TokenBucket::new(0, burst);
        let passed = (0..150)
            .filter(|_| bucket.admit(0, limits.rate, burst))
            .count();
        assert_eq!(passed, 100, "the burst, at once");
        // 10 ms later, 10 more; a whole second later, no more than a burst.
        let passed = (0..50)
            .filter(|_| bucket.admit(10, limits.rate, burst))
            .count();
        assert_eq!(passed, 10);
        let passed = (0..500)
            .filter(|_| bucket.admit(1010, limits.rate, burst))
            .count();
        assert_eq!(passed, 100);
        // Sent at its rate, one a millisecond, everything passes, for as long as it goes on.
        let passed = (1011..3011)
            .filter(|&ms| bucket.admit(ms, limits.rate, burst))
            .count();
        assert_eq!(passed, 2000);
    }

    #[test]
    fn a_clock_that_goes_back_gives_nothing() {
        let mut bucket = TokenBucket::new(100, 1.0);
        assert!(bucket.admit(100, 1000, 1.0));
        assert!(!bucket.admit(50, 1000, 1.0));
        assert!(bucket.admit(101, 1000, 1.0));
    }
}
