//! Waves, outcomes and the circuit breaker of a `FirmwareRollout`, as pure functions: the
//! controller reads the objects into [`Drone`]s, calls [`plan`] with the time, and carries out
//! the returned [`Plan`] (spec writes, cancels, status, events).

use crate::api::meta::Condition;
use crate::api::rollout::{
    Counts, FailureRule, FirmwareRolloutSpec, FirmwareRolloutStatus, WaveSpec, condition, duration_secs,
};
use sha2::Digest;
use std::collections::BTreeMap;

/// A drone as the rollout sees it.
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent facts read from its FlightNode"
)]
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drone {
    /// `FlightNode` name (its wave comes from a hash of it).
    pub name: String,
    /// Its `spec.firmware` is this rollout's target, written by this rollout.
    pub dispatched: bool,
    /// When it was dispatched (unix seconds; 0 when not).
    pub dispatched_at: i64,
    /// Someone else owns its `spec.firmware` (a person, or another rollout still running).
    pub pinned: bool,
    /// Committed version is the rollout's version.
    pub on_target: bool,
    /// `status.firmwareSync.reason` for its current generation.
    pub sync_reason: Option<String>,
    /// Result of the upgrade named by `firmwareSync.upgradeId`, when it ended (CamelCase).
    pub last_result: Option<String>,
    /// The drone picked the upgrade up (reported it in flight, or finished it).
    pub started: bool,
    /// Why a gate holds it (offline, flight state, battery); `None`: it may start.
    pub blocked: Option<String>,
}

/// Where a drone stands in the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Not dispatched.
    NotStarted,
    /// Dispatched, held by a gate or not yet picked up.
    Waiting,
    /// Working on it.
    InProgress,
    /// On the rollout's version.
    Succeeded,
    /// Failed after the node reconciler's retries.
    Failed,
    /// Rejected by the agent.
    Rejected,
    /// Rolled back by the agent.
    RolledBack,
    /// Not finished within the per-drone timeout.
    TimedOut,
    /// Someone else owns its `spec.firmware`.
    Pinned,
}

impl Outcome {
    /// Finished one way or another (counts for the breaker's sample).
    pub fn finished(self) -> bool {
        matches!(
            self,
            Outcome::Succeeded
                | Outcome::Failed
                | Outcome::Rejected
                | Outcome::RolledBack
                | Outcome::TimedOut
        )
    }

    /// Counts towards a breaker rule of `kind`.
    pub fn is_kind(self, kind: &str) -> bool {
        match kind {
            "failed" => self == Outcome::Failed,
            "rejected" => self == Outcome::Rejected,
            "rolledBack" => self == Outcome::RolledBack,
            "timedOut" => self == Outcome::TimedOut,
            "any" => matches!(
                self,
                Outcome::Failed | Outcome::Rejected | Outcome::RolledBack | Outcome::TimedOut
            ),
            _ => false,
        }
    }
}

/// A drone's rank key: a stable hash of its name (Bottlerocket's wave seed, derived instead of
/// stored), so membership is deterministic and a drone keeps its place on every replica.
pub fn rank_key(name: &str) -> u64 {
    let d = sha2::Sha256::digest(name.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Cumulative drone counts per wave for `total` drones; non-decreasing, the last one `total`
/// (a final 100 % wave is added when the spec's waves stop short).
pub fn wave_targets(total: u32, waves: &[WaveSpec]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut prev = 0;
    for w in waves {
        let t = match (w.count, w.percent) {
            (Some(c), _) => c,
            (None, Some(p)) => {
                u32::try_from((u64::from(total) * u64::from(p.min(100))).div_ceil(100)).unwrap_or(total)
            }
            (None, None) => total,
        };
        let t = t.min(total).max(prev);
        out.push(t);
        prev = t;
    }
    if out.last().copied() != Some(total) || out.is_empty() {
        out.push(total);
    }
    out
}

/// The wave of every drone: rank by [`rank_key`], then the first wave whose target covers the
/// rank. A drone that joins later takes the place its hash gives it.
pub fn assign_waves<'a>(
    names: impl IntoIterator<Item = &'a str>,
    waves: &[WaveSpec],
) -> BTreeMap<String, usize> {
    let mut ranked: Vec<(u64, &str)> = names.into_iter().map(|n| (rank_key(n), n)).collect();
    ranked.sort_unstable();
    let targets = wave_targets(u32::try_from(ranked.len()).unwrap_or(u32::MAX), waves);
    ranked
        .iter()
        .enumerate()
        .map(|(rank, (_, name))| {
            let wave = targets
                .iter()
                .position(|t| (rank as u64) < u64::from(*t))
                .unwrap_or(targets.len() - 1);
            ((*name).to_owned(), wave)
        })
        .collect()
}

/// The outcome of one drone at `now`; `clock_start` is when its timeout clock started (its
/// dispatch, or the start of its wave when a gate kept it from being dispatched).
pub fn outcome(d: &Drone, now: i64, timeout_secs: Option<i64>, clock_start: Option<i64>) -> Outcome {
    if d.on_target {
        return Outcome::Succeeded;
    }
    if d.pinned {
        return Outcome::Pinned;
    }
    if d.dispatched && d.sync_reason.as_deref() == Some(crate::decide::node_sync::reason::FAILED) {
        return match d.last_result.as_deref() {
            Some("Rejected") => Outcome::Rejected,
            Some("RolledBack") => Outcome::RolledBack,
            _ => Outcome::Failed,
        };
    }
    let timed_out = match (timeout_secs, clock_start) {
        (Some(t), Some(start)) => now - start >= t,
        _ => false,
    };
    if timed_out {
        return Outcome::TimedOut;
    }
    if !d.dispatched {
        return Outcome::NotStarted;
    }
    if d.started {
        Outcome::InProgress
    } else {
        Outcome::Waiting
    }
}

/// Counts per outcome.
pub fn count(outcomes: impl IntoIterator<Item = Outcome>) -> Counts {
    let mut c = Counts::default();
    for o in outcomes {
        c.total += 1;
        match o {
            Outcome::NotStarted => c.not_started += 1,
            Outcome::Waiting => c.waiting += 1,
            Outcome::InProgress => c.in_progress += 1,
            Outcome::Succeeded => c.succeeded += 1,
            Outcome::Failed => c.failed += 1,
            Outcome::Rejected => c.rejected += 1,
            Outcome::RolledBack => c.rolled_back += 1,
            Outcome::TimedOut => c.timed_out += 1,
            Outcome::Pinned => c.pinned += 1,
        }
    }
    c.failed_total = c.failed + c.rejected + c.rolled_back + c.timed_out;
    c
}

/// The first rule that trips on `outcomes` (the breaker's sample), with the numbers that
/// tripped it.
pub fn breaker(rules: &[FailureRule], outcomes: &[Outcome]) -> Option<String> {
    let finished = outcomes.iter().filter(|o| o.finished()).count() as u64;
    for rule in rules {
        let bad = outcomes.iter().filter(|o| o.is_kind(&rule.kind)).count() as u64;
        if let Some(cap) = rule.max_count
            && bad >= u64::from(cap)
        {
            return Some(format!(
                "{} {bad} of {finished} finished drones reached the cap of {cap}",
                rule.kind
            ));
        }
        if let Some(pct) = rule.threshold_percent
            && finished > 0
            && finished >= u64::from(rule.min_finished)
            && bad * 100 >= u64::from(pct) * finished
        {
            return Some(format!(
                "{} {bad} of {finished} finished drones ({}%) reached the threshold of {pct}% \
                 (minimum sample {})",
                rule.kind,
                bad * 100 / finished,
                rule.min_finished
            ));
        }
    }
    None
}

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
    use crate::api::rollout::FailurePolicy;

    const T0: i64 = 1_800_000_000;

    fn at(t: i64) -> String {
        crate::decide::status::unix_rfc3339(t).unwrap_or_default()
    }

    fn rule(kind: &str, pct: u32, min: u32, cap: Option<u32>) -> FailureRule {
        FailureRule {
            kind: kind.into(),
            threshold_percent: Some(pct),
            min_finished: min,
            max_count: cap,
        }
    }

    fn spec() -> FirmwareRolloutSpec {
        FirmwareRolloutSpec {
            version: "2.0.0".into(),
            url: "http://fw/2.0.0.fnb".into(),
            waves: vec![
                WaveSpec {
                    count: Some(2),
                    soak: Some("60s".into()),
                    ..WaveSpec::default()
                },
                WaveSpec {
                    percent: Some(50),
                    ..WaveSpec::default()
                },
            ],
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
    fn waves_are_cumulative_deterministic_and_stable_for_newcomers() {
        assert_eq!(wave_targets(10, &spec().waves), vec![2, 5, 10]);
        assert_eq!(wave_targets(3, &spec().waves), vec![2, 2, 3]);
        assert_eq!(wave_targets(0, &[]), vec![0]);
        let drones = fleet(10);
        let a = assign_waves(drones.iter().map(|d| d.name.as_str()), &spec().waves);
        let b = assign_waves(drones.iter().rev().map(|d| d.name.as_str()), &spec().waves);
        assert_eq!(a, b, "order of listing does not matter");
        assert_eq!(a.values().filter(|w| **w == 0).count(), 2);
        assert_eq!(a.values().filter(|w| **w <= 1).count(), 5);
        // Percent waves keep the canary share when the fleet grows.
        let pct = [WaveSpec {
            percent: Some(10),
            ..WaveSpec::default()
        }];
        let names: Vec<String> = (0..100).map(|i| format!("d{i}")).collect();
        let w = assign_waves(names.iter().map(String::as_str), &pct);
        assert_eq!(w.values().filter(|w| **w == 0).count(), 10);
    }

    #[test]
    fn breaker_trips_exactly_at_the_limit_not_below_and_not_before_the_sample() {
        use Outcome::*;
        let rules = [rule("rolledBack", 25, 4, None)];
        // 1 of 4 = 25 %: trips (inclusive).
        assert!(breaker(&rules, &[RolledBack, Succeeded, Succeeded, Succeeded]).is_some());
        // 1 of 5 = 20 %: does not.
        assert!(breaker(&rules, &[RolledBack, Succeeded, Succeeded, Succeeded, Succeeded]).is_none());
        // 2 of 3 is 66 %, but only 3 finished: below the minimum sample.
        assert!(breaker(&rules, &[RolledBack, RolledBack, Succeeded, InProgress]).is_none());
        // Other kinds do not count for a rolledBack rule; `any` counts them all.
        assert!(breaker(&rules, &[Rejected, Failed, Succeeded, Succeeded]).is_none());
        assert!(
            breaker(
                &[rule("any", 50, 4, None)],
                &[Rejected, TimedOut, Succeeded, Succeeded]
            )
            .is_some()
        );
        // The absolute cap ignores the sample.
        let capped = [rule("failed", 100, 1000, Some(2))];
        assert!(breaker(&capped, &[Failed, InProgress]).is_none());
        let why = breaker(&capped, &[Failed, Failed, InProgress]).unwrap_or_default();
        assert!(why.contains("cap of 2"), "{why}");
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
