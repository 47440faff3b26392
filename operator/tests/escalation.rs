//! The reboot rung of the ladder against a real kube-apiserver and etcd: the operator reads
//! the agent's `ProcessHung` condition and boot id from the Node (written here as the agent
//! writes them, by server-side apply with its field manager), and writes the order and the
//! ledger. The fault VM test (`node-agent/tests/fault_vm.rs`) runs the same path with the
//! real agent and a real reboot.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use operator::policy::ledger::RebootPhase;
use operator::remediate::node::ledger_of;
use serde_json::{Value, json};
use support::{Fixture, Operator, eventually};

const SOON: Duration = Duration::from_secs(30);

/// Writes the agent's part of `node`: its boot id and its `ProcessHung` condition.
async fn agent_says(fixture: &Fixture, node: &str, boot_id: &str, hung: bool) {
    let (status, reason) = if hung {
        ("True", "QemuNbdHung")
    } else {
        ("False", "NoProcessHung")
    };
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let object = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node, "annotations": {"crashwatch.dev/boot-id": boot_id}},
        "status": {"conditions": [{
            "type": "ProcessHung", "status": status, "reason": reason, "message": "m",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }]},
    });
    Api::<Node>::all(fixture.client.clone())
        .patch_status(
            node,
            &PatchParams::apply("crashwatch-agent-conditions").force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap();
}

/// A pod on `node` that no kubelet will ever finish evicting (a grace period, and no
/// kubelet): the drain times out, as it does on a node whose pods sit in D.
async fn stuck_pod(fixture: &Fixture, namespace: &str, node: &str) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("stuck-{node}"), "namespace": namespace, "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "app", "uid": "rs-uid",
            "controller": true,
        }]},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 30,
            "containers": [{"name": "main", "image": "registry.invalid/app:1"}],
        },
    }))
    .unwrap();
    Api::<Pod>::namespaced(fixture.client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
}

fn entry(status: &Value, node: &str) -> (String, String) {
    status["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == node)
        .map(|n| {
            (
                n["state"].as_str().unwrap_or_default().to_owned(),
                n["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .unwrap_or_default()
}

async fn wait_entry(fixture: &Fixture, policy: &str, node: &str, state: &str, reason: &str) {
    let what = format!("{node} {state} {reason}");
    eventually(&what, SOON, || async {
        let status = fixture.status(policy).await;
        let (s, r) = entry(&status, node);
        (s == state && r.starts_with(reason)).then_some(())
    })
    .await;
}

async fn order_on(fixture: &Fixture, node: &str) -> Option<String> {
    fixture
        .node(node)
        .await
        .metadata
        .annotations
        .and_then(|a| a.get("crashwatch.dev/reboot-order").cloned())
}

#[tokio::test]
async fn the_reboot_rung_waits_for_the_hang_dry_run_pause_and_budget_and_closes_on_a_new_boot_id() {
    let Some(fixture) = Fixture::begin("escalation").await else {
        return;
    };
    let nodes = fixture.nodes(2).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let namespace = fixture.id.clone();
    Api::<Namespace>::all(fixture.client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .unwrap();
    for node in [a, b] {
        agent_says(&fixture, node, &format!("{node}-boot-1"), false).await;
        stuck_pod(&fixture, &namespace, node).await;
        fixture
            .report(node, "qemu-nbd", "HungTask", &[60, 30])
            .await;
    }
    let policy = fixture
        .policy(
            "reboot",
            json!({
                "action": "Drain",
                "drain": {"timeout": "2s"},
                "safety": {"maxUnavailable": 1},
                "escalation": {"reboot": {"timeout": "5m"}},
            }),
        )
        .await;
    let operator = Operator::leading(&fixture, &[]).await;

    // The drain of the first node times out; its hang is not (yet) present: no reboot. The
    // budget holds the second node back.
    let first = eventually("one node drained out", SOON, || async {
        let status = fixture.status(&policy).await;
        [a, b]
            .into_iter()
            .find(|n| entry(&status, n).1.starts_with("timeout:"))
            .cloned()
    })
    .await;
    let second = if &first == a { b } else { a };
    wait_entry(&fixture, &policy, second, "Blocked", "budget:").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(order_on(&fixture, &first).await, None, "no hang, no reboot");

    // Dry run: the hang is there; it says it would reboot, and orders nothing.
    fixture
        .edit_policy(&policy, json!({"safety": {"dryRun": true}}))
        .await;
    agent_says(&fixture, &first, &format!("{first}-boot-1"), true).await;
    wait_entry(&fixture, &policy, &first, "WouldAct", "would reboot:").await;
    assert_eq!(order_on(&fixture, &first).await, None);
    let hung_after_drain =
        operator.metric_with("crashwatch_nodes_hung_after_drain", &[("policy", &policy)]);
    assert_eq!(hung_after_drain, 1.0);

    // Paused: held back, nothing ordered.
    fixture
        .edit_policy(
            &policy,
            json!({"safety": {"dryRun": false, "paused": true}}),
        )
        .await;
    wait_entry(&fixture, &policy, &first, "Blocked", "paused").await;
    assert_eq!(order_on(&fixture, &first).await, None);

    // Live: the order, for the node's current boot; the budget still holds the second node.
    fixture
        .edit_policy(&policy, json!({"safety": {"paused": false}}))
        .await;
    let order = eventually("the reboot order", SOON, || order_on(&fixture, &first)).await;
    let order: Value = serde_json::from_str(&order).unwrap();
    assert_eq!(order["policy"], policy.as_str());
    assert_eq!(order["bootId"], format!("{first}-boot-1"));
    wait_entry(&fixture, &policy, &first, "Rebooting", "").await;
    let status = fixture.status(&policy).await;
    assert!(entry(&status, second).1.starts_with("budget:"), "{status}");
    assert_eq!(order_on(&fixture, second).await, None);

    // The node comes back with a new boot id and no hang: the step closes with success.
    agent_says(&fixture, &first, &format!("{first}-boot-2"), false).await;
    wait_entry(&fixture, &policy, &first, "Rebooted", "").await;
    let ledger = ledger_of(&fixture.node(&first).await).0;
    let step = ledger[&policy].reboot.clone().unwrap();
    assert_eq!(step.phase, RebootPhase::Rebooted);
    assert_eq!(step.boot_id, format!("{first}-boot-1"));
    assert_eq!(step.new_boot_id, Some(format!("{first}-boot-2")));
    assert!(step.seconds.is_some_and(|s| s >= 0.0));
    assert_eq!(
        order_on(&fixture, &first).await,
        None,
        "the order is withdrawn"
    );
    let events = fixture.events(&first).await;
    for reason in ["DrainTimedOut", "RebootOrdered", "Rebooted"] {
        assert!(
            events.iter().any(|(r, _)| r == reason),
            "{reason}: {events:?}"
        );
    }
    assert_eq!(
        operator.metric_with(
            "crashwatch_remediations_total",
            &[("action", "Reboot"), ("result", "success")]
        ),
        1.0
    );
    assert_eq!(operator.metric("crashwatch_reboot_seconds_count"), 1.0);
}
