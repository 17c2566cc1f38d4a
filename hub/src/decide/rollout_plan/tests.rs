//! Table and scenario tests of [`super::plan`].
use super::*;
use crate::api::rollout::{FailurePolicy, WaveSpec};
use crate::decide::rollout_waves::tests::{rule, waves};

const T0: i64 = 1_800_000_000;

fn at(t: i64) -> String {
    crate::decide::status::unix_rfc3339(t).unwrap_or_default()
}

fn spec() -> FirmwareRolloutSpec {
    FirmwareRolloutSpec {
        version: "2.0.0".into(),
        url: "http://fw/2.0.0.fnb".into(),
        waves: waves(),
        failure_policy: FailurePolicy {
            rules: vec![rule("any", 50, 2, None)],
        },
        drone_timeout: Some("10m".into()),
        ..FirmwareRolloutSpec::default()
    }
}

fn fleet(n: usize) -> Vec<Drone> {
    (0..n)
        .map(|i| Drone {
            name: format!("drone-{i:02}"),
            ..Drone::default()
        })
        .collect()
}

/// Carries the plan out the way the controller does: dispatch writes the target, cancel takes
/// it back.
fn apply(drones: &mut [Drone], p: &Plan, now: i64) {
    for d in drones.iter_mut() {
        if p.dispatch.contains(&d.name) {
            d.dispatched = true;
            d.dispatched_at = now;
        }
        if p.cancel.contains(&d.name) {
            d.dispatched = false;
        }
    }
}

fn finish(d: &mut Drone, result: &str) {
    d.started = true;
    if result == "Committed" {
        d.on_target = true;
    } else {
        d.sync_reason = Some("Failed".into());
        d.last_result = Some(result.into());
    }
}

#[test]
fn canary_trips_the_breaker_and_the_rest_is_called_back() {
    let s = spec();
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    assert_eq!(p.dispatch.len(), 2, "canary only");
    apply(&mut drones, &p, T0);
    let canary = p.dispatch.clone();
    // One canary rolls back: 1 of 1 finished, but the minimum sample is 2.
    let i = drones.iter().position(|d| d.name == canary[0]).unwrap();
    finish(&mut drones[i], "RolledBack");
    let p = plan(&s, 1, &p.status, &drones, T0 + 10, &at(T0 + 10));
    assert!(!is_true(&p.status.conditions, condition::HALTED));
    assert!(p.dispatch.is_empty(), "the canary has not finished");
    // The second one rolls back too: 2 of 2 = 100 % ≥ 50 %.
    let j = drones.iter().position(|d| d.name == canary[1]).unwrap();
    finish(&mut drones[j], "RolledBack");
    let p = plan(&s, 1, &p.status, &drones, T0 + 20, &at(T0 + 20));
    assert!(is_true(&p.status.conditions, condition::HALTED));
    assert_eq!(p.events[0].0, "Halted");
    assert_eq!(p.status.counts.rolled_back, 2);
    assert_eq!(p.status.counts.not_started, 8);
    assert_eq!(p.status.current_wave, 0, "halted in the canary");
    assert!(p.dispatch.is_empty());
    // Sticky: the next step says the same and emits no second event.
    let p2 = plan(&s, 1, &p.status, &drones, T0 + 30, &at(T0 + 30));
    assert!(is_true(&p2.status.conditions, condition::HALTED));
    assert!(p2.events.is_empty() && p2.dispatch.is_empty());
}

#[test]
fn waves_advance_after_soak_and_complete() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    let mut drones = fleet(4);
    let mut status = FirmwareRolloutStatus::default();
    let mut now = T0;
    let mut seen_events = Vec::new();
    for _ in 0..20 {
        let p = plan(&s, 1, &status, &drones, now, &at(now));
        apply(&mut drones, &p, now);
        for d in drones.iter_mut().filter(|d| d.dispatched) {
            finish(d, "Committed");
        }
        seen_events.extend(p.events.iter().map(|e| e.0.clone()));
        status = p.status;
        now += 30;
    }
    assert!(is_true(&status.conditions, condition::COMPLETE));
    assert_eq!(status.counts.succeeded, 4);
    assert_eq!(seen_events.iter().filter(|e| *e == "WaveAdvanced").count(), 2);
    assert_eq!(seen_events.iter().filter(|e| *e == "Completed").count(), 1);
}

#[test]
fn soak_holds_the_next_wave() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    apply(&mut drones, &p, T0);
    for d in drones.iter_mut().filter(|d| d.dispatched) {
        finish(d, "Committed");
    }
    let p = plan(&s, 1, &p.status, &drones, T0 + 5, &at(T0 + 5));
    assert!(p.dispatch.is_empty(), "soak of 60 s");
    assert_eq!(p.status.current_wave, 0);
    let p = plan(&s, 1, &p.status, &drones, T0 + 64, &at(T0 + 64));
    assert_eq!(p.status.current_wave, 0, "59 s soaked");
    let p = plan(&s, 1, &p.status, &drones, T0 + 65, &at(T0 + 65));
    assert_eq!(p.status.current_wave, 1);
    assert_eq!(p.dispatch.len(), 3);
}

#[test]
fn a_drone_offline_mid_wave_times_out_and_counts() {
    let mut s = spec();
    s.failure_policy.rules = vec![rule("timedOut", 100, 1, None)];
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    apply(&mut drones, &p, T0);
    // It went offline after dispatch: the node reconciler holds it (Waiting), never started.
    let p = plan(&s, 1, &p.status, &drones, T0 + 599, &at(T0 + 599));
    assert_eq!(p.status.counts.waiting, 2);
    assert!(!is_true(&p.status.conditions, condition::HALTED));
    let p = plan(&s, 1, &p.status, &drones, T0 + 600, &at(T0 + 600));
    assert_eq!(p.status.counts.timed_out, 2);
    assert!(is_true(&p.status.conditions, condition::HALTED));
    // Gated drones (offline before dispatch) are not dispatched, and time out from the wave's
    // start so the wave is not stuck forever.
    let mut gated = fleet(3);
    for d in &mut gated {
        d.blocked = Some("drone is offline".into());
    }
    let p = plan(&spec(), 1, &FirmwareRolloutStatus::default(), &gated, T0, &at(T0));
    assert!(p.dispatch.is_empty());
    let p = plan(&spec(), 1, &p.status, &gated, T0 + 600, &at(T0 + 600));
    assert_eq!(p.status.counts.timed_out, 2);
}

#[test]
fn a_drone_added_mid_rollout_falls_into_its_wave() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    s.waves = vec![WaveSpec {
        percent: Some(50),
        soak: Some("1h".into()),
        ..WaveSpec::default()
    }];
    let mut drones = fleet(20);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    assert_eq!(p.dispatch.len(), 10);
    apply(&mut drones, &p, T0);
    // Newcomers: those whose hash ranks them into the first half are dispatched at once.
    let mut grown = drones.clone();
    grown.extend((0..20).map(|i| Drone {
        name: format!("late-{i:02}"),
        ..Drone::default()
    }));
    let waves = assign_waves(grown.iter().map(|d| d.name.as_str()), &s.waves);
    let p = plan(&s, 1, &p.status, &grown, T0 + 1, &at(T0 + 1));
    for name in &p.dispatch {
        assert_eq!(waves[name], 0, "{name} dispatched outside the current wave");
    }
    // Every newcomer whose hash puts it in the running wave is dispatched now, none other.
    for d in grown.iter().filter(|d| d.name.starts_with("late-")) {
        assert_eq!(p.dispatch.contains(&d.name), waves[&d.name] == 0, "{}", d.name);
    }
    assert!(p.dispatch.iter().any(|n| n.starts_with("late-")));
}

#[test]
fn max_concurrent_and_pause_limit_dispatch() {
    let mut s = spec();
    s.waves.clear();
    s.max_concurrent = Some(3);
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    assert_eq!(p.dispatch.len(), 3);
    apply(&mut drones, &p, T0);
    let p = plan(&s, 1, &p.status, &drones, T0 + 1, &at(T0 + 1));
    assert!(p.dispatch.is_empty());
    s.paused = true;
    let p = plan(&s, 2, &p.status, &fleet(10), T0 + 2, &at(T0 + 2));
    assert!(p.dispatch.is_empty());
    assert!(is_true(&p.status.conditions, condition::HALTED));
}

/// The status of a rollout the breaker halted in the canary (generation 1).
fn halted_status(s: &FirmwareRolloutSpec) -> FirmwareRolloutStatus {
    FirmwareRolloutStatus {
        observed_generation: Some(1),
        target_hash: Some(target_hash(s)),
        target_generation: Some(1),
        wave_started_time: Some(at(T0)),
        conditions: vec![Condition {
            type_: condition::HALTED.into(),
            status: "True".into(),
            reason: "CircuitBreakerTripped".into(),
            message: "rolledBack 1 of 1".into(),
            last_transition_time: at(T0),
            observed_generation: Some(1),
        }],
        ..FirmwareRolloutStatus::default()
    }
}

fn drone(name: &str, edit: impl FnOnce(&mut Drone)) -> Drone {
    let mut d = Drone {
        name: name.into(),
        ..Drone::default()
    };
    edit(&mut d);
    d
}

/// What a halt calls back: every drone of this rollout whose command has not started, whatever
/// held it (a gate, the timeout, a retry's back-off, an earlier target); never one that runs or
/// ended, nor anybody else's.
#[test]
fn a_halt_calls_back_every_drone_whose_command_has_not_started() {
    let s = spec();
    let dispatched = |d: &mut Drone| {
        d.dispatched = true;
        d.dispatched_at = T0;
    };
    // (drone, called back)
    let table: Vec<(Drone, bool)> = vec![
        (drone("waiting-at-a-gate", dispatched), true),
        (
            drone("offline-timed-out", |d| {
                dispatched(d);
                d.blocked = Some("drone is offline".into());
            }),
            true,
        ),
        (
            drone("retrying", |d| {
                dispatched(d);
                d.started = true;
                d.sync_reason = Some("Retrying".into());
                d.last_result = Some("Failed".into());
            }),
            true,
        ),
        (
            drone("attempt-2-published", |d| {
                dispatched(d);
                d.sync_reason = Some("InProgress".into());
            }),
            true,
        ),
        (
            drone("earlier-generation", |d| {
                d.stale = true;
                d.dispatched_at = T0 - 3600;
            }),
            true,
        ),
        (
            drone("running", |d| {
                dispatched(d);
                d.started = true;
                d.running = true;
            }),
            false,
        ),
        (
            drone("earlier-generation-running", |d| {
                d.stale = true;
                d.started = true;
                d.running = true;
            }),
            false,
        ),
        (
            drone("rolled-back", |d| {
                dispatched(d);
                d.started = true;
                d.sync_reason = Some("Failed".into());
                d.last_result = Some("RolledBack".into());
            }),
            false,
        ),
        (
            drone("succeeded", |d| {
                dispatched(d);
                d.started = true;
                d.on_target = true;
            }),
            false,
        ),
        (drone("pinned-by-a-person", |d| d.pinned = true), false),
        (drone("never-dispatched", |_| {}), false),
    ];
    let drones: Vec<Drone> = table.iter().map(|(d, _)| d.clone()).collect();
    // 20 minutes after the dispatch: the 10 m drone timeout has passed for every one.
    let now = T0 + 1200;
    let p = plan(&s, 1, &halted_status(&s), &drones, now, &at(now));
    assert!(p.dispatch.is_empty(), "{:?}", p.dispatch);
    for (d, want) in &table {
        assert_eq!(
            p.cancel.contains(&d.name),
            *want,
            "{}: cancel {:?}",
            d.name,
            p.cancel
        );
    }
    assert_eq!(p.outcomes["offline-timed-out"], Outcome::TimedOut);
    assert!(is_true(&p.status.conditions, condition::HALTED));
}

/// A new target starts the waves over: drones an earlier target dispatched that have not
/// started are dispatched again when their wave is open, called back otherwise; a running one
/// runs to its end first.
#[test]
fn a_new_target_calls_back_or_redispatches_what_the_old_one_left_unstarted() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    let mut drones = fleet(10);
    let mut status = FirmwareRolloutStatus::default();
    let mut now = T0;
    // Wave 0 and 1 of 2.0.0 go out; the drones of wave 1 never start.
    while status.current_wave < 1 || drones.iter().filter(|d| d.dispatched).count() < 5 {
        let p = plan(&s, 1, &status, &drones, now, &at(now));
        apply(&mut drones, &p, now);
        for d in drones
            .iter_mut()
            .filter(|d| d.dispatched && d.dispatched_at < T0 + 60)
        {
            finish(d, "Committed");
        }
        status = p.status;
        now += 30;
        assert!(now < T0 + 3600, "wave 1 never started");
    }
    let waves = assign_waves(drones.iter().map(|d| d.name.as_str()), &s.waves);
    // 2.0.1 replaces it: everything 2.0.0 wrote is now an earlier target; one drone of wave 1
    // is running it.
    s.version = "2.0.1".into();
    s.url = "http://fw/2.0.1.fnb".into();
    let running = drones
        .iter()
        .find(|d| waves[&d.name] == 1)
        .map(|d| d.name.clone())
        .unwrap_or_default();
    for d in &mut drones {
        if d.dispatched {
            d.stale = true;
            d.dispatched = false;
            d.on_target = false;
            d.running = d.name == running;
            d.started = d.running;
        }
    }
    let p = plan(&s, 2, &status, &drones, now, &at(now));
    assert_eq!(p.status.current_wave, 0, "a new target starts over");
    for d in drones.iter().filter(|d| d.stale) {
        let (dispatched, canceled) = (p.dispatch.contains(&d.name), p.cancel.contains(&d.name));
        match waves[&d.name] {
            _ if d.name == running => assert!(!dispatched && !canceled, "{}: running", d.name),
            0 => assert!(dispatched && !canceled, "{}: wave 0 is open", d.name),
            _ => assert!(
                !dispatched && canceled,
                "{}: wave {} not open",
                d.name,
                waves[&d.name]
            ),
        }
    }
}

/// A spec edit of a table row.
type Edit = fn(&mut FirmwareRolloutSpec);

/// Edits that keep the target keep the progress, a halt and a completion; edits of the target
/// (version, url, allowDowngrade, selector) start the waves over and lift a halt.
#[test]
fn only_a_target_change_restarts_the_waves() {
    let mut base = spec();
    base.failure_policy.rules.clear();
    base.waves[1].soak = Some("1h".into());
    // A rollout soaking in wave 1 (of 3), generation 1.
    let mut drones = fleet(10);
    let mut status = FirmwareRolloutStatus::default();
    let mut now = T0;
    while status.current_wave < 1 || status.wave_finished_time.is_none() {
        let p = plan(&base, 1, &status, &drones, now, &at(now));
        apply(&mut drones, &p, now);
        for d in drones.iter_mut().filter(|d| d.dispatched) {
            finish(d, "Committed");
        }
        status = p.status;
        now += 30;
        assert!(now < T0 + 3600, "wave 1 never finished");
    }
    assert_eq!(status.current_wave, 1);
    let soaking = status.clone();
    let table: Vec<(&str, Edit, bool)> = vec![
        ("pause", |s| s.paused = true, false),
        (
            "failure policy",
            |s| s.failure_policy.rules = vec![rule("any", 90, 5, None)],
            false,
        ),
        ("soak", |s| s.waves[0].soak = Some("5m".into()), false),
        ("gates", |s| s.gates.min_battery_percent = Some(40), false),
        ("max concurrent", |s| s.max_concurrent = Some(1), false),
        ("drone timeout", |s| s.drone_timeout = Some("1h".into()), false),
        ("version", |s| s.version = "2.0.1".into(), true),
        ("url", |s| s.url = "http://mirror/2.0.0.fnb".into(), true),
        ("allow downgrade", |s| s.allow_downgrade = true, true),
        (
            "selector",
            |s| {
                s.selector = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                    match_labels: Some([("fleet".to_owned(), "north".to_owned())].into()),
                    ..Default::default()
                });
            },
            true,
        ),
    ];
    for (what, edit, restarts) in &table {
        let mut s = base.clone();
        edit(&mut s);
        let p = plan(&s, 2, &soaking, &drones, now + 1, &at(now + 1));
        assert_eq!(
            p.status.current_wave == 0,
            *restarts,
            "{what}: wave {}",
            p.status.current_wave
        );
        assert_eq!(p.status.observed_generation, Some(2), "{what}");
        assert_eq!(
            p.status.wave_started_time != soaking.wave_started_time,
            *restarts,
            "{what}: the wave's clock"
        );
        // Halted by the breaker in generation 1: the same edit on a halted rollout.
        let halted = halted_status(&base);
        let p = plan(&s, 2, &halted, &drones, now + 1, &at(now + 1));
        let breaker_halt = p.status.conditions.iter().any(|c| {
            c.type_ == condition::HALTED && c.status == "True" && c.reason == "CircuitBreakerTripped"
        });
        assert_eq!(breaker_halt, !restarts, "{what}: the breaker's halt");
        if !restarts {
            assert!(p.dispatch.is_empty(), "{what}: dispatch {:?}", p.dispatch);
        }
        assert_eq!(
            p.status.target_generation,
            Some(if *restarts { 2 } else { 1 }),
            "{what}"
        );
    }
    // Unpausing resumes where it was: the wave and its soak clock are those of before.
    let mut paused = base.clone();
    paused.paused = true;
    let p = plan(&paused, 2, &soaking, &drones, now + 1, &at(now + 1));
    let p = plan(&base, 3, &p.status, &drones, now + 2, &at(now + 2));
    assert_eq!(p.status.current_wave, 1);
    assert_eq!(p.status.wave_started_time, soaking.wave_started_time);
    assert_eq!(
        p.status.wave_finished_time, soaking.wave_finished_time,
        "the soak goes on"
    );
}

/// A Complete rollout is terminal for its target: a drone that later looks not started (another
/// rollout's, a newcomer) is never dispatched, no edit but a new target reopens it, and the
/// Completed event is not sent again.
#[test]
fn a_complete_rollout_never_dispatches_again() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    let mut drones = fleet(4);
    let mut status = FirmwareRolloutStatus::default();
    let mut now = T0;
    while !is_true(&status.conditions, condition::COMPLETE) {
        let p = plan(&s, 1, &status, &drones, now, &at(now));
        apply(&mut drones, &p, now);
        for d in drones.iter_mut().filter(|d| d.dispatched) {
            finish(d, "Committed");
        }
        status = p.status;
        now += 30;
        assert!(now < T0 + 3600, "never completed");
    }
    // Another rollout took two drones to its version and finished; a newcomer joined.
    for d in drones.iter_mut().take(2) {
        *d = Drone {
            name: d.name.clone(),
            ..Drone::default()
        };
    }
    drones.push(Drone {
        name: "newcomer".into(),
        ..Drone::default()
    });
    for generation in [1, 2] {
        let mut edited = s.clone();
        edited.paused = generation == 2;
        let p = plan(&edited, generation, &status, &drones, now, &at(now));
        assert!(p.dispatch.is_empty(), "generation {generation}: {:?}", p.dispatch);
        assert!(p.cancel.is_empty());
        assert!(
            is_true(&p.status.conditions, condition::COMPLETE),
            "{:?}",
            p.status.conditions
        );
        assert!(p.events.is_empty(), "{:?}", p.events);
        assert_eq!(p.status.counts.not_started, 3);
    }
    // A new target does reopen it.
    s.version = "2.0.1".into();
    let p = plan(&s, 3, &status, &drones, now, &at(now));
    assert!(!is_true(&p.status.conditions, condition::COMPLETE));
    assert!(!p.dispatch.is_empty());
}

/// Drones a newer rollout selects are that one's: never dispatched here, called back when this
/// rollout's command has not started, counted as superseded, and named in a condition (once as
/// an event).
#[test]
fn an_older_rollout_yields_the_drones_a_newer_one_selects() {
    let mut s = spec();
    s.waves.clear();
    let mut drones = fleet(6);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    assert_eq!(p.dispatch.len(), 6);
    apply(&mut drones, &p, T0);
    // A newer rollout selects drones 0-3: 0 is running ours, 1 finished ours, 2 and 3 wait.
    drones[0].started = true;
    drones[0].running = true;
    finish(&mut drones[1], "Committed");
    for d in drones.iter_mut().take(4) {
        d.superseded_by = Some("fw-newer".into());
    }
    let p = plan(&s, 1, &p.status, &drones, T0 + 5, &at(T0 + 5));
    assert!(p.dispatch.is_empty());
    assert_eq!(p.cancel, vec!["drone-02".to_owned(), "drone-03".to_owned()]);
    assert_eq!(p.status.counts.superseded, 4);
    let c = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::SUPERSEDED)
        .cloned()
        .unwrap_or_default();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "NewerRollout"));
    assert!(
        c.message.contains("fw-newer") && c.message.starts_with("4 of 6"),
        "{}",
        c.message
    );
    assert_eq!(p.events.iter().filter(|e| e.0 == "Superseded").count(), 1);
    // Not started again after the call-back, and no second event.
    apply(&mut drones, &p, T0 + 5);
    let p = plan(&s, 1, &p.status, &drones, T0 + 10, &at(T0 + 10));
    assert!(p.dispatch.is_empty() && p.cancel.is_empty(), "{p:?}");
    assert!(p.events.iter().all(|e| e.0 != "Superseded"));
    // The rest finish: complete over what it still has, the condition says why the rest is not.
    for d in drones.iter_mut().skip(4) {
        finish(d, "Committed");
    }
    let p = plan(&s, 1, &p.status, &drones, T0 + 15, &at(T0 + 15));
    assert!(is_true(&p.status.conditions, condition::COMPLETE));
    assert!(is_true(&p.status.conditions, condition::SUPERSEDED));
}

/// Issue 22 f: a canary that gives no result (it never picks its command up and times out) is
/// no evidence. The next drone by rank stands in for it, and the next wave waits for that result.
#[test]
fn a_silent_canary_is_replaced_by_rank_and_the_next_wave_waits_for_a_real_result() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    s.waves[0].soak = None;
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    let canary = p.dispatch.clone();
    assert_eq!(canary.len(), 2);
    apply(&mut drones, &p, T0);
    let first = drones.iter().position(|d| d.name == canary[0]).unwrap();
    finish(&mut drones[first], "Committed");

    // The second canary never picked its command up: timed out, no result. A stand-in goes out
    // and the canary wave is not done on one result of two.
    let p = plan(&s, 1, &p.status, &drones, T0 + 600, &at(T0 + 600));
    assert_eq!(p.status.counts.timed_out, 1);
    assert_eq!(p.status.current_wave, 0, "wave 1 started on one result of two");
    assert_eq!(p.dispatch.len(), 1, "one stand-in: {:?}", p.dispatch);
    let stand_in = p.dispatch[0].clone();
    assert!(!canary.contains(&stand_in));
    let progressing = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::PROGRESSING)
        .unwrap();
    assert!(progressing.message.contains("1 of 2"), "{}", progressing.message);
    apply(&mut drones, &p, T0 + 600);
    let p = plan(&s, 1, &p.status, &drones, T0 + 601, &at(T0 + 601));
    assert_eq!(p.status.current_wave, 0);
    assert!(p.dispatch.is_empty(), "{:?}", p.dispatch);

    // The stand-in succeeds: now the wave is done and the next one starts.
    let i = drones.iter().position(|d| d.name == stand_in).unwrap();
    finish(&mut drones[i], "Committed");
    let p = plan(&s, 1, &p.status, &drones, T0 + 700, &at(T0 + 700));
    assert_eq!(p.status.current_wave, 1);
    assert!(!p.dispatch.is_empty());
}

#[test]
fn a_wave_of_only_timeouts_never_counts_as_done() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    let mut gated = fleet(3);
    for d in &mut gated {
        d.blocked = Some("drone is offline".into());
    }
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &gated, T0, &at(T0));
    let p = plan(&s, 1, &p.status, &gated, T0 + 3600, &at(T0 + 3600));
    assert_eq!(p.status.counts.timed_out, 2);
    assert_eq!(p.status.current_wave, 0);
    assert!(!is_true(&p.status.conditions, condition::COMPLETE));
}

fn progressing(p: &Plan) -> &Condition {
    p.status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::PROGRESSING)
        .unwrap()
}

/// Issue 22 j: a rollout that cannot move (every drone offline) says so after its progress
/// deadline, so `rollout status` ends instead of waiting forever.
#[test]
fn no_progress_for_the_deadline_turns_progressing_false() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    s.progress_deadline = Some("30m".into());
    let mut gated = fleet(4);
    for d in &mut gated {
        d.blocked = Some("drone is offline".into());
    }
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &gated, T0, &at(T0));
    // The canaries time out at +600: that is a change, the clock starts again there.
    let p = plan(&s, 1, &p.status, &gated, T0 + 600, &at(T0 + 600));
    let t = T0 + 600 + 1799;
    let p = plan(&s, 1, &p.status, &gated, t, &at(t));
    assert_eq!(progressing(&p).status, "True", "{:?}", progressing(&p));
    let p = plan(&s, 1, &p.status, &gated, t + 1, &at(t + 1));
    let c = progressing(&p);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "ProgressDeadlineExceeded")
    );
    assert!(c.message.contains("held: drone is offline"), "{}", c.message);
    // Drones that come back and are dispatched (stand-ins for the timed-out canaries) are
    // progress again.
    let mut back = gated.clone();
    for d in &mut back {
        d.blocked = None;
    }
    let p = plan(&s, 1, &p.status, &back, t + 2, &at(t + 2));
    assert!(!p.dispatch.is_empty());
    assert_eq!(progressing(&p).status, "True");
}

#[test]
fn a_soak_longer_than_the_deadline_is_no_stall() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    s.waves[0].soak = Some("2h".into());
    s.progress_deadline = Some("1h".into());
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    apply(&mut drones, &p, T0);
    for d in drones.iter_mut().filter(|d| d.dispatched) {
        finish(d, "Committed");
    }
    let mut status = p.status;
    for t in [T0 + 10, T0 + 3000, T0 + 5400, T0 + 7000] {
        let p = plan(&s, 1, &status, &drones, t, &at(t));
        assert_eq!(
            progressing(&p).status,
            "True",
            "at +{}: {:?}",
            t - T0,
            progressing(&p)
        );
        status = p.status;
    }
}

/// Issue 22 l: a drone that timed out but is still installing still counts against
/// `maxConcurrent`.
#[test]
fn a_timed_out_drone_still_installing_holds_its_place_in_max_concurrent() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    s.waves = vec![WaveSpec {
        percent: Some(100),
        ..WaveSpec::default()
    }];
    s.max_concurrent = Some(2);
    let mut drones = fleet(6);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    assert_eq!(p.dispatch.len(), 2);
    apply(&mut drones, &p, T0);
    for d in drones.iter_mut().filter(|d| d.dispatched) {
        d.started = true;
        d.running = true;
        // Dispatched long ago: past the drone timeout, and still installing.
        d.dispatched_at = T0 - 600;
    }
    let p = plan(&s, 1, &p.status, &drones, T0 + 1, &at(T0 + 1));
    assert_eq!(p.status.counts.timed_out, 2);
    assert_eq!(p.status.counts.not_started, 4);
    assert!(p.dispatch.is_empty(), "past maxConcurrent: {:?}", p.dispatch);
}

/// Issue 22 scale: a 100 % wave without `maxConcurrent` no longer sends every drone at once; the
/// dispatch rate caps each minute, spread over its six 10-second slices, and an exponential ramp
/// speeds up as drones succeed.
#[test]
fn the_dispatch_rate_caps_each_minute_spreads_it_and_ramps_up_with_successes() {
    use crate::api::rollout::{DispatchRate, ExponentialRate, RateIncreaseCriteria};
    let mut s = spec();
    s.failure_policy.rules.clear();
    s.waves = vec![WaveSpec {
        percent: Some(100),
        ..WaveSpec::default()
    }];
    s.dispatch_rate = DispatchRate {
        maximum_per_minute: 12,
        exponential_rate: Some(ExponentialRate {
            base_rate_per_minute: 2,
            increment_factor: 2.0,
            rate_increase_criteria: RateIncreaseCriteria {
                number_of_succeeded_drones: 2,
            },
        }),
    };
    let mut drones = fleet(80);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    assert_eq!(p.dispatch.len(), 1, "the base rate, 2 a minute: 1 per slice");
    apply(&mut drones, &p, T0);
    let p = plan(&s, 1, &p.status, &drones, T0 + 5, &at(T0 + 5));
    assert!(p.dispatch.is_empty(), "same slice: nothing more");
    let p = plan(&s, 1, &p.status, &drones, T0 + 10, &at(T0 + 10));
    assert_eq!(p.dispatch.len(), 1, "next slice");
    apply(&mut drones, &p, T0 + 10);
    // Within the same minute: the minute's 2 are out, nothing more in any slice.
    let p = plan(&s, 1, &p.status, &drones, T0 + 30, &at(T0 + 30));
    assert!(p.dispatch.is_empty());
    // Both succeeded: the next minute goes at 4 (one slice gets 1 of them), then 8.
    for d in drones.iter_mut().filter(|d| d.dispatched) {
        finish(d, "Committed");
    }
    let p = plan(&s, 1, &p.status, &drones, T0 + 75, &at(T0 + 75));
    assert_eq!(p.dispatch.len(), 1, "4 a minute: 1 per slice");
    // A minute at the maximum, slice by slice: 2 each, 12 in all, never more.
    s.dispatch_rate.exponential_rate = None;
    let mut drones = fleet(80);
    let mut status = FirmwareRolloutStatus::default();
    let mut sent = Vec::new();
    for slice in 0..8 {
        let t = T0 + 10 * slice;
        let p = plan(&s, 1, &status, &drones, t, &at(t));
        apply(&mut drones, &p, t);
        sent.push(p.dispatch.len());
        status = p.status;
    }
    assert_eq!(sent, vec![2; 8], "2 per 10-second slice: 12 per minute");
}

/// Issue 24, soak in flight: a wave with `flightSoak` advances only once enough of its succeeded
/// drones have flown that much on the new firmware; drones that have not flown are inconclusive,
/// and the progress deadline ends a wait nobody flies through.
#[test]
fn a_flight_soak_waits_for_flights_on_the_new_firmware_and_has_a_deadline() {
    use crate::api::rollout::FlightSoak;
    let mut s = spec();
    s.failure_policy.rules.clear();
    s.progress_deadline = Some("30m".into());
    s.waves = vec![
        WaveSpec {
            count: Some(2),
            soak: Some("5m".into()),
            flight_soak: Some(FlightSoak {
                flights: 2,
                flight_time: Some("10m".into()),
                percent: 50,
            }),
            ..WaveSpec::default()
        },
        WaveSpec {
            percent: Some(100),
            ..WaveSpec::default()
        },
    ];
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    assert_eq!(p.dispatch.len(), 2, "the canaries");
    apply(&mut drones, &p, T0);
    let canaries = p.dispatch.clone();
    for d in drones.iter_mut().filter(|d| canaries.contains(&d.name)) {
        finish(d, "Committed");
        d.flights = Some(0);
        d.flight_secs = Some(0);
    }
    let progressing = |p: &Plan| {
        p.status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::PROGRESSING)
            .map(|c| (c.reason.clone(), c.message.clone()))
            .unwrap_or_default()
    };
    // Finished, soaking in wall time: the deadline does not run.
    let mut status = plan(&s, 1, &p.status, &drones, T0 + 60, &at(T0 + 60)).status;
    let p = plan(&s, 1, &status, &drones, T0 + 400, &at(T0 + 400));
    assert_eq!(
        p.status.current_wave, 0,
        "no flights yet: the wall-time soak alone is not enough"
    );
    assert!(p.dispatch.is_empty());
    let (reason, message) = progressing(&p);
    assert_eq!(reason, "WaveInProgress");
    assert!(
        message.contains("soaking in flight: 0 of 2 succeeded drones flew 2 flight(s) and 10m in the air"),
        "{message}"
    );
    status = p.status;
    // One flight, or flights too short: not enough. Two flights of 12 minutes on one canary
    // (50 % of 2): the next wave starts.
    let first = canaries[0].clone();
    let set = |drones: &mut Vec<Drone>, flights: u32, secs: i64| {
        for d in drones.iter_mut().filter(|d| d.name == first) {
            d.flights = Some(flights);
            d.flight_secs = Some(secs);
        }
    };
    set(&mut drones, 1, 900);
    status = plan(&s, 1, &status, &drones, T0 + 500, &at(T0 + 500)).status;
    assert_eq!(status.current_wave, 0);
    set(&mut drones, 2, 300);
    status = plan(&s, 1, &status, &drones, T0 + 600, &at(T0 + 600)).status;
    assert_eq!(status.current_wave, 0, "too little time in the air");
    set(&mut drones, 2, 720);
    let p = plan(&s, 1, &status, &drones, T0 + 700, &at(T0 + 700));
    assert_eq!(p.status.current_wave, 1, "{:?}", progressing(&p));
    assert!(p.events.iter().any(|(r, _)| r == "WaveAdvanced"));

    // Nobody flies: the progress deadline ends the wait with a reason.
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    apply(&mut drones, &p, T0);
    for d in drones.iter_mut().filter(|d| d.dispatched) {
        finish(d, "Committed");
    }
    let mut status = p.status;
    for t in [60, 400, 1000, 2000, 2500] {
        status = plan(&s, 1, &status, &drones, T0 + t, &at(T0 + t)).status;
    }
    let p = plan(&s, 1, &status, &drones, T0 + 2500, &at(T0 + 2500));
    let (reason, message) = progressing(&p);
    assert_eq!(reason, "ProgressDeadlineExceeded", "{message}");
    assert_eq!(p.status.current_wave, 0);
}

fn ask(action: &str, id: &str) -> Operator {
    Operator {
        request: Some(Request {
            action: action.into(),
            id: id.into(),
            by: "alice".into(),
            at: at(T0),
        }),
        editor: Some("alice".into()),
    }
}

fn last(status: &FirmwareRolloutStatus) -> (&str, &str, &str) {
    let h = status.history.last().unwrap();
    (h.action.as_str(), h.by.as_str(), h.message.as_str())
}

#[test]
fn abort_halts_and_calls_back_every_unstarted_drone_until_resumed() {
    let s = spec();
    let mut drones = fleet(10);
    let p = plan_with(
        &s,
        1,
        &FirmwareRolloutStatus::default(),
        &drones,
        T0,
        &at(T0),
        &ask("none", ""),
    );
    assert_eq!(last(&p.status).0, "Created");
    apply(&mut drones, &p, T0);
    let canary = p.dispatch.clone();
    // One canary started, the other has not: the abort calls back only the second.
    let started = drones.iter().position(|d| d.name == canary[0]).unwrap();
    drones[started].started = true;
    drones[started].running = true;
    let p = plan_with(
        &s,
        1,
        &p.status,
        &drones,
        T0 + 5,
        &at(T0 + 5),
        &ask("abort", "r1"),
    );
    assert!(p.dispatch.is_empty());
    assert_eq!(p.cancel, vec![canary[1].clone()]);
    let halted = p
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::HALTED)
        .unwrap();
    assert_eq!(
        (halted.status.as_str(), halted.reason.as_str()),
        ("True", "Aborted")
    );
    assert!(halted.message.starts_with("aborted by alice at "), "{halted:?}");
    assert_eq!(
        p.events,
        vec![(
            "Aborted".to_owned(),
            "aborted by alice: nothing new is dispatched; every drone that has not started is called back"
                .to_owned()
        )]
    );
    assert_eq!(last(&p.status).0, "Aborted");
    apply(&mut drones, &p, T0 + 5);
    // The same request again is not carried out twice; later steps stay aborted.
    let p = plan_with(
        &s,
        1,
        &p.status,
        &drones,
        T0 + 60,
        &at(T0 + 60),
        &ask("abort", "r1"),
    );
    assert!(p.dispatch.is_empty() && p.events.is_empty());
    assert_eq!(
        p.status.history.iter().filter(|h| h.action == "Aborted").count(),
        1
    );
    // A second abort is refused, saying why.
    let p = plan_with(
        &s,
        1,
        &p.status,
        &drones,
        T0 + 61,
        &at(T0 + 61),
        &ask("abort", "r2"),
    );
    assert_eq!(
        last(&p.status),
        ("Refused", "alice", "abort: the rollout is already aborted")
    );
    // Resume: dispatching goes on (the called-back canary again).
    let p = plan_with(
        &s,
        1,
        &p.status,
        &drones,
        T0 + 70,
        &at(T0 + 70),
        &ask("resume", "r3"),
    );
    assert_eq!(
        p.dispatch,
        vec![canary[1].clone()],
        "canary {canary:?} outcomes {:?}",
        p.outcomes
    );
    assert!(!is_true(&p.status.conditions, condition::HALTED));
    assert_eq!(p.status.aborted, None);
    assert_eq!(last(&p.status).0, "Resumed");
    assert_eq!(p.events[0].0, "Resumed");
}

#[test]
fn resume_lifts_a_breaker_halt_without_a_spec_edit_and_the_breaker_counts_afresh() {
    let s = spec();
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    apply(&mut drones, &p, T0);
    for name in &p.dispatch {
        let i = drones.iter().position(|d| &d.name == name).unwrap();
        finish(&mut drones[i], "RolledBack");
    }
    let p = plan(&s, 1, &p.status, &drones, T0 + 10, &at(T0 + 10));
    assert!(is_true(&p.status.conditions, condition::HALTED));
    // Nothing to resume is refused; a halt is lifted, and the same generation goes on.
    let p = plan_with(
        &s,
        1,
        &p.status,
        &drones,
        T0 + 20,
        &at(T0 + 20),
        &ask("resume", "r1"),
    );
    assert!(
        !is_true(&p.status.conditions, condition::HALTED),
        "{:?}",
        p.status.conditions
    );
    assert_eq!(p.status.observed_generation, Some(1));
    assert_eq!(p.status.breaker_since.as_deref(), Some(at(T0 + 20).as_str()));
    // The two rolled-back canaries finished before the resume: they no longer trip it.
    let p = plan(&s, 1, &p.status, &drones, T0 + 30, &at(T0 + 30));
    assert!(!is_true(&p.status.conditions, condition::HALTED));
    let p = plan_with(
        &s,
        1,
        &p.status,
        &drones,
        T0 + 40,
        &at(T0 + 40),
        &ask("resume", "r2"),
    );
    assert_eq!(
        last(&p.status),
        (
            "Refused",
            "alice",
            "resume: the rollout is neither halted nor aborted"
        )
    );
}

#[test]
fn promote_ends_a_finished_waves_soak_and_is_refused_otherwise() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    apply(&mut drones, &p, T0);
    // The canary still works: nothing to promote.
    let p = plan_with(
        &s,
        1,
        &p.status,
        &drones,
        T0 + 1,
        &at(T0 + 1),
        &ask("promote", "r1"),
    );
    assert_eq!(
        last(&p.status),
        (
            "Refused",
            "alice",
            "promote: wave 1 has not finished: 2 drones are still working"
        )
    );
    for d in drones.iter_mut().filter(|d| d.dispatched) {
        finish(d, "Committed");
    }
    let p = plan(&s, 1, &p.status, &drones, T0 + 5, &at(T0 + 5));
    assert_eq!(p.status.current_wave, 0, "soaking 60 s");
    let p = plan_with(
        &s,
        1,
        &p.status,
        &drones,
        T0 + 6,
        &at(T0 + 6),
        &ask("promote", "r2"),
    );
    assert_eq!(p.status.current_wave, 1, "the soak ended now");
    assert_eq!(p.dispatch.len(), 3);
    assert_eq!(
        last(&p.status),
        ("Promoted", "alice", "the soak of wave 1 ends now")
    );
    assert_eq!(p.status.promoted_wave, None, "used up");
    assert!(p.events.iter().any(|e| e.0 == "Promoted") && p.events.iter().any(|e| e.0 == "WaveAdvanced"));
}

#[test]
fn edits_and_pauses_are_recorded_with_who_and_the_history_is_bounded() {
    let s = spec();
    let drones = fleet(4);
    let p = plan_with(
        &s,
        1,
        &FirmwareRolloutStatus::default(),
        &drones,
        T0,
        &at(T0),
        &ask("", ""),
    );
    assert_eq!(
        last(&p.status),
        ("Created", "alice", "2.0.0 from http://fw/2.0.0.fnb")
    );
    let mut paused = s.clone();
    paused.paused = true;
    let p = plan_with(&paused, 2, &p.status, &drones, T0 + 1, &at(T0 + 1), &ask("", ""));
    assert_eq!(last(&p.status).0, "Paused");
    let p = plan_with(&s, 3, &p.status, &drones, T0 + 2, &at(T0 + 2), &ask("", ""));
    assert_eq!(last(&p.status).0, "Resumed");
    let mut status = p.status;
    for g in 4..40 {
        let mut edited = s.clone();
        edited.max_concurrent = Some(u32::try_from(g).unwrap());
        status = plan_with(&edited, g, &status, &drones, T0 + g, &at(T0 + g), &ask("", "")).status;
    }
    assert_eq!(status.history.len(), HISTORY_LEN);
    assert_eq!(last(&status), ("Edited", "alice", "spec changed (generation 39)"));
}

fn weeknights() -> Vec<crate::api::rollout::MaintenanceWindow> {
    vec![crate::api::rollout::MaintenanceWindow {
        schedule: "0 22 * * 1-5".into(),
        duration: "6h".into(),
        time_zone: "Europe/Berlin".into(),
    }]
}

/// Unix seconds of an RFC 3339 time.
fn ts(text: &str) -> i64 {
    text.parse::<jiff::Timestamp>()
        .map_or_else(|e| panic!("{text}: {e}"), jiff::Timestamp::as_second)
}

/// Maintenance windows: closed, nothing is dispatched and the status says when the window
/// opens (and a gated drone does not time out meanwhile); at the opening the canaries go out;
/// after the close a canary still installing goes on and counts, the soak runs and the wave
/// advances, but its drones wait for the next window.
#[test]
fn outside_the_maintenance_window_nothing_new_is_dispatched() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    s.maintenance_windows = weeknights();
    // Long enough for an install across the night, shorter than the wait for the window.
    s.drone_timeout = Some("8h".into());
    // T0 is Friday 2027-01-15, 09:00 in Berlin.
    let mut drones = fleet(10);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    assert!(p.dispatch.is_empty(), "{:?}", p.dispatch);
    let c = progressing(&p);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "OutsideMaintenanceWindow")
    );
    assert!(
        c.message.contains(
            "nothing new is dispatched until the maintenance window opens at 2027-01-15T22:00:00+01:00[Europe/Berlin]"
        ),
        "{}",
        c.message
    );
    let window = p.status.maintenance_window.clone().unwrap_or_default();
    assert!(!window.open);
    assert_eq!(
        window.next_open_time.as_deref(),
        Some("2027-01-15T22:00:00+01:00")
    );
    assert_eq!(
        p.wake_at,
        Some(ts("2027-01-15T21:00:00Z")),
        "the controller steps at the opening"
    );
    // Hours later, still closed: past the drone timeout, and no undispatched canary timed out.
    let later = ts("2027-01-15T20:59:59Z");
    let p = plan(&s, 1, &p.status, &drones, later, &at(later));
    assert!(p.dispatch.is_empty());
    assert_eq!(p.status.counts.timed_out, 0);

    // The window opens: the canaries go out.
    let open = ts("2027-01-15T21:00:00Z");
    let p = plan(&s, 1, &p.status, &drones, open, &at(open));
    assert_eq!(p.dispatch.len(), 2, "the canaries");
    assert!(
        p.events.iter().any(|(r, _)| r == "MaintenanceWindowOpened"),
        "{:?}",
        p.events
    );
    assert_eq!(progressing(&p).reason, "WaveInProgress");
    let window = p.status.maintenance_window.clone().unwrap_or_default();
    assert!(window.open);
    assert_eq!(window.close_time.as_deref(), Some("2027-01-16T04:00:00+01:00"));
    assert_eq!(
        window.next_open_time.as_deref(),
        Some("2027-01-18T22:00:00+01:00"),
        "Monday"
    );
    assert_eq!(p.wake_at, Some(ts("2027-01-16T03:00:00Z")));
    apply(&mut drones, &p, open);
    let canaries = p.dispatch.clone();
    let first = drones
        .iter()
        .position(|d| d.name == canaries[0])
        .unwrap_or_default();
    let second = drones
        .iter()
        .position(|d| d.name == canaries[1])
        .unwrap_or_default();
    finish(&mut drones[first], "Committed");
    drones[second].started = true;
    drones[second].running = true;

    // Closed again with one canary still installing: it goes on and counts.
    let closed = ts("2027-01-16T03:00:00Z");
    let p = plan(&s, 1, &p.status, &drones, closed, &at(closed));
    assert!(p.dispatch.is_empty() && p.cancel.is_empty(), "{p:?}");
    assert!(p.events.iter().any(|(r, _)| r == "MaintenanceWindowClosed"));
    assert_eq!((p.status.counts.succeeded, p.status.counts.in_progress), (1, 1));
    let c = progressing(&p);
    assert_eq!(c.reason, "OutsideMaintenanceWindow");
    assert!(
        c.message
            .contains("opens at 2027-01-18T22:00:00+01:00[Europe/Berlin]; 1 dispatched drone(s) go on"),
        "{}",
        c.message
    );
    // It commits; the soak runs on wall time and the wave advances, with nothing dispatched.
    drones[second].running = false;
    finish(&mut drones[second], "Committed");
    let mut status = p.status;
    for t in [closed + 10, closed + 100] {
        let p = plan(&s, 1, &status, &drones, t, &at(t));
        assert!(p.dispatch.is_empty(), "at +{}: {:?}", t - closed, p.dispatch);
        status = p.status;
    }
    assert_eq!((status.current_wave, status.counts.succeeded), (1, 2));
    // Monday night: the next wave goes out.
    let monday = ts("2027-01-18T21:00:00Z");
    let p = plan(&s, 1, &status, &drones, monday, &at(monday));
    assert_eq!(p.dispatch.len(), 3, "{:?}", p.dispatch);
    // Without windows a rollout dispatches at once and shows no window.
    let p = plan(
        &spec(),
        1,
        &FirmwareRolloutStatus::default(),
        &fleet(10),
        T0,
        &at(T0),
    );
    assert_eq!(p.dispatch.len(), 2);
    assert_eq!((p.status.maintenance_window, p.wake_at), (None, None));
}

/// The progress deadline counts only time inside a window: a stuck rollout with a short nightly
/// window says so after a deadline's worth of open time, whatever the nights between.
#[test]
fn the_progress_deadline_counts_only_time_inside_windows() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    s.drone_timeout = None;
    s.progress_deadline = Some("30m".into());
    s.maintenance_windows = vec![crate::api::rollout::MaintenanceWindow {
        schedule: "0 22 * * *".into(),
        duration: "1h".into(),
        time_zone: "UTC".into(),
    }];
    let mut held = fleet(4);
    for d in &mut held {
        d.blocked = Some("drone is offline".into());
    }
    // Ten minutes before the window closes: no progress from here on.
    let start = ts("2027-01-15T22:50:00Z");
    let mut status = plan(&s, 1, &FirmwareRolloutStatus::default(), &held, start, &at(start)).status;
    for (when, reason) in [
        ("2027-01-16T12:00:00Z", "OutsideMaintenanceWindow"),
        ("2027-01-16T22:19:59Z", "WaveInProgress"),
        ("2027-01-16T22:20:00Z", "ProgressDeadlineExceeded"),
    ] {
        let t = ts(when);
        let p = plan(&s, 1, &status, &held, t, &at(t));
        let c = progressing(&p);
        assert_eq!(c.reason, reason, "at {when}: {}", c.message);
        status = p.status;
    }
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::PROGRESSING)
        .cloned()
        .unwrap_or_default();
    assert_eq!(c.status, "False");
    assert!(
        c.message
            .contains("for 1800s inside maintenance windows (spec.progressDeadline)"),
        "{}",
        c.message
    );
}

/// A drone held by a gate times out `droneTimeout` after the window opened (not after its wave
/// started hours before), counts as not started while closed, and starts afresh in the next
/// window.
#[test]
fn a_held_drone_times_out_from_the_window_opening_afresh_in_each_window() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    s.maintenance_windows = vec![crate::api::rollout::MaintenanceWindow {
        schedule: "0 22 * * *".into(),
        duration: "1h".into(),
        time_zone: "UTC".into(),
    }];
    let mut held = fleet(4);
    for d in &mut held {
        d.blocked = Some("drone is offline".into());
    }
    let start = ts("2027-01-15T12:00:00Z");
    let mut status = plan(&s, 1, &FirmwareRolloutStatus::default(), &held, start, &at(start)).status;
    for (when, timed_out) in [
        ("2027-01-15T22:09:59Z", 0),
        ("2027-01-15T22:10:00Z", 2),
        ("2027-01-15T23:30:00Z", 0),
        ("2027-01-16T22:09:59Z", 0),
        ("2027-01-16T22:10:00Z", 2),
    ] {
        let t = ts(when);
        let p = plan(&s, 1, &status, &held, t, &at(t));
        assert!(p.dispatch.is_empty());
        assert_eq!(p.status.counts.timed_out, timed_out, "at {when}");
        status = p.status;
    }
}

#[test]
fn retry_gives_a_new_attempt_to_the_failed_drones_and_only_those() {
    let mut s = spec();
    s.failure_policy.rules.clear();
    let mut drones = fleet(4);
    let p = plan(&s, 1, &FirmwareRolloutStatus::default(), &drones, T0, &at(T0));
    apply(&mut drones, &p, T0);
    let canary = p.dispatch.clone();
    let i = drones.iter().position(|d| d.name == canary[0]).unwrap();
    let j = drones.iter().position(|d| d.name == canary[1]).unwrap();
    finish(&mut drones[i], "RolledBack");
    finish(&mut drones[j], "Committed");
    let p = plan_with(
        &s,
        1,
        &p.status,
        &drones,
        T0 + 5,
        &at(T0 + 5),
        &ask("retry", "r1"),
    );
    assert_eq!(p.retry, vec![(canary[0].clone(), 1)], "only the rolled-back one");
    assert_eq!(last(&p.status).0, "Retried");
    assert!(last(&p.status).2.contains(&canary[0]), "{:?}", last(&p.status));
    assert!(p.events.iter().any(|e| e.0 == "Retried"));
    // The drone takes the new attempt up: it is in flight again, then commits.
    drones[i].retry = 1;
    drones[i].sync_reason = None;
    drones[i].last_result = None;
    drones[i].started = false;
    let p = plan(&s, 1, &p.status, &drones, T0 + 6, &at(T0 + 6));
    assert_eq!(p.outcomes[&canary[0]], Outcome::Waiting);
    finish(&mut drones[i], "Committed");
    // Nothing failed any more: a second retry is refused.
    let p = plan_with(
        &s,
        1,
        &p.status,
        &drones,
        T0 + 7,
        &at(T0 + 7),
        &ask("retry", "r2"),
    );
    assert!(p.retry.is_empty());
    assert_eq!(
        last(&p.status),
        (
            "Refused",
            "alice",
            "retry: no drone of this target failed; nothing to retry"
        )
    );
}
