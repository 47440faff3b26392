//! The policy's status from one reconcile to the next: when each node's state began, and
//! which entries are news worth an Event. Read back from the stored status, so a restarted
//! operator neither resets times nor repeats Events.

use crds::policy::{NodeRemediation, RemediationState};
use jiff::Timestamp;

use super::plan::BlockReason;

/// What identifies a state for people: the state, and for `Blocked` the reason's label.
fn phase(entry: &NodeRemediation) -> (RemediationState, Option<BlockReason>) {
    let reason = entry.reason.as_deref().and_then(BlockReason::of_status);
    (entry.state, reason)
}

fn previous_of<'a>(previous: &'a [NodeRemediation], name: &str) -> Option<&'a NodeRemediation> {
    previous.iter().find(|p| p.name == name)
}

/// Sets `since` on every current entry: kept from the previous status while the node's
/// state is the same, `now` when it changed.
pub fn carry_since(previous: &[NodeRemediation], current: &mut [NodeRemediation], now: Timestamp) {
    for entry in current {
        entry.since = match previous_of(previous, &entry.name) {
            Some(before) if phase(before) == phase(entry) && before.since.is_some() => {
                before.since.clone()
            }
            _ => Some(now.to_string()),
        };
    }
}

/// The entries that newly became `Blocked` (or blocked for another reason) or `WouldAct`:
/// each deserves one Event, and a blocked one one count in the metrics.
pub fn news<'a>(
    previous: &[NodeRemediation],
    current: &'a [NodeRemediation],
) -> Vec<&'a NodeRemediation> {
    current
        .iter()
        .filter(|entry| {
            matches!(
                entry.state,
                RemediationState::Blocked | RemediationState::WouldAct
            )
        })
        .filter(|entry| previous_of(previous, &entry.name).is_none_or(|p| phase(p) != phase(entry)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        name: &str,
        state: RemediationState,
        reason: Option<&str>,
        since: Option<&str>,
    ) -> NodeRemediation {
        NodeRemediation {
            name: name.into(),
            state,
            reason: reason.map(Into::into),
            occurrences: 2,
            since: since.map(Into::into),
        }
    }

    #[test]
    fn since_survives_while_the_state_holds_and_moves_when_it_changes() {
        let then = "2026-11-24T10:00:00Z";
        let now: Timestamp = "2026-11-24T11:00:00Z".parse().unwrap();
        let previous = [
            entry(
                "a",
                RemediationState::Blocked,
                Some("budget: 2 of 10"),
                Some(then),
            ),
            entry(
                "b",
                RemediationState::Blocked,
                Some("budget: 2 of 10"),
                Some(then),
            ),
        ];
        let mut current = [
            entry("a", RemediationState::Blocked, Some("budget: 2 of 9"), None),
            entry(
                "b",
                RemediationState::Blocked,
                Some("cooldown: until noon"),
                None,
            ),
            entry("c", RemediationState::Cordoned, None, None),
        ];
        carry_since(&previous, &mut current, now);
        assert_eq!(current[0].since.as_deref(), Some(then));
        assert_eq!(current[1].since.as_deref(), Some("2026-11-24T11:00:00Z"));
        assert_eq!(current[2].since.as_deref(), Some("2026-11-24T11:00:00Z"));

        let news: Vec<&str> = news(&previous, &current)
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            news,
            ["b"],
            "a is still blocked by the budget; c is no block"
        );
    }
}
