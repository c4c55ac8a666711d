//! The rules of the health machine, in virtual time: the tests pass the clock.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn machine() -> (HealthMachine, Instant) {
    let start = Instant::now();
    (HealthMachine::new(HealthPolicy::default(), start), start)
}

/// Drives `machine` from `now` for `span`, giving each check due the outcome `outcome`
/// `takes` after it starts; returns the checks made.
fn run(
    machine: &mut HealthMachine,
    now: &mut Instant,
    span: Duration,
    takes: Duration,
    outcome: Observation,
) -> u32 {
    let until = *now + span;
    let mut checks = 0;
    while *now < until {
        *now = (*now).max(machine.next_check());
        if *now >= until {
            break;
        }
        assert!(machine.start_check(*now));
        *now += takes;
        machine.observe(outcome, *now);
        checks += 1;
    }
    checks
}

#[test]
fn a_service_is_starting_until_it_first_answers_and_failures_meanwhile_keep_it_starting() {
    let (mut machine, start) = machine();
    assert_eq!(machine.state(), ServiceState::Starting);
    assert_eq!(machine.state().health(), Health::Down);
    for (i, failure) in [
        Observation::Refused,
        Observation::TimedOut,
        Observation::TimedOut,
        Observation::TimedOut,
        Observation::ConnectFailed,
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(machine.observe(failure, start + MS * i as u32), None);
        assert_eq!(machine.state(), ServiceState::Starting);
    }
    let at = start + Duration::from_secs(3);
    assert_eq!(
        machine.observe(Observation::Connected, at),
        Some(Transition {
            from: ServiceState::Starting,
            to: ServiceState::Serving,
            lasted: Duration::from_secs(3),
        })
    );
    assert_eq!(machine.state().health(), Health::Serving);
    assert_eq!(machine.since(), at);
}

#[test]
fn a_response_to_a_request_counts_as_an_answer() {
    let (mut machine, start) = machine();
    machine.observe(Observation::Answered, start + MS);
    assert_eq!(machine.state(), ServiceState::Serving);
}

#[test]
fn one_refused_connect_makes_a_serving_service_down_and_one_success_brings_it_back() {
    for failure in [Observation::Refused, Observation::ConnectFailed] {
        let (mut machine, start) = machine();
        machine.observe(Observation::Connected, start);
        let down = machine.observe(failure, start + Duration::from_secs(2));
        assert_eq!(
            down.map(|t| (t.from, t.to, t.lasted)),
            Some((
                ServiceState::Serving,
                ServiceState::Down,
                Duration::from_secs(2)
            )),
            "{failure:?}"
        );
        assert_eq!(machine.state().health(), Health::Down);
        // Still down: no transition to report.
        assert_eq!(
            machine.observe(failure, start + Duration::from_secs(3)),
            None
        );
        machine.observe(Observation::Connected, start + Duration::from_secs(4));
        assert_eq!(machine.state(), ServiceState::Serving);
    }
}

#[test]
fn timeouts_make_it_down_only_in_a_row() {
    let (mut machine, start) = machine();
    machine.observe(Observation::Connected, start);
    machine.observe(Observation::TimedOut, start + MS);
    assert_eq!(
        machine.state(),
        ServiceState::Serving,
        "one timeout is not enough"
    );
    // A success in between starts the count again.
    machine.observe(Observation::Answered, start + 2 * MS);
    machine.observe(Observation::TimedOut, start + 3 * MS);
    assert_eq!(machine.state(), ServiceState::Serving);
    machine.observe(Observation::TimedOut, start + 4 * MS);
    assert_eq!(machine.state(), ServiceState::Down);
}

#[test]
fn a_service_not_serving_is_checked_within_milliseconds_then_less_often() {
    let (mut machine, start) = machine();
    let policy = HealthPolicy::default();
    let mut at = start;
    let mut waits = Vec::new();
    for _ in 0..10 {
        assert!(machine.start_check(at));
        machine.observe(Observation::Refused, at);
        waits.push(machine.next_check() - at);
        at = machine.next_check();
    }
    assert_eq!(waits[0], policy.first_retry);
    assert_eq!(waits[1], policy.first_retry * 2);
    assert_eq!(*waits.last().unwrap(), policy.interval, "{waits:?}");
    // It answers: checks every interval from now on.
    machine.observe(Observation::Connected, at);
    assert!(machine.start_check(at));
    assert_eq!(machine.next_check(), at + policy.interval);
    // It goes down: the next check comes soon again.
    machine.observe(Observation::ConnectFailed, at + MS);
    assert_eq!(machine.next_check(), at + MS + policy.first_retry);
}

#[test]
fn checks_are_due_every_interval_from_the_start_of_the_last() {
    let (mut machine, start) = machine();
    machine.observe(Observation::Connected, start);
    assert!(machine.start_check(start), "the first check is due at once");
    assert!(!machine.start_check(start + 499 * MS));
    assert_eq!(machine.next_check(), start + 500 * MS);
    assert!(machine.start_check(start + 500 * MS));
    // A check that took longer than the interval is followed by the next at once.
    let late = start + 500 * MS + Duration::from_secs(1);
    assert!(machine.start_check(late));
    assert_eq!(machine.next_check(), late + 500 * MS);
}

#[test]
fn a_service_that_stops_answering_is_down_within_one_interval_if_refused_and_two_timeouts_if_silent()
 {
    let policy = HealthPolicy::default();
    // Refused: the first check after it stopped says so.
    let (mut machine, mut now) = machine();
    run(
        &mut machine,
        &mut now,
        Duration::from_secs(2),
        MS,
        Observation::Connected,
    );
    assert_eq!(machine.state(), ServiceState::Serving);
    let stopped = now;
    while machine.state() == ServiceState::Serving {
        run(&mut machine, &mut now, MS, MS, Observation::Refused);
    }
    assert!(now - stopped <= policy.interval + MS, "{:?}", now - stopped);

    // Silent (a connect that hangs): two checks, each waiting out the connect timeout.
    let (mut machine, mut now) = self::machine();
    run(
        &mut machine,
        &mut now,
        Duration::from_secs(2),
        MS,
        Observation::Connected,
    );
    let stopped = now;
    let mut checks = 0;
    while machine.state() == ServiceState::Serving {
        checks += run(
            &mut machine,
            &mut now,
            MS,
            policy.connect_timeout,
            Observation::TimedOut,
        );
    }
    assert_eq!(checks, 2);
    assert!(
        now - stopped <= policy.interval + 2 * policy.connect_timeout,
        "{:?}",
        now - stopped
    );
}

/// A request that cannot connect makes a serving service down and brings the next check
/// forward to within milliseconds (rule 5); the checking task, asleep until the check it knew
/// of (an hour away here), is woken for it, so a service that answers again is seen serving
/// at once rather than at the next interval.
#[tokio::test]
async fn a_failed_request_wakes_the_checks_to_look_again_at_once() {
    use std::sync::atomic::AtomicUsize;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let policy = HealthPolicy {
        interval: Duration::from_secs(3600),
        ..HealthPolicy::default()
    };
    let health = ServiceHealth::new(upstream, policy);
    tokio::spawn(run_checks(Arc::downgrade(&health)));
    // Two checks (the first while starting, the next soon after), then the hour's sleep.
    let asleep = async {
        while accepted.load(Ordering::Relaxed) < 2
            || health.machine.lock().unwrap().next_check() < Instant::now() + policy.interval / 2
        {
            tokio::task::yield_now().await;
        }
    };
    let deadline = Duration::from_secs(30);
    tokio::time::timeout(deadline, asleep)
        .await
        .expect("two checks, the service serving");
    assert_eq!(health.state(), ServiceState::Serving);
    // A request could not connect (a full backlog, say): down, and checked again at once.
    health.observe(Observation::ConnectFailed);
    assert_eq!(health.state(), ServiceState::Down);
    tokio::time::timeout(deadline, health.serving())
        .await
        .expect("a check within milliseconds, not at the next interval");
}
