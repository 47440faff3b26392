//! The operator against a real kube-apiserver and etcd (started by `scripts/test.sh`):
//! thresholds, drains with disruption budgets, the budget rail, dry run, pause, human
//! uncordon, recovery and leader election, on Nodes, Pods and CrashReports that are API
//! objects.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use operator::policy::ledger::{Ledger, ReleasedBy};
use operator::remediate::node::{CONDITION_TYPE, view};
use serde_json::{Value, json};
use support::{Fixture, Operator, eventually};

const SOON: Duration = Duration::from_secs(20);

fn ledger(node: &Node) -> Ledger {
    view(node).ledger
}

/// The node's `CrashwatchRemediation` condition as (status, reason).
fn condition(node: &Node) -> Option<(String, String)> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_TYPE)
        .map(|c| (c.status.clone(), c.reason.clone().unwrap_or_default()))
}

/// The status entries as (node, state, reason).
fn entries(status: &Value) -> Vec<(String, String, String)> {
    status["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| {
                    let text = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
                    (text("name"), text("state"), text("reason"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the policy's status describes generation `generation` or later.
async fn reconciled(fixture: &Fixture, policy: &str) -> Value {
    eventually("the policy to be reconciled", SOON, || async {
        let status = fixture.status(policy).await;
        status["observedGeneration"].is_i64().then_some(status)
    })
    .await
}

#[tokio::test]
async fn the_second_hang_of_qemu_nbd_cordons_and_a_restart_changes_nothing() {
    let Some(fixture) = Fixture::begin("threshold").await else {
        return;
    };
    let nodes = fixture.nodes(1).await;
    let node = &nodes[0];
    fixture.report(node, "qemu-nbd", "HungTask", &[30]).await;
    fixture
        .report(node, "dd", "HungTask", &[50, 40, 30, 20])
        .await;
    fixture
        .report(node, "qemu-nbd", "Segfault", &[45, 35, 25])
        .await;
    let policy = fixture.policy("hangs", json!({})).await;
    let mut operator = Operator::leading(&fixture, &[]).await;

    let status = reconciled(&fixture, &policy).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        fixture.cordoned().await.is_empty(),
        "one qemu-nbd hang, other processes' and kinds' reports: nothing"
    );
    assert_eq!(entries(&status), []);

    let second = Instant::now();
    fixture.report(node, "qemu-nbd", "HungTask", &[30, 1]).await;
    eventually("the cordon", SOON, || async {
        (fixture.cordoned().await == nodes).then_some(())
    })
    .await;
    eprintln!("second report to cordon: {:?}", second.elapsed());

    let cordoned = fixture.node(node).await;
    let record = &ledger(&cordoned)[&policy];
    assert!(record.cordoned && record.is_active(), "{record:?}");
    assert_eq!(
        condition(&cordoned),
        Some(("True".into(), "Cordoned".into()))
    );
    let status = eventually("status Cordoned", SOON, || async {
        let status = fixture.status(&policy).await;
        (!entries(&status).is_empty()).then_some(status)
    })
    .await;
    assert_eq!(
        entries(&status),
        [(node.clone(), "Cordoned".into(), String::new())]
    );
    assert_eq!(status["nodes"][0]["occurrences"], 2);
    let events = fixture.events(node).await;
    assert!(
        events
            .iter()
            .any(|(reason, note)| reason == "Cordoned" && note.contains(&policy)),
        "{events:?}"
    );
    assert_eq!(
        operator.metric_with(
            "crashwatch_remediations_total",
            &[("action", "Cordon"), ("result", "success")]
        ),
        1.0
    );
    assert_eq!(operator.metric("crashwatch_nodes_remediated"), 1.0);

    // A new operator (as after a crash or a handover) reads back what was done.
    operator.terminate();
    let before = cordoned.metadata.resource_version.clone();
    let status_before = fixture.status(&policy).await;
    let events_before = fixture.events(node).await.len();
    let restarted = Operator::leading(&fixture, &[]).await;
    eventually("a reconcile after the restart", SOON, || async {
        (restarted.metric("crashwatch_reconcile_seconds_count") >= 1.0).then_some(())
    })
    .await;
    fixture
        .report(node, "qemu-nbd", "HungTask", &[30, 1, 0])
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fixture.node(node).await.metadata.resource_version,
        before,
        "the Node was not written again"
    );
    assert_eq!(restarted.metric("crashwatch_remediations_total"), 0.0);
    assert_eq!(fixture.events(node).await.len(), events_before);
    let status_after = fixture.status(&policy).await;
    assert_eq!(
        status_after["nodes"][0]["since"],
        status_before["nodes"][0]["since"]
    );
}
