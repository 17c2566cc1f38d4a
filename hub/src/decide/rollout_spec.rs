//! Checking a `FirmwareRollout` spec the way the API server's schema would, so the local store
//! refuses what `kubectl apply` refuses, and the controller never plans a spec it cannot read.

use crate::api::rollout::{FLIGHT_STATES, FirmwareRolloutSpec, RULE_KINDS, duration_secs};

/// Checks a spec the way the CRD's schema does on a cluster (ranges, enums, patterns, the rules
/// between fields), so the local store refuses what `kubectl apply` refuses. Names the field.
pub fn validate(spec: &FirmwareRolloutSpec) -> Result<(), String> {
    if spec.version.trim().is_empty() {
        return Err("spec.version is empty".into());
    }
    if !(spec.url.starts_with("http://") || spec.url.starts_with("https://")) {
        return Err(format!("spec.url {:?} is not an http(s) URL", spec.url));
    }
    for (i, w) in spec.waves.iter().enumerate() {
        if w.count.is_some() == w.percent.is_some() {
            return Err(format!("spec.waves[{i}]: give exactly one of count or percent"));
        }
        if w.count == Some(0) {
            return Err(format!("spec.waves[{i}].count must be at least 1"));
        }
        if w.percent.is_some_and(|p| !(1..=100).contains(&p)) {
            return Err(format!("spec.waves[{i}].percent must be 1 to 100"));
        }
        if w.soak.is_some() && duration_secs(w.soak.as_deref()).is_none() {
            return Err(format!(
                "spec.waves[{i}].soak {:?} is not a duration like 10m or 1h30m",
                w.soak.as_deref().unwrap_or_default()
            ));
        }
        if let Some(f) = &w.flight_soak {
            if f.flights == 0 {
                return Err(format!("spec.waves[{i}].flightSoak.flights must be at least 1"));
            }
            if !(1..=100).contains(&f.percent) {
                return Err(format!("spec.waves[{i}].flightSoak.percent must be 1 to 100"));
            }
            if f.flight_time.is_some() && duration_secs(f.flight_time.as_deref()).is_none() {
                return Err(format!(
                    "spec.waves[{i}].flightSoak.flightTime {:?} is not a duration like 10m or 1h30m",
                    f.flight_time.as_deref().unwrap_or_default()
                ));
            }
        }
    }
    if spec.progress_deadline.is_some() && duration_secs(spec.progress_deadline.as_deref()).is_none() {
        return Err(format!(
            "spec.progressDeadline {:?} is not a duration like 1h or 30m",
            spec.progress_deadline.as_deref().unwrap_or_default()
        ));
    }
    if spec.drone_timeout.is_some() && duration_secs(spec.drone_timeout.as_deref()).is_none() {
        return Err(format!(
            "spec.droneTimeout {:?} is not a duration like 30m or 1h30m",
            spec.drone_timeout.as_deref().unwrap_or_default()
        ));
    }
    for (i, w) in spec.maintenance_windows.iter().enumerate() {
        crate::decide::window::Window::new(w).map_err(|e| format!("spec.maintenanceWindows[{i}].{e}"))?;
    }
    if spec.dispatch_rate.maximum_per_minute == 0 {
        return Err("spec.dispatchRate.maximumPerMinute must be at least 1".into());
    }
    if let Some(e) = &spec.dispatch_rate.exponential_rate {
        if e.base_rate_per_minute == 0 {
            return Err("spec.dispatchRate.exponentialRate.baseRatePerMinute must be at least 1".into());
        }
        if !(1.1..=5.0).contains(&e.increment_factor) {
            return Err("spec.dispatchRate.exponentialRate.incrementFactor must be 1.1 to 5".into());
        }
        if e.rate_increase_criteria.number_of_succeeded_drones == 0 {
            return Err(
                "spec.dispatchRate.exponentialRate.rateIncreaseCriteria.numberOfSucceededDrones must be at least 1".into(),
            );
        }
    }
    if spec.max_concurrent == Some(0) {
        return Err("spec.maxConcurrent must be at least 1 (leave it out for no limit)".into());
    }
    if spec.gates.min_battery_percent.is_some_and(|p| p > 100) {
        return Err("spec.gates.minBatteryPercent must be 0 to 100".into());
    }
    if let Some(s) = spec
        .gates
        .flight_states
        .iter()
        .find(|s| !FLIGHT_STATES.contains(&s.as_str()))
    {
        return Err(format!(
            "spec.gates.flightStates: {s:?} is not one of {}",
            FLIGHT_STATES.join(", ")
        ));
    }
    for (i, r) in spec.failure_policy.rules.iter().enumerate() {
        if !RULE_KINDS.contains(&r.kind.as_str()) {
            return Err(format!(
                "spec.failurePolicy.rules[{i}].kind {:?}: one of {}",
                r.kind,
                RULE_KINDS.join(", ")
            ));
        }
        if r.threshold_percent.is_none() && r.max_count.is_none() {
            return Err(format!(
                "spec.failurePolicy.rules[{i}]: give thresholdPercent, maxCount or both"
            ));
        }
        if r.threshold_percent.is_some_and(|p| !(1..=100).contains(&p)) {
            return Err(format!(
                "spec.failurePolicy.rules[{i}].thresholdPercent must be 1 to 100"
            ));
        }
        if r.max_count == Some(0) {
            return Err(format!(
                "spec.failurePolicy.rules[{i}].maxCount must be at least 1"
            ));
        }
    }
    Ok(())
}
