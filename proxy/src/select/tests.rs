use super::*;

const MS: Duration = Duration::from_millis(1);
const T: Tuning = Tuning::DEFAULT;
const LIMITS: Limits = Limits {
    soft_rtt: Duration::from_millis(20),
    hard_rtt: Duration::from_millis(100),
};

/// A deterministic stand-in for randomness: cycles through 0, 1, 2, ...
fn counter() -> impl FnMut(usize) -> usize {
    let mut next = 0;
    move |n| {
        next += 1;
        next % n
    }
}

/// A decision with its RTT in whole milliseconds (the histogram keeps two significant digits).
fn summary(decision: Decision<&'static str>) -> (Option<&'static str>, bool, Option<u128>) {
    (
        decision.pick,
        decision.want_nearer,
        decision.pick_rtt.map(|rtt| rtt.as_millis()),
    )
}

fn chooser(policy: Policy, rtts: &[(&'static str, u64)], now: Instant) -> Chooser<&'static str> {
    let mut chooser = Chooser::new(Tuning { policy, ..T });
    for &(key, ms) in rtts {
        chooser.add(key, now);
        for _ in 0..10 {
            chooser.record_rtt(&key, MS * ms as u32, now);
        }
    }
    chooser
}

fn share(chooser: &mut Chooser<&'static str>, key: &str, now: Instant, rounds: usize) -> f64 {
    let mut random = counter();
    let hits = (0..rounds)
        .filter(|_| chooser.choose(now, LIMITS, &mut random).pick == Some(key))
        .count();
    hits as f64 / rounds as f64
}

#[test]
fn prefers_the_near_instance_under_both_rtt_policies() {
    let now = Instant::now();
    for policy in [Policy::RttHistogram, Policy::PeakEwma] {
        let mut c = chooser(policy, &[("near", 2), ("far", 22)], now);
        // "far" is over the soft limit, so all traffic goes to "near".
        assert_eq!(share(&mut c, "near", now, 100), 1.0, "{policy:?}");
        let mut c = chooser(policy, &[("a", 2), ("b", 10), ("c", 15)], now);
        // All within soft: P2C favours the lowest RTT but spreads some load.
        let a = share(&mut c, "a", now, 300);
        assert!(a > 0.5, "{policy:?}: {a}");
    }
}

#[test]
fn in_flight_requests_spread_load_among_equals() {
    let now = Instant::now();
    let mut c = chooser(Policy::RttHistogram, &[("a", 5), ("b", 5)], now);
    for _ in 0..5 {
        c.start(&"a", now);
    }
    assert_eq!(share(&mut c, "b", now, 50), 1.0);
}

#[test]
fn requests_still_crossing_the_network_are_not_load_under_rtt_histogram() {
    // Both over the soft limit: "near" 21 ms away with the four requests in flight that 200
    // requests a second keep on a 21 ms path, all younger than that; "far" 43 ms away, idle.
    let now = Instant::now();
    let started = now - 10 * MS;
    let mut c = chooser(Policy::RttHistogram, &[("near", 21), ("far", 43)], started);
    for _ in 0..4 {
        c.start(&"near", started);
    }
    assert_eq!(share(&mut c, "near", now, 100), 1.0);
    // Peak EWMA, as Finagle's, counts them: 21 x 5 against 43 x 1.
    let mut c = chooser(Policy::PeakEwma, &[("near", 21), ("far", 43)], started);
    for _ in 0..4 {
        c.start(&"near", started);
    }
    assert_eq!(share(&mut c, "far", now, 100), 1.0);
}

#[test]
fn a_request_a_little_late_is_not_load_under_rtt_histogram() {
    // One request under way 23 ms on a 21 ms path (its jitter, a millisecond at the sidecar):
    // still not waiting at the instance. Counted, "near" would cost 42 against "far"'s 40.
    let now = Instant::now();
    let started = now - 23 * MS;
    let mut c = chooser(Policy::RttHistogram, &[("near", 21), ("far", 40)], started);
    c.start(&"near", started);
    assert_eq!(share(&mut c, "near", now, 100), 1.0);
}

#[test]
fn requests_past_the_network_are_load_under_rtt_histogram() {
    // The same four requests, in flight for 200 ms: at a slow service, or queued for it.
    let now = Instant::now();
    let started = now - 200 * MS;
    let mut c = chooser(Policy::RttHistogram, &[("near", 21), ("far", 43)], started);
    for _ in 0..4 {
        c.start(&"near", started);
    }
    assert_eq!(share(&mut c, "far", now, 100), 1.0);
    // As they end, "near" is cheaper again.
    for _ in 0..3 {
        c.finish(&"near", true, now);
    }
    assert_eq!(share(&mut c, "near", now, 100), 1.0);
}

#[test]
fn hard_limit_excludes_and_soft_limit_asks_for_a_nearer_instance() {
    let now = Instant::now();
    let mut c = chooser(Policy::RttHistogram, &[("slow", 150)], now);
    assert_eq!(
        c.choose(now, LIMITS, counter()),
        Decision {
            pick: None,
            want_nearer: true,
            pick_rtt: None,
        }
    );
    let mut c = chooser(Policy::RttHistogram, &[("meh", 50)], now);
    assert_eq!(
        summary(c.choose(now, LIMITS, counter())),
        (Some("meh"), true, Some(50))
    );
    let mut c = chooser(Policy::RttHistogram, &[("good", 5), ("meh", 50)], now);
    assert_eq!(
        summary(c.choose(now, LIMITS, counter())),
        (Some("good"), false, Some(5))
    );
    let mut empty: Chooser<&str> = Chooser::new(T);
    assert_eq!(
        empty.choose(now, LIMITS, counter()),
        Decision {
            pick: None,
            want_nearer: true,
            pick_rtt: None,
        }
    );
}

#[test]
fn unmeasured_instances_wait_for_a_probe_unless_nothing_else_is_left() {
    let now = Instant::now();
    let mut c = chooser(Policy::RttHistogram, &[("known", 5)], now);
    c.add("new", now);
    assert_eq!(share(&mut c, "known", now, 50), 1.0);
    c.remove(&"known");
    assert_eq!(c.choose(now, LIMITS, counter()).pick, Some("new"));
    c.record_rtt(&"new", MS, now);
    assert_eq!(
        summary(c.choose(now, LIMITS, counter())),
        (Some("new"), false, Some(1))
    );
}

#[test]
fn repeated_failures_eject_for_growing_periods() {
    let t0 = Instant::now();
    let mut c = chooser(Policy::RttHistogram, &[("flaky", 2), ("steady", 10)], t0);
    let fail = |c: &mut Chooser<&'static str>, at: Instant| {
        for _ in 0..T.eject_after {
            c.start(&"flaky", at);
            c.finish(&"flaky", false, at);
        }
    };
    fail(&mut c, t0);
    assert_eq!(share(&mut c, "steady", t0, 20), 1.0, "ejected");
    let back = t0 + T.first_ejection;
    assert!(
        share(&mut c, "flaky", back, 20) > 0.5,
        "back after the first period"
    );
    fail(&mut c, back);
    assert_eq!(
        share(&mut c, "steady", back + T.first_ejection, 20),
        1.0,
        "second ejection is longer"
    );
    assert!(share(&mut c, "flaky", back + T.first_ejection * 2, 20) > 0.5);
    // A success forgets the history: the next ejection is short again.
    c.finish(&"flaky", true, back + T.first_ejection * 2);
    let later = back + T.first_ejection * 3;
    fail(&mut c, later);
    assert!(share(&mut c, "flaky", later + T.first_ejection, 20) > 0.5);
}

#[test]
fn traffic_moves_when_rtts_change() {
    let t0 = Instant::now();
    let mut c = chooser(Policy::RttHistogram, &[("a", 2), ("b", 30)], t0);
    assert_eq!(share(&mut c, "a", t0, 20), 1.0);
    // The window forgets: after it has turned over, only the new samples count.
    let later = t0 + T.rtt_window;
    for _ in 0..10 {
        c.record_rtt(&"a", MS * 30, later);
        c.record_rtt(&"b", MS * 2, later);
    }
    assert_eq!(share(&mut c, "b", later + QUANTILE_REFRESH, 20), 1.0);
}

#[test]
fn round_robin_ignores_rtt_but_not_ejection() {
    let now = Instant::now();
    let mut c = chooser(Policy::RoundRobin, &[("a", 1), ("b", 500), ("c", 1)], now);
    let picks: Vec<_> = (0..6)
        .map(|_| c.choose(now, LIMITS, counter()).pick.unwrap())
        .collect();
    assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
    for _ in 0..T.eject_after {
        c.finish(&"b", false, now);
    }
    let picks: Vec<_> = (0..4)
        .map(|_| c.choose(now, LIMITS, counter()).pick.unwrap())
        .collect();
    assert!(!picks.contains(&"b"), "{picks:?}");
}

#[test]
fn an_instance_whose_window_ran_empty_keeps_its_last_estimate() {
    let t0 = Instant::now();
    let mut c = chooser(Policy::RttHistogram, &[("quiet", 3)], t0);
    c.add("new", t0);
    let much_later = t0 + Duration::from_secs(60);
    let decision = c.choose(much_later, LIMITS, counter());
    assert_eq!(decision.pick, Some("quiet"), "still measured, unlike 'new'");
    let rtt = decision.pick_rtt.unwrap();
    assert!(rtt >= MS * 3 && rtt < MS * 4, "{rtt:?}");
}

#[test]
fn the_view_shows_quantiles_in_flight_and_ejection() {
    let now = Instant::now();
    let mut c = chooser(Policy::RttHistogram, &[("a", 4)], now);
    c.add("b", now);
    c.start(&"a", now);
    for _ in 0..T.eject_after {
        c.finish(&"b", false, now);
    }
    let view = c.view(now);
    assert_eq!(view.len(), 2);
    assert_eq!(view[0].key, "a");
    assert_eq!(view[0].in_flight, 1);
    let [p50, _, p99] = view[0].quantiles.unwrap();
    assert!(p50 >= MS * 4 && p99 < MS * 5, "{p50:?} {p99:?}");
    assert!(!view[0].ejected);
    assert_eq!(view[1].quantiles, None);
    assert!(view[1].ejected);
}

#[test]
fn a_retry_avoids_the_instance_that_failed_unless_it_is_the_only_one() {
    let now = Instant::now();
    for policy in [Policy::RttHistogram, Policy::PeakEwma, Policy::RoundRobin] {
        let mut c = chooser(policy, &[("near", 1), ("far", 30)], now);
        for _ in 0..10 {
            let pick = c
                .choose_avoiding(now, LIMITS, counter(), Some(&"near"))
                .pick;
            assert_eq!(pick, Some("far"), "{policy:?}");
        }
        c.remove(&"far");
        let pick = c
            .choose_avoiding(now, LIMITS, counter(), Some(&"near"))
            .pick;
        assert_eq!(pick, Some("near"), "{policy:?}");
    }
}

#[test]
fn unanswered_probes_move_traffic_away_once_older_than_the_next_instance() {
    let start = Instant::now();
    for policy in [Policy::RttHistogram, Policy::PeakEwma] {
        let mut c = chooser(policy, &[("edge", 1), ("cloud", 15)], start);
        assert_eq!(share(&mut c, "edge", start, 50), 1.0, "{policy:?}");
        // The edge freezes: its probe goes unanswered.
        c.probe_sent(&"edge", start);
        let soon = start + MS * 5;
        assert_eq!(
            share(&mut c, "edge", soon, 50),
            1.0,
            "{policy:?}: 5 ms is no news"
        );
        let later = start + MS * 30;
        assert_eq!(
            share(&mut c, "cloud", later, 50),
            1.0,
            "{policy:?}: 30 ms > 15 ms"
        );
        let much_later = start + MS * 150;
        let decision = c.choose(much_later, LIMITS, counter());
        assert_eq!(
            decision.pick,
            Some("cloud"),
            "{policy:?}: edge over the hard limit"
        );
        // That probe times out and the next goes unanswered too: the wait counts from the
        // first, so the edge gets nothing meanwhile.
        c.probe_sent(&"edge", much_later);
        let decision = c.choose(much_later + MS * 5, LIMITS, counter());
        assert_eq!(decision.pick, Some("cloud"), "{policy:?}: still frozen");
        // An answer comes: the edge is back on its samples.
        c.probe_answered(&"edge");
        c.record_rtt(&"edge", MS, much_later);
        assert_eq!(share(&mut c, "edge", much_later, 50), 1.0, "{policy:?}");
    }
}
