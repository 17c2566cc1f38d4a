//! The operator verbs on a rollout (`pause`, `resume`, `abort`, `promote`, `retry`), one code
//! path for `flightnode-hub rollout VERB` / `kubectl flightnode rollout VERB` and the fleet
//! page's buttons (`POST /ui/api/rollouts/{namespace}/{name}/{verb}`), so both write the same
//! request, name the same user in the rollout's history and are refused the same way.
//!
//! `pause` and `resume` of a paused rollout are spec writes ([`super::rollout::set_paused`]);
//! `abort`, `promote`, `retry` and `resume` of a halt are requests in the rollout's
//! `edge.drone.io/request` annotation that the controller carries out or refuses
//! ([`super::rollout::request`]).

use super::rollout::{Requested, halted_or_complete, request, set_paused};
use crate::api::rollout::FirmwareRollout;
use crate::{Error, Result};
use kube::{Api, Client};
use std::time::Duration;

/// One operator verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Set `spec.paused`.
    Pause,
    /// Clear `spec.paused`, or lift a halt (breaker or abort).
    Resume,
    /// Call back the drones that have not started.
    Abort,
    /// End the current wave's soak now.
    Promote,
    /// A new attempt for the drones that failed.
    Retry,
}

impl Verb {
    /// Every verb, in the order the page shows its buttons.
    pub const ALL: [Verb; 5] = [Verb::Pause, Verb::Resume, Verb::Abort, Verb::Promote, Verb::Retry];

    /// The verb's name on the command line and in the URL.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Abort => "abort",
            Verb::Promote => "promote",
            Verb::Retry => "retry",
        }
    }

    /// The verb named `name`, if any.
    pub fn parse(name: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.name() == name)
    }

    /// The past tense kubectl prints after the object (`firmwarerollout…/fleet paused`).
    pub fn done(self) -> &'static str {
        match self {
            Verb::Pause => "paused",
            Verb::Resume => "resumed",
            Verb::Abort => "aborted",
            Verb::Promote => "promoted",
            Verb::Retry => "retried",
        }
    }
}

/// How a verb ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `spec.paused` was changed.
    Changed,
    /// `spec.paused` already had the value asked for: nothing written.
    Already,
    /// The controller carried the request out: the history's message.
    Done(String),
    /// Refused, by this check or by the controller: the whole sentence, naming the rollout.
    Refused(String),
    /// Written, but no controller carried it out within the wait.
    Pending,
}

impl Outcome {
    /// The line kubectl-style tools print for it (`firmwarerollout.edge.drone.io/NAME paused`).
    pub fn line(&self, name: &str, verb: Verb, wait: Duration) -> String {
        let object = format!("firmwarerollout.edge.drone.io/{name}");
        match self {
            Outcome::Changed => format!("{object} {}", verb.done()),
            Outcome::Already => format!("{object} was already {}", verb.done()),
            Outcome::Done(message) => format!("{object} {}: {message}", verb.done()),
            Outcome::Refused(why) => why.clone(),
            Outcome::Pending => format!(
                "{object} {} requested; no controller carried it out within {}s (is a hub with \
                 --controllers running?)",
                verb.name(),
                wait.as_secs()
            ),
        }
    }
}

/// Runs `verb` on rollout `name` in `namespace` for user `by` (named in the rollout's history),
/// waiting up to `wait` for the controller to carry out a request. The caller has checked that
/// `by` may do it: the write goes out with `client`'s own credentials.
pub async fn act(
    client: &Client,
    namespace: &str,
    name: &str,
    verb: Verb,
    by: &str,
    wait: Duration,
) -> Result<Outcome> {
    let api: Api<FirmwareRollout> = Api::namespaced(client.clone(), namespace);
    let r = api
        .get_opt(name)
        .await
        .map_err(|e| Error::Invalid(format!("read rollout {name} in namespace {namespace}: {e}")))?
        .ok_or_else(|| Error::NotFound(format!("rollout {name} in namespace {namespace}")))?;
    let (halted, complete) = halted_or_complete(&r);
    let action = match verb {
        Verb::Pause => return paused(client, namespace, name, true, by).await,
        // A halt (breaker or abort) is lifted by a request, a pause by clearing spec.paused.
        Verb::Resume if !halted => return paused(client, namespace, name, false, by).await,
        Verb::Abort if complete => {
            return Ok(Outcome::Refused(format!(
                "rollout {name} is complete: nothing to abort"
            )));
        }
        other => other.name(),
    };
    Ok(
        match request(client, namespace, name, action, by, verb == Verb::Resume, wait).await? {
            Requested::Done(message) => Outcome::Done(message),
            Requested::Refused(why) => Outcome::Refused(format!("rollout {name}: {why}")),
            Requested::Pending => Outcome::Pending,
        },
    )
}

async fn paused(client: &Client, namespace: &str, name: &str, to: bool, by: &str) -> Result<Outcome> {
    Ok(if set_paused(client, namespace, name, to, by).await? {
        Outcome::Changed
    } else {
        Outcome::Already
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_round_trip_through_their_names() {
        for v in Verb::ALL {
            assert_eq!(Verb::parse(v.name()), Some(v));
        }
        assert_eq!(Verb::parse("delete"), None);
    }

    #[test]
    fn lines_read_like_kubectl() {
        let wait = Duration::from_secs(30);
        assert_eq!(
            Outcome::Already.line("fleet", Verb::Pause, wait),
            "firmwarerollout.edge.drone.io/fleet was already paused"
        );
        assert_eq!(
            Outcome::Done("wave 2 started".into()).line("fleet", Verb::Promote, wait),
            "firmwarerollout.edge.drone.io/fleet promoted: wave 2 started"
        );
    }
}
