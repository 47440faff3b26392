//! Node writes: the ledger annotation, `spec.unschedulable` and taints in one patch guarded
//! by the resourceVersion the decision was made on, then the `CrashwatchRemediation`
//! condition.

use crds::policy::{Action, TaintEffect};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crds::node::{BOOT_ID_ANNOTATION, REBOOT_ORDER_ANNOTATION};

use crate::policy::ledger::{AddedTaint, LEDGER_ANNOTATION, Ledger};
use crate::policy::plan::{Change, ChangeKind, NodeView};

/// The node condition the operator maintains.
pub const CONDITION_TYPE: &str = "CrashwatchRemediation";

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "crashwatch-operator";

/// Patch parameters naming the operator as the field manager.
pub fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// The taint as the API writes it.
pub fn effect_name(effect: TaintEffect) -> &'static str {
    match effect {
        TaintEffect::NoSchedule => "NoSchedule",
        TaintEffect::PreferNoSchedule => "PreferNoSchedule",
        TaintEffect::NoExecute => "NoExecute",
    }
}

fn effect_of(name: &str) -> Option<TaintEffect> {
    serde_json::from_value(Value::String(name.to_owned())).ok()
}

/// What every policy did to a node, from its annotation. An annotation that is not a
/// ledger reads as empty (see [`view`], which reports it).
pub fn ledger_of(node: &Node) -> (Ledger, Option<serde_json::Error>) {
    let annotation = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LEDGER_ANNOTATION));
    crate::policy::ledger::read_ledger(annotation.map(String::as_str))
}

/// A Node as policies see it, with no reports yet (the controller adds the matching ones).
pub fn view(node: &Node) -> NodeView {
    let (ledger, error) = ledger_of(node);
    let name = node.metadata.name.clone().unwrap_or_default();
    if let Some(error) = error {
        tracing::warn!(node = %name, %error, "ignoring a {LEDGER_ANNOTATION} annotation that is not a ledger");
    }
    let spec = node.spec.as_ref();
    NodeView {
        unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
        not_ready: node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status != "True")),
        taints: spec
            .and_then(|s| s.taints.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|t| {
                Some(AddedTaint {
                    key: t.key.clone(),
                    value: t.value.clone(),
                    effect: effect_of(&t.effect)?,
                })
            })
            .collect(),
        ledger,
        reports: Vec::new(),
        boot_id: boot_id_of(node),
        true_conditions: node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .filter(|c| c.status == "True")
            .map(|c| c.type_.clone())
            .collect(),
        reboot_order: node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REBOOT_ORDER_ANNOTATION))
            .cloned(),
        name,
    }
}

/// The node's boot id: what its agent states (`crashwatch.dev/boot-id`), else the
/// kubelet's `status.nodeInfo.bootID`.
pub fn boot_id_of(node: &Node) -> Option<String> {
    let stated = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BOOT_ID_ANNOTATION))
        .filter(|b| !b.is_empty())
        .cloned();
    stated.or_else(|| {
        node.status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.boot_id.clone())
            .filter(|b| !b.is_empty())
    })
}

/// The merge patch for a change, against the node the decision was made on: it fails with
/// a conflict if the node changed since.
pub fn patch_for(node: &Node, change: &Change) -> Value {
    let mut patch = json!({
        "metadata": {
            "resourceVersion": node.metadata.resource_version,
            "annotations": { LEDGER_ANNOTATION: ledger_text(&change.ledger) },
        },
    });
    if let Some(unschedulable) = change.unschedulable {
        patch["spec"]["unschedulable"] = json!(unschedulable);
    }
    if let Some(order) = &change.reboot_order {
        patch["metadata"]["annotations"][REBOOT_ORDER_ANNOTATION] = json!(order);
    }
    if change.add_taint.is_some() || change.remove_taint.is_some() {
        let mut taints: Vec<Taint> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if let Some(gone) = &change.remove_taint {
            taints.retain(|t| !(t.key == gone.key && t.effect == effect_name(gone.effect)));
        }
        if let Some(added) = &change.add_taint {
            taints.push(Taint {
                key: added.key.clone(),
                value: added.value.clone(),
                effect: effect_name(added.effect).to_owned(),
                time_added: None,
            });
        }
        patch["spec"]["taints"] = json!(taints);
    }
    patch
}

/// A ledger as its annotation value.
pub fn ledger_text(ledger: &Ledger) -> String {
    serde_json::to_string(ledger).expect("a ledger serializes")
}

/// The condition's status and reason for a change.
pub fn condition_for(kind: ChangeKind) -> (&'static str, &'static str) {
    match kind {
        ChangeKind::Remediate(Action::Cordon) => ("True", "Cordoned"),
        ChangeKind::Remediate(Action::Taint) => ("True", "Tainted"),
        ChangeKind::Remediate(Action::Drain) => ("True", "Draining"),
        ChangeKind::DrainTimedOut => ("True", "DrainTimedOut"),
        ChangeKind::RebootOrdered => ("True", "RebootOrdered"),
        ChangeKind::Rebooted => ("True", "Rebooted"),
        ChangeKind::RebootTimedOut => ("True", "RebootTimedOut"),
        ChangeKind::RebootCancelled => ("True", "RebootCancelled"),
        ChangeKind::Release(crate::policy::ledger::ReleasedBy::Recovery) => ("False", "Recovered"),
        ChangeKind::Release(crate::policy::ledger::ReleasedBy::Human) => {
            ("False", "ReleasedByUser")
        }
    }
}

/// Writes a change to the node.
pub async fn apply(api: &Api<Node>, node: &Node, change: &Change) -> kube::Result<Node> {
    api.patch(
        &change.node,
        &params(),
        &Patch::Merge(patch_for(node, change)),
    )
    .await
}

/// Writes only the ledger (a drain's progress), guarded by the node's resourceVersion.
pub async fn write_ledger(api: &Api<Node>, node: &Node, ledger: &Ledger) -> kube::Result<Node> {
    let patch = json!({
        "metadata": {
            "resourceVersion": node.metadata.resource_version,
            "annotations": { LEDGER_ANNOTATION: ledger_text(ledger) },
        },
    });
    api.patch(
        node.metadata.name.as_deref().unwrap_or_default(),
        &params(),
        &Patch::Merge(patch),
    )
    .await
}

/// Sets the `CrashwatchRemediation` condition.
pub async fn set_condition(
    api: &Api<Node>,
    node: &str,
    (status, reason): (&str, &str),
    message: &str,
    now: Timestamp,
) -> kube::Result<Node> {
    let patch = json!({
        "status": { "conditions": [{
            "type": CONDITION_TYPE,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now.to_string(),
            "lastHeartbeatTime": now.to_string(),
        }]},
    });
    api.patch_status(node, &params(), &Patch::Strategic(patch))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ledger::Record;

    fn node(taints: Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "resourceVersion": "42"},
            "spec": {"taints": taints},
        }))
        .unwrap()
    }

    fn change(add: Option<AddedTaint>, remove: Option<AddedTaint>) -> Change {
        Change {
            node: "n1".into(),
            kind: ChangeKind::Remediate(Action::Taint),
            ledger: Ledger::from([(
                "p".to_owned(),
                Record {
                    action: Action::Taint,
                    at: "2026-11-24T10:00:00Z".parse().unwrap(),
                    cordoned: false,
                    taint: add.clone(),
                    drain: None,
                    reboot: None,
                    released: None,
                },
            )]),
            unschedulable: None,
            add_taint: add,
            remove_taint: remove,
            reboot_order: None,
        }
    }

    fn ours() -> AddedTaint {
        AddedTaint {
            key: "crashwatch.dev/unhealthy".into(),
            value: None,
            effect: TaintEffect::NoSchedule,
        }
    }

    #[test]
    fn a_patch_is_guarded_and_keeps_other_taints() {
        let other = json!([{"key": "gpu", "value": "a100", "effect": "NoSchedule"}]);
        let patch = patch_for(&node(other), &change(Some(ours()), None));
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        let taints = patch["spec"]["taints"].as_array().unwrap();
        assert_eq!(taints.len(), 2);
        assert_eq!(taints[0]["key"], "gpu");
        assert_eq!(taints[1]["key"], "crashwatch.dev/unhealthy");
        assert!(patch["spec"].get("unschedulable").is_none());
        let ledger: Ledger = serde_json::from_str(
            patch["metadata"]["annotations"][LEDGER_ANNOTATION]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(ledger, change(Some(ours()), None).ledger);
    }

    #[test]
    fn removing_a_taint_removes_only_that_key_and_effect() {
        let both = json!([
            {"key": "crashwatch.dev/unhealthy", "effect": "NoSchedule"},
            {"key": "crashwatch.dev/unhealthy", "effect": "NoExecute"},
        ]);
        let patch = patch_for(&node(both), &change(None, Some(ours())));
        let taints = patch["spec"]["taints"].as_array().unwrap();
        assert_eq!(taints.len(), 1);
        assert_eq!(taints[0]["effect"], "NoExecute");
    }

    #[test]
    fn a_view_reads_cordon_readiness_and_taints() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "spec": {"unschedulable": true, "taints": [{"key": "k", "effect": "NoExecute"}]},
            "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]},
        }))
        .unwrap();
        let view = view(&node);
        assert!(view.unschedulable && view.not_ready);
        assert_eq!(view.taints[0].effect, TaintEffect::NoExecute);
        let bare: Node = serde_json::from_value(json!({"metadata": {"name": "n2"}})).unwrap();
        let bare = super::view(&bare);
        assert!(
            !bare.unschedulable && !bare.not_ready,
            "no kubelet, no Ready condition: available"
        );
    }
}
