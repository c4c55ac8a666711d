//! The retry budget: retries may add at most about a ratio of the requests (perf.conf's
//! `retry-ratio`, a fifth by default), plus a small reserve (`retry-reserve`) so that a quiet
//! proxy can still retry. Without a budget, retries multiply the load
//! on a network that is already failing (a retry storm); with one, a failure of one instance
//! costs at most a fifth more requests however many clients retry.
//!
//! A token bucket in one atomic: every request deposits the ratio of a token, every retry
//! withdraws one; the balance is capped so a long quiet spell cannot store a storm. A reload
//! of perf.conf changes the ratio from the next request; the reserve is the balance at start.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::config::perf::Budget;

/// Whether a request with this method may be sent twice (RFC 9110 section 9.2.2): the rule
/// for the ingress's retries and hedges and for the sidecar's retry on a stale connection.
pub fn idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    )
}

/// Most tokens the bucket holds.
pub const MAX_TOKENS: i64 = 1000;

/// Tokens are counted in thousandths so that deposits of a ratio stay integers.
const MILLI: i64 = 1000;

/// The token bucket of the module doc; an ingress holds one for all its requests.
#[derive(Debug)]
pub struct RetryBudget {
    milli_tokens: AtomicI64,
    /// Thousandths of a token each request deposits.
    deposit: AtomicI64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(Budget::DEFAULT)
    }
}

impl RetryBudget {
    /// A bucket holding `budget.reserve` tokens, each request depositing `budget.ratio` of one.
    pub fn new(budget: Budget) -> Self {
        Self {
            milli_tokens: AtomicI64::new(i64::from(budget.reserve) * MILLI),
            deposit: AtomicI64::new(Self::milli(budget.ratio)),
        }
    }

    fn milli(ratio: f64) -> i64 {
        (ratio * MILLI as f64).round() as i64
    }

    /// Deposits `budget`'s ratio from now on (perf.conf was reloaded).
    pub fn retune(&self, budget: Budget) {
        self.deposit
            .store(Self::milli(budget.ratio), Ordering::Relaxed);
    }

    /// A request (not a retry) arrived.
    pub fn deposit(&self) {
        // A racy cap is fine: it can overshoot by one deposit per concurrent caller.
        if self.milli_tokens.load(Ordering::Relaxed) < MAX_TOKENS * MILLI {
            let deposit = self.deposit.load(Ordering::Relaxed);
            self.milli_tokens.fetch_add(deposit, Ordering::Relaxed);
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
        for _ in 0..Budget::DEFAULT.reserve {
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
    fn a_new_ratio_applies_from_the_next_request() {
        let budget = RetryBudget::default();
        while budget.withdraw() {}
        budget.retune(Budget {
            ratio: 0.5,
            reserve: 0,
        });
        let mut retries = 0;
        for _ in 0..100 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 50);
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
