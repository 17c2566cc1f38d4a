//! The policy of `[flight]`: may a step that touches the vehicle run now, and if not, why.

use super::{FlightState, Monitor};
use crate::config::{AllowedState, FlightConfig, UnknownPolicy};
use flightnode_proto::{ObservedState, WaitReason};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// What the gate says about running a step now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Safe: run the step.
    Go,
    /// Not now, for this reason; the sentence says what was seen.
    Wait(WaitReason, String),
    /// The MAVLink link has just opened and no HEARTBEAT could have arrived yet: ask again shortly
    /// (not worth persisting a wait for).
    Settling,
}

/// The flight gate of one agent: the `[flight]` policy, the MAVLink link (opened on first use)
/// and the gate command.
pub struct Gate {
    cfg: FlightConfig,
    monitor: OnceLock<Option<Monitor>>,
}

impl Gate {
    /// A gate for `cfg`; nothing is opened yet.
    pub fn new(cfg: FlightConfig) -> Self {
        Self {
            cfg,
            monitor: OnceLock::new(),
        }
    }

    /// The policy.
    pub fn config(&self) -> &FlightConfig {
        &self.cfg
    }

    /// The MAVLink link, opened on the first call (`None` without `flight.mavlink`).
    pub fn monitor(&self) -> Option<&Monitor> {
        self.monitor
            .get_or_init(|| {
                let address = self.cfg.mavlink.as_deref()?;
                Monitor::start(address, &self.cfg)
                    .map_err(|e| tracing::error!(mavlink = %address, "cannot start the MAVLink reader: {e}"))
                    .ok()
            })
            .as_ref()
    }

    /// How often a waiting upgrade asks again.
    pub fn poll_interval(&self) -> Duration {
        if self.cfg.gate_command.is_some() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(200)
        }
    }

    /// Asks the link and the gate command whether a step may run now.
    pub fn check(&self) -> Verdict {
        if self.cfg.mavlink.is_some() {
            match self.monitor() {
                Some(m) => {
                    let state = m.state();
                    if state.observed == ObservedState::Unknown && m.settling() {
                        return Verdict::Settling;
                    }
                    if let Err((reason, why)) = judge(&self.cfg, &state) {
                        return Verdict::Wait(reason, why);
                    }
                }
                None if self.cfg.unknown == UnknownPolicy::Wait => {
                    return Verdict::Wait(
                        WaitReason::FlightStateUnknown,
                        "the MAVLink reader could not be started".into(),
                    );
                }
                None => {}
            }
        }
        if let Some(command) = &self.cfg.gate_command
            && let Err((reason, why)) = run_command(command, self.cfg.gate_command_timeout)
        {
            return Verdict::Wait(reason, why);
        }
        Verdict::Go
    }
}

/// Judges a flight state against the policy: `Ok` = go.
pub fn judge(cfg: &FlightConfig, s: &FlightState) -> Result<(), (WaitReason, String)> {
    let allowed = |a: AllowedState| cfg.allowed_states.contains(&a);
    match s.observed {
        ObservedState::Unknown if cfg.unknown == UnknownPolicy::Wait => {
            return Err((
                WaitReason::FlightStateUnknown,
                format!(
                    "no HEARTBEAT from the flight controller within {}",
                    humantime::format_duration(cfg.stale_after)
                ),
            ));
        }
        ObservedState::InAir if !allowed(AllowedState::InAir) => {
            let why = match s.landed_state.as_deref() {
                Some(landed) if !s.armed_landed_state_unknown() => {
                    format!("the vehicle is in the air (landed_state {landed})")
                }
                landed => format!(
                    "the vehicle is armed and its landed state is {} (EXTENDED_SYS_STATE within {}): \
                     it may be flying",
                    landed.unwrap_or("not reported"),
                    humantime::format_duration(cfg.stale_after)
                ),
            };
            return Err((WaitReason::InAir, why));
        }
        ObservedState::Armed if !allowed(AllowedState::Armed) => {
            return Err((WaitReason::Armed, "the vehicle is armed".into()));
        }
        // Allowed by the policy, or nothing to hold for.
        ObservedState::Unknown | ObservedState::Disarmed | ObservedState::InAir | ObservedState::Armed => {}
    }
    match s.battery_percent {
        None if s.battery_expired && cfg.min_battery_percent > 0 && cfg.unknown == UnknownPolicy::Wait => {
            Err((
                WaitReason::FlightStateUnknown,
                format!(
                    "no battery level from the vehicle within {} (flight.min_battery_percent {})",
                    humantime::format_duration(cfg.stale_after),
                    cfg.min_battery_percent
                ),
            ))
        }
        Some(pct) if cfg.min_battery_percent > 0 && pct < cfg.min_battery_percent => Err((
            WaitReason::BatteryLow,
            format!(
                "battery at {pct} %, below flight.min_battery_percent {}",
                cfg.min_battery_percent
            ),
        )),
        _ => Ok(()),
    }
}

/// Runs `flight.gate_command` through `sh -c`: exit 0 = safe. Otherwise the first word it prints
/// names the reason (`armed`, `in_air`, `battery_low`); anything else, a timeout or a failure to
/// start is `flight_state_unknown`.
fn run_command(command: &str, timeout: Duration) -> Result<(), (WaitReason, String)> {
    let unknown = |why: String| (WaitReason::FlightStateUnknown, why);
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let done = crate::child::run(&mut cmd, None, timeout).map_err(|e| match e {
        crate::child::ChildError::Timeout { .. } => unknown(format!(
            "gate command `{command}` did not answer within {timeout:?}"
        )),
        e => unknown(format!("gate command `{command}` {e}")),
    })?;
    if done.status.success() {
        return Ok(());
    }
    let out = String::from_utf8_lossy(&done.stdout[..done.stdout.len().min(4096)]).into_owned();
    let word = out.split_whitespace().next().unwrap_or("");
    // Only the flight gate's own reasons: the link and charging holds are not its to give.
    let reason = WaitReason::parse(word)
        .filter(|r| r.is_flight())
        .unwrap_or(WaitReason::FlightStateUnknown);
    Err((
        reason,
        format!(
            "gate command `{command}` says not now ({}): {}",
            done.status,
            out.trim()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FlightConfig {
        let text = "device_id = \"d\"\nhardware = \"h\"\ntrusted_keys = [\"k\"]\n[slots]\nbackend = \"file\"\na = \"a\"\nb = \"b\"\n[flight]\nmavlink = \"udpin:127.0.0.1:1\"\nmin_battery_percent = 30\n";
        crate::config::Config::parse(text, std::path::Path::new("x.toml"))
            .unwrap()
            .flight
            .unwrap()
    }

    fn state(observed: ObservedState, battery: Option<u8>) -> FlightState {
        FlightState {
            observed,
            battery_percent: battery,
            ..FlightState::default()
        }
    }

    #[test]
    fn default_policy_allows_only_disarmed_with_enough_battery() {
        let c = cfg();
        let reason = |s: FlightState| judge(&c, &s).err().map(|(r, _)| r);
        assert_eq!(reason(state(ObservedState::Disarmed, Some(80))), None);
        assert_eq!(reason(state(ObservedState::Disarmed, None)), None);
        let expired = FlightState {
            battery_expired: true,
            ..state(ObservedState::Disarmed, None)
        };
        assert_eq!(reason(expired), Some(WaitReason::FlightStateUnknown));
        assert_eq!(
            reason(state(ObservedState::Armed, Some(80))),
            Some(WaitReason::Armed)
        );
        assert_eq!(
            reason(state(ObservedState::InAir, Some(80))),
            Some(WaitReason::InAir)
        );
        assert_eq!(
            reason(state(ObservedState::Unknown, Some(80))),
            Some(WaitReason::FlightStateUnknown)
        );
        assert_eq!(
            reason(state(ObservedState::Disarmed, Some(29))),
            Some(WaitReason::BatteryLow)
        );
        let mut lax = c.clone();
        lax.unknown = UnknownPolicy::Allow;
        lax.allowed_states.push(AllowedState::Armed);
        assert!(judge(&lax, &state(ObservedState::Unknown, None)).is_ok());
        assert!(judge(&lax, &state(ObservedState::Armed, Some(90))).is_ok());
        assert!(judge(&lax, &state(ObservedState::InAir, Some(90))).is_err());
    }

    #[test]
    fn gate_command_exit_status_and_reason() {
        let t = Duration::from_secs(10);
        assert!(run_command("true", t).is_ok());
        assert_eq!(
            run_command("echo in_air; exit 1", t).unwrap_err().0,
            WaitReason::InAir
        );
        assert_eq!(
            run_command("echo who knows; exit 1", t).unwrap_err().0,
            WaitReason::FlightStateUnknown
        );
        assert_eq!(
            run_command("sleep 30", Duration::from_millis(200)).unwrap_err().0,
            WaitReason::FlightStateUnknown
        );
    }
}
