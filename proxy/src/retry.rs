//! The retry budget: retries may add at most about [`RATIO`] of the requests, plus a small
//! reserve so that a quiet proxy can still retry. Without a budget, retries multiply the load
//! on a network that is already failing (a retry storm); with one, a failure of one instance
//! costs at most a fifth more requests however many clients retry.
//!
//! A token bucket in one atomic: every request deposits [`RATIO`] of a token, every retry
//! withdraws one; the balance is capped so a long quiet spell cannot store a storm.

use std::sync::atomic::{AtomicI64, Ordering};

/// Whether a request with this method may be sent twice (RFC 9110 section 9.2.2): the rule
/// for the ingress's retries and hedges and for the sidecar's retry on a stale connection.
pub fn idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    )
}

/// Retries allowed per request, on average.
pub const RATIO: f64 = 0.2;
/// Tokens at start, so the first failures can be retried.
pub const RESERVE: i64 = 10;
/// Most tokens the bucket holds.
pub const MAX_TOKENS: i64 = 1000;

/// Tokens are counted in thousandths so that deposits of [`RATIO`] stay integers.
const MILLI: i64 = 1000;
const DEPOSIT: i64 = (RATIO * MILLI as f64) as i64;

#[derive(Debug)]
pub struct RetryBudget {
    milli_tokens: AtomicI64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            milli_tokens: AtomicI64::new(RESERVE * MILLI),
        }
    }
}

impl RetryBudget {
    /// A request (not a retry) arrived.
    pub fn deposit(&self) {
        // A racy cap is fine: it can overshoot by one deposit per concurrent caller.
        if self.milli_tokens.load(Ordering::Relaxed) < MAX_TOKENS * MILLI {
            self.milli_tokens.fetch_add(DEPOSIT, Ordering::Relaxed);
        }
    }

    /// Takes a token for one retry; `false` when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |balance| {
                (balance >= MILLI).then_some(balance - MILLI)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_allows_a_few_retries_before_any_request() {
        let budget = RetryBudget::default();
        for _ in 0..RESERVE {
            assert!(budget.withdraw());
        }
        assert!(!budget.withdraw());
    }

    #[test]
    fn retries_are_about_a_fifth_of_requests() {
        let budget = RetryBudget::default();
        while budget.withdraw() {}
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 200);
    }

    #[test]
    fn a_quiet_spell_stores_at_most_the_cap() {
        let budget = RetryBudget::default();
        for _ in 0..100_000 {
            budget.deposit();
        }
        let mut retries = 0;
        while budget.withdraw() {
            retries += 1;
        }
        assert_eq!(retries, MAX_TOKENS);
    }
}
