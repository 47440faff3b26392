//! What each policy did to a node, kept in one Node annotation so that a restarted operator
//! (or a new leader) knows exactly what is its own to continue or undo.

use std::collections::BTreeMap;

use crds::policy::{Action, TaintEffect};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The Node annotation holding the [`Ledger`] as JSON.
pub const LEDGER_ANNOTATION: &str = "crashwatch.dev/remediations";

/// Every policy's record on one node, by policy name.
pub type Ledger = BTreeMap<String, Record>;

/// Reads a node's ledger from its annotation value. A value that is not a ledger (edited by
/// hand, say) reads as an empty ledger, with the error, so that it is reported, not trusted.
pub fn read_ledger(annotation: Option<&str>) -> (Ledger, Option<serde_json::Error>) {
    match annotation.map(serde_json::from_str::<Ledger>) {
        None => (Ledger::new(), None),
        Some(Ok(ledger)) => (ledger, None),
        Some(Err(error)) => (Ledger::new(), Some(error)),
    }
}

/// What one policy did to one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The action taken.
    pub action: Action,
    /// When it was taken.
    pub at: Timestamp,
    /// Whether this policy made the node unschedulable (false when it already was).
    #[serde(default)]
    pub cordoned: bool,
    /// The taint this policy added, if it added one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taint: Option<AddedTaint>,
    /// How the drain stands, for `Drain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainPhase>,
    /// The reboot the escalation ordered, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootStep>,
    /// When and why the remediation ended. Occurrences up to then never count again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Release>,
}

/// The reboot rung of the ladder on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebootStep {
    /// When the reboot was ordered.
    pub ordered_at: Timestamp,
    /// The node's boot id then.
    pub boot_id: String,
    /// Where it stands.
    pub phase: RebootPhase,
    /// The boot id the node came back with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_boot_id: Option<String>,
    /// When the step ended (new boot id seen, timed out or cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<Timestamp>,
    /// From the order to the new boot id, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

/// Where a reboot stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RebootPhase {
    /// Ordered; the node has not come back with a new boot id.
    Ordered,
    /// The node came back with a new boot id: success.
    Rebooted,
    /// The node did not come back in time.
    TimedOut,
    /// Withdrawn before it happened: the hang cleared, the policy was paused or put in dry
    /// run, or a human uncordoned the node.
    Cancelled,
}

impl Record {
    /// Whether the remediation is still in force.
    pub fn is_active(&self) -> bool {
        self.released.is_none()
    }

    /// Occurrences at or before this time are already answered by this record.
    pub fn acknowledged_until(&self) -> Timestamp {
        self.released.as_ref().map_or(self.at, |r| r.at)
    }
}

/// A taint as the operator added it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddedTaint {
    /// The taint key.
    pub key: String,
    /// The taint value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The taint effect.
    pub effect: TaintEffect,
}

/// Where a drain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrainPhase {
    /// Pods are being evicted.
    Draining,
    /// Every evictable pod is gone.
    Drained,
    /// The drain ran out of time; the operator stopped evicting.
    TimedOut,
}

/// How a remediation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Release {
    /// When the operator noticed or made the end.
    pub at: Timestamp,
    /// Who ended it.
    pub by: ReleasedBy,
}

/// Who ended a remediation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleasedBy {
    /// The operator, after `recovery.uncordonAfter` of quiet.
    Recovery,
    /// Someone else uncordoned the node or removed the taint.
    Human,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_survives_its_annotation() {
        let at: Timestamp = "2026-11-24T10:00:00Z".parse().unwrap();
        let ledger = Ledger::from([(
            "qemu-nbd-hangs".to_owned(),
            Record {
                action: Action::Drain,
                at,
                cordoned: true,
                taint: None,
                drain: Some(DrainPhase::Draining),
                reboot: None,
                released: None,
            },
        )]);
        let text = serde_json::to_string(&ledger).unwrap();
        assert_eq!(read_ledger(Some(&text)).0, ledger);
        assert!(text.contains(r#""at":"2026-11-24T10:00:00Z""#), "{text}");
    }

    #[test]
    fn a_hand_edited_annotation_is_an_error_not_a_ledger() {
        let (ledger, error) = read_ledger(Some("cordoned by bob"));
        assert!(ledger.is_empty());
        assert!(error.is_some());
        assert_eq!(read_ledger(None).0, Ledger::new());
    }
}
