//! One step of a `FirmwareRollout`, as a pure function: the controller reads the objects into
//! [`Drone`]s, calls [`plan`] with the time, and carries out the returned [`Plan`] (spec writes,
//! cancels, status, events). The waves, outcomes and breaker it uses are in
//! [`super::rollout_waves`].

use super::node_sync;
use super::rollout_waves::{Drone, Outcome, assign_waves, breaker, count, outcome, rank_key, wave_targets};
use super::window::{State as WindowState, Windows};
use crate::api::meta::Condition;
use crate::api::rollout::{
    Actor, FirmwareRolloutSpec, FirmwareRolloutStatus, HISTORY_LEN, HistoryEntry, MaintenanceWindowStatus,
    Request, condition, duration_secs, target_hash,
};
use std::collections::{BTreeMap, BTreeSet};

/// The dispatch rate's minute is cut into this many slices of [`SLICE_SECS`]; each gets its share.
const SLICES_PER_MINUTE: usize = 6;
/// Length of one slice of the dispatch rate's minute, in seconds.
const SLICE_SECS: i64 = 10;

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Drones to write the target into (dispatch).
    pub dispatch: Vec<String>,
    /// Dispatched drones that have not started: take the target back (the node reconciler
    /// cancels their command).
    pub cancel: Vec<String>,
    /// Drones whose attempt failed and that a `retry` request gives a new one: (name, the
    /// `spec.firmware.retry` to write).
    pub retry: Vec<(String, u32)>,
    /// The new status.
    pub status: FirmwareRolloutStatus,
    /// Kubernetes Events to emit: (reason, note).
    pub events: Vec<(String, String)>,
    /// Outcome per drone (for metrics and the live view).
    pub outcomes: BTreeMap<String, Outcome>,
    /// When a maintenance window opens or closes next (unix seconds): the controller steps then.
    pub wake_at: Option<i64>,
}

/// A time of a window as RFC 3339 in the window's zone (`2026-12-06T22:00:00+01:00`).
fn zoned_rfc3339(z: &jiff::Zoned) -> String {
    z.timestamp().display_with_offset(z.offset()).to_string()
}

/// `status.maintenanceWindow` and the next time it changes, from where the windows stand.
fn window_status(state: &WindowState) -> (Option<MaintenanceWindowStatus>, Option<i64>) {
    let second = |z: &jiff::Zoned| z.timestamp().as_second();
    match state {
        WindowState::Always => (None, None),
        WindowState::Open { closes, next, .. } => (
            Some(MaintenanceWindowStatus {
                open: true,
                close_time: closes.as_ref().map(zoned_rfc3339),
                next_open_time: next.as_ref().map(zoned_rfc3339),
            }),
            closes.as_ref().map(second),
        ),
        WindowState::Closed { opens } => (
            Some(MaintenanceWindowStatus {
                open: false,
                close_time: None,
                next_open_time: opens.as_ref().map(zoned_rfc3339),
            }),
            opens.as_ref().map(second),
        ),
    }
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

/// How many drones had finished at the previous step (from its counts).
fn previous_finished(previous: &FirmwareRolloutStatus) -> usize {
    let c = previous.counts;
    (c.succeeded + c.failed + c.rejected + c.rolled_back + c.timed_out) as usize
}

/// What holds the rollout, for the deadline's message: how many drones wait, and the first few
/// gates that hold undispatched drones.
fn blocked_summary(drones: &[Drone], outcomes: &BTreeMap<String, Outcome>) -> String {
    let waiting = outcomes
        .values()
        .filter(|o| matches!(o, Outcome::Waiting | Outcome::InProgress))
        .count();
    let mut gates: BTreeMap<&str, usize> = BTreeMap::new();
    for d in drones.iter().filter(|d| outcomes[&d.name] == Outcome::NotStarted) {
        if let Some(why) = d.blocked.as_deref() {
            *gates.entry(why).or_default() += 1;
        }
    }
    let held: Vec<String> = gates
        .iter()
        .take(3)
        .map(|(why, n)| format!("{n} held: {why}"))
        .collect();
    if held.is_empty() {
        format!("{waiting} dispatched and not finished")
    } else {
        format!("{waiting} dispatched and not finished, {}", held.join(", "))
    }
}

/// How far a wave's flight soak ([`crate::api::rollout::FlightSoak`]) is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Flown {
    /// Succeeded drones of the wave that flew enough on the new firmware.
    have: u32,
    /// How many must have.
    need: u32,
    /// Succeeded drones of the wave.
    of: u32,
    /// What each must have flown, for the message.
    what: String,
}

impl Flown {
    /// The flight soak `f` of wave `current`: its succeeded drones that flew at least
    /// `f.flights` flights and `f.flightTime` on the new firmware. A drone that reports no
    /// flights has not flown (inconclusive, never a success).
    fn of(
        f: &crate::api::rollout::FlightSoak,
        drones: &[Drone],
        waves: &BTreeMap<String, usize>,
        current: usize,
        outcomes: &BTreeMap<String, Outcome>,
    ) -> Flown {
        let min_secs = duration_secs(f.flight_time.as_deref()).unwrap_or(0);
        let succeeded: Vec<&Drone> = drones
            .iter()
            .filter(|d| waves.get(&d.name).copied().unwrap_or(0) == current)
            .filter(|d| outcomes[&d.name] == Outcome::Succeeded)
            .collect();
        let of = u32::try_from(succeeded.len()).unwrap_or(u32::MAX);
        let have = succeeded
            .iter()
            .filter(|d| d.flights.unwrap_or(0) >= f.flights && d.flight_secs.unwrap_or(0) >= min_secs)
            .count();
        let need = (u64::from(of) * u64::from(f.percent.clamp(1, 100)))
            .div_ceil(100)
            .max(1);
        let what = match f.flight_time.as_deref() {
            Some(t) => format!("{} flight(s) and {t} in the air", f.flights),
            None => format!("{} flight(s)", f.flights),
        };
        Flown {
            have: u32::try_from(have).unwrap_or(u32::MAX),
            need: u32::try_from(need).unwrap_or(u32::MAX),
            of,
            what,
        }
    }

    fn enough(&self) -> bool {
        self.have >= self.need
    }
}

impl std::fmt::Display for Flown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} succeeded drones flew {} on the new firmware; {} needed",
            self.have, self.of, self.what, self.need
        )
    }
}

/// Drones that carry this rollout's `spec.firmware` and whose command has not started: what a
/// halt, a yield to a newer rollout or a new target takes back (waiting at a gate, timed out
/// offline, in `Retrying` between attempts, or dispatched for an earlier target). A drone running
/// the upgrade keeps it to its real end; one whose install ended keeps its record, the outcome.
fn unstarted(d: &Drone) -> bool {
    if d.running {
        return false;
    }
    d.stale || (d.dispatched && !d.on_target && d.sync_reason.as_deref() != Some(node_sync::reason::FAILED))
}

/// `by` for a sentence: who, or that nobody said.
fn who(by: &str) -> &str {
    if by.is_empty() { "an unnamed user" } else { by }
}

/// One reconcile step of a rollout of `generation` over `drones` at `now`.
///
/// Wave progress belongs to the target ([`target_hash`], recorded in `status.targetHash`): only
/// a change of version, url, allowDowngrade or selector starts the waves over and lifts a
/// breaker halt; any other edit (`paused`, gates, rules, waves) keeps the progress, the halt
/// and the completion. A terminal rollout (Complete for its target, or halted by the breaker)
/// never dispatches. Drones a newer rollout selects ([`Drone::superseded_by`]) are yielded:
/// never dispatched, called back when not started, and named in the `Superseded` condition.
///
/// Maintenance windows ([`super::window`]): outside every window nothing new is dispatched,
/// while dispatched drones go on and count as usual and soaks run on wall time. An undispatched
/// drone's timeout runs from the wave's start or the window's opening, whichever is later, and
/// not at all while closed (it cannot be dispatched then); the progress deadline counts only
/// time inside a window, so a rollout stuck across a short nightly window still says so.
pub fn plan(
    spec: &FirmwareRolloutSpec,
    generation: i64,
    previous: &FirmwareRolloutStatus,
    drones: &[Drone],
    now: i64,
    now_rfc3339: &str,
) -> Plan {
    plan_with(
        spec,
        generation,
        previous,
        drones,
        now,
        now_rfc3339,
        &Operator::default(),
    )
}

/// What operators did since the last step: the request in the rollout's annotation
/// ([`crate::api::rollout::ANNOTATION_REQUEST`]) and who last edited its spec.
#[derive(Debug, Clone, Default)]
pub struct Operator {
    /// The request, carried out once per id.
    pub request: Option<Request>,
    /// Who wrote the current generation (for the history).
    pub editor: Option<String>,
}

fn record(
    status: &mut FirmwareRolloutStatus,
    action: &str,
    by: &str,
    now: &str,
    generation: i64,
    message: String,
) {
    status.history.push(HistoryEntry {
        action: action.to_owned(),
        by: by.to_owned(),
        time: now.to_owned(),
        generation,
        message,
    });
    let over = status.history.len().saturating_sub(HISTORY_LEN);
    status.history.drain(..over);
}

/// [`plan`] with the operators' actions: `abort` (sticky until `resume` or a new target),
/// `resume` (lifts a breaker halt or an abort; the breaker counts from then), `promote` (ends
/// the finished current wave's soak now), each recorded in `status.history` with an Event, and
/// a refused one recorded as `Refused` with why.
#[allow(
    clippy::too_many_lines,
    reason = "one step of the rollout; its parts share the outcomes and the status being built"
)]
pub fn plan_with(
    spec: &FirmwareRolloutSpec,
    generation: i64,
    previous: &FirmwareRolloutStatus,
    drones: &[Drone],
    now: i64,
    now_rfc3339: &str,
    op: &Operator,
) -> Plan {
    let mut status = previous.clone();
    let mut events = Vec::new();
    let target = target_hash(spec);
    // A status written before target hashes: its progress belongs to the generation it observed.
    let target_changed = match &previous.target_hash {
        Some(h) => *h != target,
        None => previous.observed_generation != Some(generation),
    };
    if target_changed {
        if previous.observed_generation.is_some() {
            // Outcomes of an earlier target do not count for this one's breaker.
            status.breaker_since = Some(now_rfc3339.to_owned());
        }
        status.target_generation = Some(generation);
        status.current_wave = 0;
        status.wave_started_time = Some(now_rfc3339.to_owned());
        status.wave_finished_time = None;
    }
    if target_changed {
        // A new target is a new rollout of the same name: an abort or a promotion was about
        // the old one.
        status.aborted = None;
        status.promoted_wave = None;
    }
    status.target_hash = Some(target);
    status.target_generation.get_or_insert(generation);
    status.observed_generation = Some(generation);
    let editor = op.editor.clone().unwrap_or_default();
    match previous.observed_generation {
        None => record(
            &mut status,
            "Created",
            &editor,
            now_rfc3339,
            generation,
            format!("{} from {}", spec.version, spec.url),
        ),
        Some(g) if g != generation => {
            let was_paused = previous
                .conditions
                .iter()
                .any(|c| c.type_ == condition::HALTED && c.status == "True" && c.reason == "Paused");
            let (action, message) = match (was_paused, spec.paused) {
                (false, true) => ("Paused", "spec.paused set: nothing new is dispatched".to_owned()),
                (true, false) => ("Resumed", "spec.paused cleared".to_owned()),
                _ if target_changed => ("Edited", format!("new target {} from {}", spec.version, spec.url)),
                _ => ("Edited", format!("spec changed (generation {generation})")),
            };
            record(&mut status, action, &editor, now_rfc3339, generation, message);
        }
        Some(_) => {}
    }
    let request = op
        .request
        .as_ref()
        .filter(|q| !q.id.is_empty() && previous.last_request.as_deref() != Some(q.id.as_str()));
    if let Some(q) = request {
        status.last_request = Some(q.id.clone());
    }
    // Terminal states stick for their target: another edit neither resumes a halt nor reopens a
    // finished rollout.
    let mut halted_before = previous
        .conditions
        .iter()
        .find(|c| c.type_ == condition::HALTED && c.status == "True" && c.reason == "CircuitBreakerTripped")
        .filter(|_| !target_changed);
    let was_complete = !target_changed && is_true(&previous.conditions, condition::COMPLETE);
    match request.map(|q| (q.action.as_str(), q)) {
        Some(("abort", q)) => {
            let refused = if was_complete {
                Some("the rollout is complete: nothing to abort")
            } else if status.aborted.is_some() {
                Some("the rollout is already aborted")
            } else {
                None
            };
            if let Some(why) = refused {
                record(
                    &mut status,
                    "Refused",
                    &q.by,
                    now_rfc3339,
                    generation,
                    format!("abort: {why}"),
                );
            } else {
                status.aborted = Some(Actor {
                    by: q.by.clone(),
                    time: now_rfc3339.to_owned(),
                });
                let note = "nothing new is dispatched; every drone that has not started is called back";
                record(
                    &mut status,
                    "Aborted",
                    &q.by,
                    now_rfc3339,
                    generation,
                    note.to_owned(),
                );
                events.push(("Aborted".to_owned(), format!("aborted by {}: {note}", who(&q.by))));
            }
        }
        Some(("resume", q)) => {
            if halted_before.is_some() || status.aborted.is_some() {
                halted_before = None;
                status.aborted = None;
                // The outcomes that tripped the breaker are judged; it counts afresh from here.
                status.breaker_since = Some(now_rfc3339.to_owned());
                let note = "halt lifted: dispatching goes on and the circuit breaker counts from now";
                record(
                    &mut status,
                    "Resumed",
                    &q.by,
                    now_rfc3339,
                    generation,
                    note.to_owned(),
                );
                events.push(("Resumed".to_owned(), format!("resumed by {}: {note}", who(&q.by))));
            } else {
                let why = "resume: the rollout is neither halted nor aborted".to_owned();
                record(&mut status, "Refused", &q.by, now_rfc3339, generation, why);
            }
        }
        Some(("promote" | "retry", _)) | None => {}
        Some((other, q)) => {
            let why = format!("unknown action {other:?} (abort, resume, promote or retry)");
            record(&mut status, "Refused", &q.by, now_rfc3339, generation, why);
        }
    }

    let waves = assign_waves(drones.iter().map(|d| d.name.as_str()), &spec.waves);
    let wave_count = wave_targets(u32::try_from(drones.len()).unwrap_or(u32::MAX), &spec.waves).len();
    let timeout = duration_secs(spec.drone_timeout.as_deref());
    let wave_start = parse_time(status.wave_started_time.as_deref()).unwrap_or(now);
    let breaker_since = parse_time(status.breaker_since.as_deref()).unwrap_or(i64::MIN);
    let current = status.current_wave as usize;
    // NB: the controller never plans an invalid spec (validate refuses it); windows that do not
    // read hold dispatch rather than open it.
    let windows = Windows::of(&spec.maintenance_windows).ok();
    let window = windows
        .as_ref()
        .map_or(WindowState::Closed { opens: None }, |w| w.state(now));
    let window_closed = matches!(window, WindowState::Closed { .. });
    let undispatched_clock = match &window {
        WindowState::Always => Some(wave_start),
        WindowState::Open { since, .. } => Some(wave_start.max(*since)),
        WindowState::Closed { .. } => None,
    };
    status.maintenance_window = None;
    let mut wake_at = None;

    let mut outcomes = BTreeMap::new();
    for d in drones {
        let wave = waves.get(&d.name).copied().unwrap_or(0);
        let clock = if d.dispatched {
            Some(d.dispatched_at)
        } else if wave <= current && !d.pinned && d.superseded_by.is_none() {
            undispatched_clock
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
    let tripped = match (&status.aborted, halted_before) {
        (Some(a), _) => Some(format!("aborted by {} at {}", who(&a.by), a.time)),
        (None, Some(c)) => Some(c.message.clone()),
        (None, None) if was_complete => None,
        (None, None) => breaker(&spec.failure_policy.rules, &sample),
    };
    let halt_reason = if status.aborted.is_some() {
        "Aborted"
    } else {
        "CircuitBreakerTripped"
    };

    let mut dispatch = Vec::new();
    let prev_conditions = previous.conditions.clone();
    let mut conditions = Vec::new();
    let all_finished = drones.iter().all(|d| {
        let o = outcomes[&d.name];
        waves.get(&d.name).copied().unwrap_or(0) > current
            || o.finished()
            || matches!(o, Outcome::Pinned | Outcome::Superseded)
    });
    // Evidence: a wave advances only on as many real results as it has drones. A drone that
    // timed out (offline, flying, never picked the command up) is no result: the next drones by
    // rank take its place, so an offline canary never lets the next wave start on nothing.
    let members = drones
        .iter()
        .filter(|d| {
            waves.get(&d.name).copied().unwrap_or(0) <= current
                && !matches!(outcomes[&d.name], Outcome::Pinned | Outcome::Superseded)
        })
        .count();
    let evidence = drones.iter().filter(|d| outcomes[&d.name].is_result()).count();
    let pending = outcomes
        .values()
        .filter(|o| matches!(o, Outcome::Waiting | Outcome::InProgress))
        .count();
    let wave_done = all_finished && evidence >= members;
    let last_wave = current + 1 >= wave_count;
    let complete = was_complete || (wave_done && last_wave && tripped.is_none());
    let flown = spec
        .waves
        .get(current)
        .and_then(|w| w.flight_soak.as_ref())
        .filter(|_| wave_done && !last_wave)
        .map(|f| Flown::of(f, drones, &waves, current, &outcomes));
    // Waiting for flights after the wall-time soak is no soak by design: the progress deadline
    // runs (a wave whose drones never fly must not wait forever).
    let wall_soak_over = {
        let finished_at = parse_time(status.wave_finished_time.as_deref()).unwrap_or(now);
        let soak = spec
            .waves
            .get(current)
            .and_then(|w| duration_secs(w.soak.as_deref()))
            .unwrap_or(0);
        status.wave_finished_time.is_some() && now >= finished_at + soak
    };
    let waiting_for_flights = wall_soak_over && flown.as_ref().is_some_and(|f| !f.enough());
    if let Some(q) = request.filter(|q| q.action == "promote") {
        let refused = if tripped.is_some() {
            Some("the rollout is halted; resume it first".to_owned())
        } else if last_wave {
            Some("the last wave has no soak to end".to_owned())
        } else if !wave_done {
            Some(format!(
                "wave {} has not finished: {pending} drones are still working",
                current + 1
            ))
        } else {
            None
        };
        if let Some(why) = refused {
            record(
                &mut status,
                "Refused",
                &q.by,
                now_rfc3339,
                generation,
                format!("promote: {why}"),
            );
        } else {
            status.promoted_wave = u32::try_from(current).ok();
            let note = format!("the soak of wave {} ends now", current + 1);
            record(
                &mut status,
                "Promoted",
                &q.by,
                now_rfc3339,
                generation,
                note.clone(),
            );
            events.push((
                "Promoted".to_owned(),
                format!("promoted by {}: {note}", who(&q.by)),
            ));
        }
    }
    let promoted = status.promoted_wave.is_some_and(|w| w as usize == current);
    // Retry: a new attempt for each drone of this target whose attempt failed, and only those.
    let mut retry = Vec::new();
    if let Some(q) = request.filter(|q| q.action == "retry") {
        let failed: Vec<&Drone> = drones
            .iter()
            .filter(|d| {
                d.dispatched
                    && !d.running
                    && matches!(
                        outcomes[&d.name],
                        Outcome::Failed | Outcome::Rejected | Outcome::RolledBack | Outcome::TimedOut
                    )
            })
            .collect();
        if failed.is_empty() {
            let why = "retry: no drone of this target failed; nothing to retry".to_owned();
            record(&mut status, "Refused", &q.by, now_rfc3339, generation, why);
        } else {
            retry = failed.iter().map(|d| (d.name.clone(), d.retry + 1)).collect();
            let mut names: Vec<&str> = failed.iter().take(10).map(|d| d.name.as_str()).collect();
            if failed.len() > 10 {
                names.push("…");
            }
            let note = format!(
                "a new attempt for the {} drone(s) that failed: {}",
                failed.len(),
                names.join(", ")
            );
            record(
                &mut status,
                "Retried",
                &q.by,
                now_rfc3339,
                generation,
                note.clone(),
            );
            events.push(("Retried".to_owned(), format!("retried by {}: {note}", who(&q.by))));
        }
    }
    let waiting_for_flights = waiting_for_flights && !promoted;

    if let Some(why) = &tripped {
        if halted_before.is_none() && status.aborted.is_none() {
            events.push((
                "Halted".to_owned(),
                format!("circuit breaker tripped in wave {current}: {why}"),
            ));
        }
        conditions.push(cond(
            condition::HALTED,
            true,
            halt_reason,
            why.clone(),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
        conditions.push(cond(
            condition::PROGRESSING,
            false,
            if status.aborted.is_some() {
                "Aborted"
            } else {
                "Halted"
            },
            "no new dispatch".into(),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
        conditions.push(cond(
            condition::COMPLETE,
            false,
            if status.aborted.is_some() {
                "Aborted"
            } else {
                "Halted"
            },
            "halted before the last wave".into(),
            generation,
            &prev_conditions,
            now_rfc3339,
        ));
    } else if complete {
        if !was_complete {
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
        // Soak (wall time, then flights), then the next wave.
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
            if promoted || (now >= finished_at + soak && flown.as_ref().is_none_or(Flown::enough)) {
                status.promoted_wave = None;
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
        (status.maintenance_window, wake_at) = window_status(&window);
        let was_open = previous.maintenance_window.as_ref().map(|w| w.open);
        let is_open = status.maintenance_window.as_ref().map(|w| w.open);
        if let (Some(was), Some(is)) = (was_open, is_open)
            && was != is
        {
            events.push(if is {
                (
                    "MaintenanceWindowOpened".to_owned(),
                    "dispatching again".to_owned(),
                )
            } else {
                (
                    "MaintenanceWindowClosed".to_owned(),
                    "no new dispatch until the next window; dispatched drones go on".to_owned(),
                )
            });
        }
        if !spec.paused && !window_closed {
            // A drone that timed out but is still installing is still in flight.
            let in_flight = drones
                .iter()
                .filter(|d| {
                    matches!(outcomes[&d.name], Outcome::Waiting | Outcome::InProgress)
                        || (outcomes[&d.name] == Outcome::TimedOut && d.running)
                })
                .count() as u64;
            let room = spec
                .max_concurrent
                .map_or(u64::MAX, |m| u64::from(m).saturating_sub(in_flight));
            // The dispatch rate: what went out in the last minute counts against this one's,
            // and the minute's allowance is spread over its slices, so a step never sends a
            // whole minute's worth at once (and holds the loop while writing it).
            let succeeded = outcomes.values().filter(|o| **o == Outcome::Succeeded).count();
            let sent_within = |secs: i64| {
                drones
                    .iter()
                    .filter(|d| d.dispatched && now - d.dispatched_at < secs)
                    .count()
            };
            let per_minute = spec.dispatch_rate.per_minute(succeeded);
            let per_slice = per_minute.div_ceil(SLICES_PER_MINUTE);
            let rate_room = per_minute
                .saturating_sub(sent_within(60))
                .min(per_slice.saturating_sub(sent_within(SLICE_SECS))) as u64;
            let room = room.min(rate_room);
            let mut candidates: Vec<&Drone> = drones
                .iter()
                .filter(|d| {
                    outcomes[&d.name] == Outcome::NotStarted
                        && waves.get(&d.name).copied().unwrap_or(0) <= current
                        && d.blocked.is_none()
                })
                .collect();
            candidates.sort_by_cached_key(|d| rank_key(&d.name));
            // Stand-ins, by rank from the later waves, for drones of this wave that cannot give
            // a result (held by a gate, timed out).
            let short = members.saturating_sub(evidence + pending + candidates.len());
            if short > 0 {
                let mut later: Vec<&Drone> = drones
                    .iter()
                    .filter(|d| {
                        outcomes[&d.name] == Outcome::NotStarted
                            && waves.get(&d.name).copied().unwrap_or(0) > current
                            && d.blocked.is_none()
                    })
                    .collect();
                later.sort_by_cached_key(|d| rank_key(&d.name));
                candidates.extend(later.into_iter().take(short));
            }
            dispatch = candidates
                .into_iter()
                .take(usize::try_from(room).unwrap_or(usize::MAX))
                .map(|d| d.name.clone())
                .collect();
        }
        let waiting_for_evidence =
            all_finished && evidence < members && status.current_wave as usize == current;
        // Progress: something was dispatched or finished, or the wave moved on. Soaking and
        // pausing are waits by design and keep the clock at zero.
        let finished_now = outcomes.values().filter(|o| o.finished()).count();
        let finished_before = previous_finished(previous);
        let soaking = wave_done && !last_wave && !waiting_for_flights;
        let flown_before = previous.flown_drones;
        status.flown_drones = flown.as_ref().map(|f| f.have);
        if !dispatch.is_empty()
            || finished_now != finished_before
            || status.current_wave != previous.current_wave
            || soaking
            || status.flown_drones > flown_before
            || spec.paused
            || target_changed
            || status.last_progress_time.is_none()
        {
            status.last_progress_time = Some(now_rfc3339.to_owned());
        }
        let deadline = spec
            .progress_deadline
            .as_deref()
            .and_then(|d| duration_secs(Some(d)))
            .unwrap_or(crate::api::rollout::DEFAULT_PROGRESS_DEADLINE_SECS);
        let stuck_since = parse_time(status.last_progress_time.as_deref()).unwrap_or(now);
        // Time outside every window does not count, like a pause; counted in full for the
        // message (one stretch of open time per window passed, so a handful a day).
        let stuck_for = windows
            .as_ref()
            .map_or(0, |w| w.open_secs(stuck_since, now, i64::MAX));
        let exceeded = stuck_for >= deadline;
        conditions.push(cond(
            condition::PROGRESSING,
            !spec.paused && !exceeded,
            if spec.paused {
                "Paused"
            } else if exceeded {
                "ProgressDeadlineExceeded"
            } else if window_closed {
                "OutsideMaintenanceWindow"
            } else {
                "WaveInProgress"
            },
            if exceeded && !spec.paused {
                format!(
                    "wave {} of {wave_count}: no drone dispatched or finished for {stuck_for}s{} (spec.progressDeadline); {}",
                    status.current_wave + 1,
                    if spec.maintenance_windows.is_empty() {
                        ""
                    } else {
                        " inside maintenance windows"
                    },
                    blocked_summary(drones, &outcomes)
                )
            } else if let WindowState::Closed { opens } = &window {
                let until = match opens {
                    Some(at) => format!("until the maintenance window opens at {at}"),
                    None => "and no maintenance window opens in the years ahead".to_owned(),
                };
                let going_on = if pending > 0 {
                    format!("; {pending} dispatched drone(s) go on")
                } else {
                    String::new()
                };
                format!(
                    "wave {} of {wave_count}: nothing new is dispatched {until}{going_on}",
                    status.current_wave + 1
                )
            } else if let Some(f) = flown.as_ref().filter(|_| waiting_for_flights) {
                format!("wave {} of {wave_count}: soaking in flight: {f}", status.current_wave + 1)
            } else if waiting_for_evidence {
                format!(
                    "wave {} of {wave_count}: {evidence} of {members} drones gave a result; the next drones by rank stand in for the rest",
                    status.current_wave + 1
                )
            } else {
                format!("wave {} of {wave_count}", status.current_wave + 1)
            },
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

    // Call-backs: on a halt every unstarted drone of this rollout; otherwise the ones yielded to
    // a newer rollout and the ones of an earlier target that are not dispatched again now.
    let halted = tripped.is_some();
    let cancel: Vec<String> = drones
        .iter()
        .filter(|d| unstarted(d) && (halted || d.superseded_by.is_some() || d.stale))
        .filter(|d| !dispatch.contains(&d.name))
        .map(|d| d.name.clone())
        .collect();

    let newer: BTreeSet<&str> = drones.iter().filter_map(|d| d.superseded_by.as_deref()).collect();
    if !newer.is_empty() {
        let yielded = drones.iter().filter(|d| d.superseded_by.is_some()).count();
        let names = newer.iter().copied().collect::<Vec<_>>().join(", ");
        let message = format!(
            "{yielded} of {} selected drones belong to newer rollout(s) {names}; this rollout yields them",
            drones.len()
        );
        if !is_true(&prev_conditions, condition::SUPERSEDED) {
            events.push(("Superseded".to_owned(), message.clone()));
        }
        conditions.push(cond(
            condition::SUPERSEDED,
            true,
            "NewerRollout",
            message,
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
        retry,
        status,
        events,
        outcomes,
        wake_at,
    }
}

#[cfg(test)]
mod tests;
