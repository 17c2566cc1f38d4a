//! One step of a `FirmwareRollout`, as a pure function: the controller reads the objects into
//! [`Drone`]s, calls [`plan`] with the time, and carries out the returned [`Plan`] (spec writes,
//! cancels, status, events). The waves, outcomes and breaker it uses are in
//! [`super::rollout_waves`].

use super::rollout_waves::{Drone, Outcome, assign_waves, breaker, count, outcome, rank_key, wave_targets};
use crate::api::meta::Condition;
use crate::api::rollout::{FirmwareRolloutSpec, FirmwareRolloutStatus, condition, duration_secs};
use std::collections::BTreeMap;

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Drones to write the target into (dispatch).
    pub dispatch: Vec<String>,
    /// Dispatched drones that have not started: take the target back (the node reconciler
    /// cancels their command).
    pub cancel: Vec<String>,
    /// The new status.
    pub status: FirmwareRolloutStatus,
    /// Kubernetes Events to emit: (reason, note).
    pub events: Vec<(String, String)>,
    /// Outcome per drone (for metrics and the live view).
    pub outcomes: BTreeMap<String, Outcome>,
}

fn cond(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: i64,
    previous: &[Condition],
    now: &str,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.to_owned(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: Some(generation),
    }
}

fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

fn parse_time(t: Option<&str>) -> Option<i64> {
    time::OffsetDateTime::parse(t?, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(time::OffsetDateTime::unix_timestamp)
}

/// One reconcile step of a rollout of `generation` over `drones` at `now`.
pub fn plan(
    spec: &FirmwareRolloutSpec,
    generation: i64,
    previous: &FirmwareRolloutStatus,
    drones: &[Drone],
    now: i64,
    now_rfc3339: &str,
) -> Plan {
    let mut status = previous.clone();
    let mut events = Vec::new();
    let new_generation = previous.observed_generation != Some(generation);
    if new_generation {
        if is_true(&previous.conditions, condition::HALTED) {
            // Resumed: outcomes before now do not count for the breaker again.
            status.breaker_since = Some(now_rfc3339.to_owned());
        }
        status.observed_generation = Some(generation);
        status.current_wave = 0;
        status.wave_started_time = Some(now_rfc3339.to_owned());
        status.wave_finished_time = None;
        status
            .conditions
            .retain(|c| c.type_ != condition::HALTED || c.reason == "Paused");
    }
    let waves = assign_waves(drones.iter().map(|d| d.name.as_str()), &spec.waves);
    let wave_count = wave_targets(u32::try_from(drones.len()).unwrap_or(u32::MAX), &spec.waves).len();
    let timeout = duration_secs(spec.drone_timeout.as_deref());
    let wave_start = parse_time(status.wave_started_time.as_deref()).unwrap_or(now);
    let breaker_since = parse_time(status.breaker_since.as_deref()).unwrap_or(i64::MIN);
    let current = status.current_wave as usize;

    let mut outcomes = BTreeMap::new();
    for d in drones {
        let wave = waves.get(&d.name).copied().unwrap_or(0);
        let clock = if d.dispatched {
            Some(d.dispatched_at)
        } else if wave <= current && !d.pinned {
            Some(wave_start)
        } else {
            None
        };
        outcomes.insert(d.name.clone(), outcome(d, now, timeout, clock));
    }
    // The breaker's sample: drones dispatched since the last resume.
    let sample: Vec<Outcome> = drones
        .iter()
        .filter(|d| d.dispatched && d.dispatched_at >= breaker_since)
        .map(|d| outcomes[&d.name])
        .collect();
    let was_halted = is_true(&status.conditions, condition::HALTED)
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == condition::HALTED && c.reason == "CircuitBreakerTripped");
    let tripped = if was_halted {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::HALTED)
            .map(|c| c.message.clone())
    } else {
        breaker(&spec.failure_policy.rules, &sample)
    };

    let mut dispatch = Vec::new();
    let mut cancel = Vec::new();
    let prev_conditions = previous.conditions.clone();
    let mut conditions = Vec::new();
    let wave_done = drones.iter().all(|d| {
        let o = outcomes[&d.name];
        waves.get(&d.name).copied().unwrap_or(0) > current || o.finished() || o == Outcome::Pinned
    });
    let last_wave = current + 1 >= wave_count;
    let complete = wave_done && last_wave && tripped.is_none();

    if let Some(why) = &tripped {
        if !was_halted {
            events.push((
                "Halted".to_owned(),
                format!("circuit breaker tripped in wave {current}: {why}"),
            ));
        }
        // In-flight drones run to their real end; the ones that have not started are called back.
        for d in drones {
            if d.dispatched && !d.started && outcomes[&d.name] == Outcome::Waiting {
                cancel.push(d.name.clone());
            }
        }
        conditions.push(cond(
            condition::HALTED,
            true,
            "CircuitBreakerTripped",
            why.clone(),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
        conditions.push(cond(
            condition::PROGRESSING,
            false,
            "Halted",
            "no new dispatch".into(),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
        conditions.push(cond(
            condition::COMPLETE,
            false,
            "Halted",
            "halted before the last wave".into(),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
    } else if complete {
        if !is_true(&prev_conditions, condition::COMPLETE) || new_generation {
            events.push(("Completed".to_owned(), format!("all {wave_count} waves finished")));
        }
        conditions.push(cond(
            condition::HALTED,
            false,
            "Running",
            String::new(),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
        conditions.push(cond(
            condition::PROGRESSING,
            false,
            "Complete",
            "every wave finished".into(),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
        conditions.push(cond(
            condition::COMPLETE,
            true,
            "Complete",
            format!("all {wave_count} waves finished"),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
    } else {
        if spec.paused {
            conditions.push(cond(
                condition::HALTED,
                true,
                "Paused",
                "spec.paused is true".into(),
                generation,
                &prev_conditions,
                now_rfc3339,
            ));
        } else {
            conditions.push(cond(
                condition::HALTED,
                false,
                "Running",
                String::new(),
                generation,
                &prev_conditions,
                now_rfc3339,
            ));
        }
        // Soak, then the next wave.
        if wave_done && !last_wave && !spec.paused {
            let finished_at = parse_time(status.wave_finished_time.as_deref()).unwrap_or(now);
            if status.wave_finished_time.is_none() {
                status.wave_finished_time = Some(now_rfc3339.to_owned());
            }
            let soak = spec
                .waves
                .get(current)
                .and_then(|w| duration_secs(w.soak.as_deref()))
                .unwrap_or(0);
            if now >= finished_at + soak {
                status.current_wave += 1;
                status.wave_started_time = Some(now_rfc3339.to_owned());
                status.wave_finished_time = None;
                events.push((
                    "WaveAdvanced".to_owned(),
                    format!("wave {current} finished and soaked; wave {} starts", current + 1),
                ));
            }
        }
        let current = status.current_wave as usize;
        if !spec.paused {
            let in_flight = outcomes
                .values()
                .filter(|o| matches!(o, Outcome::Waiting | Outcome::InProgress))
                .count() as u64;
            let room = spec
                .max_concurrent
                .map_or(u64::MAX, |m| u64::from(m).saturating_sub(in_flight));
            let mut candidates: Vec<&Drone> = drones
                .iter()
                .filter(|d| {
                    outcomes[&d.name] == Outcome::NotStarted
                        && waves.get(&d.name).copied().unwrap_or(0) <= current
                        && d.blocked.is_none()
                })
                .collect();
            candidates.sort_by_key(|d| rank_key(&d.name));
            dispatch = candidates
                .into_iter()
                .take(usize::try_from(room).unwrap_or(usize::MAX))
                .map(|d| d.name.clone())
                .collect();
        }
        conditions.push(cond(
            condition::PROGRESSING,
            !spec.paused,
            if spec.paused { "Paused" } else { "WaveInProgress" },
            format!("wave {} of {wave_count}", status.current_wave + 1),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
        conditions.push(cond(
            condition::COMPLETE,
            false,
            "InProgress",
            String::new(),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
    }
    status.conditions = conditions;
    status.counts = count(outcomes.values().copied());
    status.wave = format!(
        "{}/{wave_count}",
        (status.current_wave as usize + 1).min(wave_count)
    );
    Plan {
        dispatch,
        cancel,
        status,
        events,
        outcomes,
    }
}

#[cfg(test)]
mod tests {
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
}
