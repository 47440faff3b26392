//! The operator against a real kube-apiserver and etcd (started by `scripts/test.sh`):
//! thresholds, drains with disruption budgets, the budget rail, dry run, pause, human
//! uncordon, recovery and leader election, on Nodes, Pods and CrashReports that are API
//! objects.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use operator::policy::ledger::{Ledger, ReleasedBy};
use operator::remediate::node::{CONDITION_TYPE, ledger_of};
use serde_json::{Value, json};
use support::{Fixture, Operator, eventually};

const SOON: Duration = Duration::from_secs(20);

fn ledger(node: &Node) -> Ledger {
    ledger_of(node).0
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
    // The gauge counts every node in the cluster under a remediation (earlier tests' too).
    let all = Api::<Node>::all(fixture.client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let remediated = all
        .items
        .iter()
        .filter(|n| ledger(n).values().any(|r| r.is_active()))
        .count();
    assert_eq!(
        operator.metric("crashwatch_nodes_remediated"),
        remediated as f64
    );

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

/// Creates a pod bound to `node` in `namespace`, controlled by a ReplicaSet (which need
/// not exist); `extra` is merged over it.
async fn pod(fixture: &Fixture, namespace: &str, name: &str, node: &str, extra: Value) {
    let mut pod = json!({
        "metadata": {"name": name, "namespace": namespace, "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "app", "uid": "rs-uid",
            "controller": true,
        }]},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": "registry.invalid/app:1"}],
        },
    });
    support::merge(&mut pod, extra);
    let pods: Api<Pod> = Api::namespaced(fixture.client.clone(), namespace);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).unwrap(),
    )
    .await
    .unwrap();
}

/// Plays the kubelet: the pod runs and is ready, so disruption budgets count it.
async fn running(fixture: &Fixture, namespace: &str, name: &str) {
    let pods: Api<Pod> = Api::namespaced(fixture.client.clone(), namespace);
    let status = json!({"status": {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

/// Plays the disruption controller: the budget allows `allowed` disruptions, and no
/// disruption is in progress.
async fn budget_allows(fixture: &Fixture, namespace: &str, name: &str, allowed: i32) {
    let api: Api<PodDisruptionBudget> = Api::namespaced(fixture.client.clone(), namespace);
    let generation = api.get(name).await.unwrap().metadata.generation;
    let status = json!({"status": {
        "observedGeneration": generation,
        "disruptionsAllowed": allowed,
        "currentHealthy": 2,
        "desiredHealthy": 2 - allowed,
        "expectedPods": 2,
        "disruptedPods": null,
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

/// Two running pods `web-0` and `web-1` on `node`, and a PodDisruptionBudget `web` keeping
/// `min_available` of them (its status still to be written with [`budget_allows`]).
async fn web_pods_behind_a_budget(
    fixture: &Fixture,
    namespace: &str,
    node: &str,
    min_available: i32,
) {
    for web in ["web-0", "web-1"] {
        let labels = json!({"metadata": {"labels": {"app": "web"}}});
        pod(fixture, namespace, web, node, labels).await;
        running(fixture, namespace, web).await;
    }
    let pdb = json!({
        "metadata": {"name": "web"},
        "spec": {"minAvailable": min_available, "selector": {"matchLabels": {"app": "web"}}},
    });
    Api::<PodDisruptionBudget>::namespaced(fixture.client.clone(), namespace)
        .create(
            &PostParams::default(),
            &serde_json::from_value(pdb).unwrap(),
        )
        .await
        .unwrap();
}

async fn pod_names(fixture: &Fixture, namespace: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(fixture.client.clone(), namespace);
    let mut names: Vec<String> = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_drain_evicts_through_the_eviction_api_waits_for_the_disruption_budget_and_spares_daemon_set_and_mirror_pods()
 {
    let Some(fixture) = Fixture::begin("drain").await else {
        return;
    };
    let nodes = fixture.nodes(2).await;
    let (node, other) = (&nodes[0], &nodes[1]);
    let namespace = fixture.id.clone();
    let namespaces: Api<Namespace> = Api::all(fixture.client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
        )
        .await
        .unwrap();
    web_pods_behind_a_budget(&fixture, &namespace, node, 2).await;
    let daemon_set_owner = json!({"metadata": {"ownerReferences": [{
        "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "crashwatch-agent",
        "uid": "3f1b6a1e-0000-4000-8000-000000000001", "controller": true,
    }]}});
    pod(&fixture, &namespace, "agent", node, daemon_set_owner).await;
    let mirror =
        json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "5d41402abc4b2a76"}}});
    pod(&fixture, &namespace, "static", node, mirror).await;
    pod(&fixture, &namespace, "elsewhere", other, json!({})).await;
    budget_allows(&fixture, &namespace, "web", 0).await;

    fixture.report(node, "qemu-nbd", "HungTask", &[20]).await;
    let policy = fixture
        .policy(
            "drain",
            json!({"threshold": {"count": 1}, "action": "Drain", "drain": {"timeout": "5m"}}),
        )
        .await;
    let operator = Operator::leading(&fixture, &[]).await;

    let blocked = eventually("the drain blocked by the PDB", SOON, || async {
        let status = fixture.status(&policy).await;
        let entries = entries(&status);
        (entries.len() == 1 && entries[0].1 == "Blocked").then_some(entries)
    })
    .await;
    assert!(blocked[0].2.starts_with("pdb: 2 pods left"), "{blocked:?}");
    assert!(blocked[0].2.contains("web-"), "{blocked:?}");
    assert_eq!(
        fixture.cordoned().await,
        std::slice::from_ref(node),
        "a drain cordons first"
    );
    let events = eventually("a RemediationBlocked Event", SOON, || async {
        let events = fixture.events(node).await;
        events
            .iter()
            .any(|(reason, _)| reason == "RemediationBlocked")
            .then_some(events)
    })
    .await;
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "RemediationBlocked" && n.contains("pdb")),
        "{events:?}"
    );
    assert_eq!(
        operator.metric_with(
            "crashwatch_remediations_blocked_total",
            &[("reason", "pdb")]
        ),
        1.0
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pod_names(&fixture, &namespace).await,
        ["agent", "elsewhere", "static", "web-0", "web-1"],
        "nothing evicted while the budget refuses"
    );

    budget_allows(&fixture, &namespace, "web", 2).await;
    let status = eventually("the drain to complete", Duration::from_secs(45), || async {
        let status = fixture.status(&policy).await;
        (entries(&status).first().map(|e| e.1.as_str()) == Some("Drained")).then_some(status)
    })
    .await;
    assert_eq!(entries(&status)[0].2, "");
    assert_eq!(
        pod_names(&fixture, &namespace).await,
        ["agent", "elsewhere", "static"],
        "DaemonSet and mirror pods stay, and so does the other node's pod"
    );
    let drained = fixture.node(node).await;
    assert_eq!(condition(&drained), Some(("True".into(), "Drained".into())));
    assert_eq!(
        ledger(&drained)[&policy].drain,
        Some(operator::policy::ledger::DrainPhase::Drained)
    );
    let events = fixture.events(node).await;
    assert!(events.iter().any(|(r, _)| r == "Drained"), "{events:?}");
}

#[tokio::test]
async fn the_budget_lets_exactly_max_unavailable_nodes_go_and_the_next_proceeds_when_one_recovers()
{
    let Some(fixture) = Fixture::begin("budget").await else {
        return;
    };
    let nodes = fixture.nodes(10).await;
    for node in &nodes[..6] {
        fixture
            .report(node, "qemu-nbd", "HungTask", &[90, 60])
            .await;
    }
    for node in &nodes[6..] {
        fixture.report(node, "qemu-nbd", "HungTask", &[60]).await;
    }
    let policy = fixture
        .policy(
            "budget",
            json!({"safety": {"maxUnavailable": 2}, "recovery": {"uncordonAfter": "6s"}}),
        )
        .await;
    let operator = Operator::leading(&fixture, &[]).await;

    let status = eventually("2 cordoned and 4 blocked", SOON, || async {
        let status = fixture.status(&policy).await;
        let entries = entries(&status);
        let count = |state: &str| entries.iter().filter(|e| e.1 == state).count();
        (count("Cordoned") == 2 && count("Blocked") == 4).then_some(entries)
    })
    .await;
    let first: Vec<String> = status
        .iter()
        .filter(|e| e.1 == "Cordoned")
        .map(|e| e.0.clone())
        .collect();
    assert_eq!(fixture.cordoned().await, first);
    for blocked in status.iter().filter(|e| e.1 == "Blocked") {
        assert!(
            blocked
                .2
                .starts_with("budget: maxUnavailable 2 reached: 2 of 10"),
            "{blocked:?}"
        );
    }
    assert_eq!(
        operator.metric_with(
            "crashwatch_remediations_blocked_total",
            &[("reason", "budget")]
        ),
        4.0
    );
    let conditions = fixture.status(&policy).await["conditions"].clone();
    let exhausted = conditions
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "BudgetExhausted")
        .unwrap();
    assert_eq!(exhausted["status"], "True");

    // The first two recover after 6 s of quiet; two of the blocked take their places, and at
    // no moment are more than 2 nodes cordoned.
    let mut seen_cordoned = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let cordoned = fixture.cordoned().await;
        assert!(cordoned.len() <= 2, "the budget was exceeded: {cordoned:?}");
        seen_cordoned.extend(cordoned.iter().cloned());
        if seen_cordoned.len() >= 4
            && cordoned.iter().all(|n| !first.contains(n))
            && cordoned.len() == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the next nodes never proceeded: seen {seen_cordoned:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for recovered in &first {
        let node = fixture.node(recovered).await;
        let record = &ledger(&node)[&policy];
        assert_eq!(
            record.released.as_ref().map(|r| r.by),
            Some(ReleasedBy::Recovery)
        );
        assert_eq!(condition(&node), Some(("False".into(), "Recovered".into())));
    }
    assert!(
        seen_cordoned.iter().all(|n| nodes[..6].contains(n)),
        "only nodes over the threshold: {seen_cordoned:?}"
    );
}

#[tokio::test]
async fn dry_run_and_paused_touch_no_node_and_unpausing_acts() {
    let Some(fixture) = Fixture::begin("dryrun").await else {
        return;
    };
    let nodes = fixture.nodes(1).await;
    let node = &nodes[0];
    fixture
        .report(node, "qemu-nbd", "HungTask", &[90, 60])
        .await;
    let version = fixture.node(node).await.metadata.resource_version;
    let policy = fixture
        .policy(
            "taint",
            json!({"action": "Taint", "safety": {"dryRun": true}}),
        )
        .await;
    let operator = Operator::leading(&fixture, &[]).await;

    let dry = eventually("WouldAct", SOON, || async {
        let entries = entries(&fixture.status(&policy).await);
        (entries.len() == 1 && entries[0].1 == "WouldAct").then_some(entries)
    })
    .await;
    assert!(
        dry[0].2.starts_with("would taint: 2 matching occurrences"),
        "{dry:?}"
    );
    let events = eventually("a DryRun Event", SOON, || async {
        let events = fixture.events(node).await;
        events.iter().any(|(r, _)| r == "DryRun").then_some(events)
    })
    .await;
    assert!(events.iter().all(|(r, _)| r == "DryRun"), "{events:?}");
    assert_eq!(
        operator.metric_with("crashwatch_remediations_total", &[("result", "dry_run")]),
        1.0
    );

    fixture
        .edit_policy(
            &policy,
            json!({"safety": {"dryRun": false, "paused": true}}),
        )
        .await;
    let paused = eventually("Blocked: paused", SOON, || async {
        let entries = entries(&fixture.status(&policy).await);
        (entries.first().map(|e| e.2.as_str()) == Some("paused")).then_some(entries)
    })
    .await;
    assert_eq!(paused[0].1, "Blocked");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        fixture.node(node).await.metadata.resource_version,
        version,
        "no Node was touched"
    );

    fixture
        .edit_policy(&policy, json!({"safety": {"paused": false}}))
        .await;
    let tainted = eventually("the taint", SOON, || async {
        let node = fixture.node(node).await;
        let taints = node.spec.as_ref()?.taints.clone()?;
        // (The API server taints every new Node not-ready; a kubelet would lift that.)
        taints
            .into_iter()
            .find(|t| t.key.starts_with("crashwatch.dev/"))
    })
    .await;
    assert_eq!(tainted.key, "crashwatch.dev/unhealthy");
    assert_eq!(tainted.effect, "NoSchedule");
    assert!(fixture.cordoned().await.is_empty(), "Taint does not cordon");
}

#[tokio::test]
async fn a_human_uncordon_is_respected_and_recovery_undoes_only_the_operators_own_cordon() {
    let Some(fixture) = Fixture::begin("human").await else {
        return;
    };
    let nodes = fixture.nodes(3).await;
    let (ours, theirs, human) = (&nodes[0], &nodes[1], &nodes[2]);
    fixture.cluster.kubectl(&["cordon", theirs]);
    for node in &nodes {
        fixture
            .report(node, "qemu-nbd", "HungTask", &[90, 60])
            .await;
    }
    let policy = fixture
        .policy(
            "cordon",
            json!({"safety": {"maxUnavailable": 3}, "recovery": {"uncordonAfter": "8s"}}),
        )
        .await;
    let _operator = Operator::leading(&fixture, &[]).await;
    eventually("all three remediated", SOON, || async {
        let entries = entries(&fixture.status(&policy).await);
        (entries.len() == 3 && entries.iter().all(|e| e.1 == "Cordoned")).then_some(())
    })
    .await;
    assert!(
        !ledger(&fixture.node(theirs).await)[&policy].cordoned,
        "it was cordoned already"
    );

    fixture.cluster.kubectl(&["uncordon", human]);
    eventually("the human uncordon noticed", SOON, || async {
        let node = fixture.node(human).await;
        let released = ledger(&node)[&policy].released.clone()?;
        (released.by == ReleasedBy::Human).then_some(())
    })
    .await;
    assert_eq!(
        condition(&fixture.node(human).await),
        Some(("False".into(), "ReleasedByUser".into()))
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !fixture.cordoned().await.contains(human),
        "the same reports do not cordon again"
    );

    // Recovery (8 s after the action, no new occurrence): ours is uncordoned, theirs stays.
    eventually("the recovery", Duration::from_secs(30), || async {
        let cordoned = fixture.cordoned().await;
        (!cordoned.contains(ours)).then_some(())
    })
    .await;
    assert_eq!(
        fixture.cordoned().await,
        std::slice::from_ref(theirs),
        "a cordon the operator did not make stays"
    );
    assert_eq!(
        ledger(&fixture.node(theirs).await)[&policy]
            .released
            .as_ref()
            .map(|r| r.by),
        Some(ReleasedBy::Recovery)
    );

    // New occurrences on the node the human uncordoned do act again.
    fixture
        .report(human, "qemu-nbd", "HungTask", &[90, 60, 1, 0])
        .await;
    eventually("a new cordon for new reports", SOON, || async {
        fixture.cordoned().await.contains(human).then_some(())
    })
    .await;
}

#[tokio::test]
async fn only_the_leader_acts_and_a_killed_leader_is_replaced_within_the_lease_time() {
    let Some(fixture) = Fixture::begin("leader").await else {
        return;
    };
    let nodes = fixture.nodes(2).await;
    let lease = format!("{}-lease", fixture.id);
    let lease_seconds = 4;
    let duration = format!("{lease_seconds}s");
    let mut first = Operator::start(
        &fixture,
        &lease,
        "replica-a",
        &["--lease-duration", &duration],
    );
    first.wait_leading().await;
    let second = Operator::start(
        &fixture,
        &lease,
        "replica-b",
        &["--lease-duration", &duration],
    );
    let policy = fixture
        .policy("leader", json!({"safety": {"maxUnavailable": 2}}))
        .await;

    fixture
        .report(&nodes[0], "qemu-nbd", "HungTask", &[90, 60])
        .await;
    eventually("the leader's cordon", SOON, || async {
        (fixture.cordoned().await == [nodes[0].clone()]).then_some(())
    })
    .await;
    assert_eq!(first.metric("crashwatch_remediations_total"), 1.0);
    assert_eq!(second.metric("crashwatch_operator_leader"), 0.0);
    assert_eq!(
        second.metric("crashwatch_reconcile_seconds_count"),
        0.0,
        "the follower never reconciles"
    );

    first.kill();
    let killed = Instant::now();
    second.wait_leading().await;
    let handover = killed.elapsed();
    eprintln!("handover after SIGKILL: {handover:?} (lease {lease_seconds}s)");
    // The follower takes over when it has seen no renewal for a lease duration; it polls at
    // a fifth of it.
    assert!(
        handover
            <= Duration::from_secs(lease_seconds)
                + Duration::from_secs(lease_seconds) / 5
                + Duration::from_millis(500),
        "handover took {handover:?}"
    );
    fixture
        .report(&nodes[1], "qemu-nbd", "HungTask", &[90, 60])
        .await;
    eventually("the new leader's cordon", SOON, || async {
        (fixture.cordoned().await == nodes).then_some(())
    })
    .await;
    assert_eq!(second.metric("crashwatch_remediations_total"), 1.0);
    let _ = policy;
}

#[tokio::test]
async fn the_charts_least_privilege_role_is_enough_to_drain() {
    let Some(fixture) = Fixture::begin("rbac").await else {
        return;
    };
    let cluster = &fixture.cluster;
    let namespace = fixture.id.clone();
    cluster.kubectl(&["create", "namespace", &namespace]);
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/crashwatch");
    let rendered = std::process::Command::new(cluster.bin.join("helm"))
        .args(["template", "rbac"])
        .arg(&chart)
        .args(["-n", &namespace, "--show-only", "templates/operator.yaml"])
        .output()
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("operator.yaml");
    std::fs::write(&manifest, &rendered.stdout).unwrap();
    cluster.kubectl(&["apply", "-n", &namespace, "-f", manifest.to_str().unwrap()]);
    let token = cluster.kubectl(&[
        "create",
        "token",
        "rbac-crashwatch-operator",
        "-n",
        &namespace,
    ]);
    let admin = std::fs::read_to_string(&cluster.kubeconfig).unwrap();
    let (head, _) = admin.split_once("users:").unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let user = format!(
        "users:\n- name: admin\n  user: {{token: {}}}\n",
        token.trim()
    );
    std::fs::write(&kubeconfig, format!("{head}{user}")).unwrap();

    let nodes = fixture.nodes(1).await;
    let node = &nodes[0];
    pod(&fixture, &namespace, "web", node, json!({})).await;
    fixture
        .report(node, "qemu-nbd", "HungTask", &[90, 60])
        .await;
    let policy = fixture.policy("drain", json!({"action": "Drain"})).await;
    let operator = Operator::start_as(
        &kubeconfig,
        "crashwatch-operator",
        &fixture.id,
        &["--lease-namespace", &namespace],
    );
    operator.wait_leading().await;
    eventually(
        "the drain, as the chart's service account",
        SOON,
        || async {
            let entries = entries(&fixture.status(&policy).await);
            (entries.first().map(|e| e.1.as_str()) == Some("Drained")).then_some(())
        },
    )
    .await;
    assert_eq!(pod_names(&fixture, &namespace).await, Vec::<String>::new());
    let events = fixture.events(node).await;
    assert!(events.iter().any(|(r, _)| r == "Drained"), "{events:?}");
    assert!(!operator.log().contains("forbidden"), "{}", operator.log());
}

#[tokio::test]
async fn a_drain_interrupted_by_killing_the_operator_resumes_after_restart() {
    let Some(fixture) = Fixture::begin("middrain").await else {
        return;
    };
    let nodes = fixture.nodes(1).await;
    let node = &nodes[0];
    let namespace = fixture.id.clone();
    fixture
        .cluster
        .kubectl(&["create", "namespace", &namespace]);
    web_pods_behind_a_budget(&fixture, &namespace, node, 1).await;
    // One disruption allowed: one pod goes, the other waits on the budget.
    budget_allows(&fixture, &namespace, "web", 1).await;
    fixture
        .report(node, "qemu-nbd", "HungTask", &[90, 60])
        .await;
    let policy = fixture.policy("drain", json!({"action": "Drain"})).await;
    let mut operator = Operator::leading(&fixture, &[]).await;
    eventually("one pod evicted, the other refused", SOON, || async {
        let entries = entries(&fixture.status(&policy).await);
        let blocked = entries
            .first()
            .is_some_and(|e| e.2.starts_with("pdb: 1 pods left"));
        (blocked && pod_names(&fixture, &namespace).await.len() == 1).then_some(())
    })
    .await;

    operator.kill();
    let record = ledger(&fixture.node(node).await)[&policy].clone();
    assert_eq!(
        record.drain,
        Some(operator::policy::ledger::DrainPhase::Draining)
    );
    // An eviction in flight when the operator died may still debit the budget without
    // deleting the pod (the request is cancelled); the disruption controller forgets such
    // debits after 2 minutes. Playing it: let in-flight requests settle, then reset.
    tokio::time::sleep(Duration::from_millis(500)).await;
    budget_allows(&fixture, &namespace, "web", 1).await;
    let restarted = Operator::leading(&fixture, &[]).await;
    eventually("the drain to finish after the restart", SOON, || async {
        let entries = entries(&fixture.status(&policy).await);
        (entries.first().map(|e| e.1.as_str()) == Some("Drained")).then_some(())
    })
    .await;
    assert!(pod_names(&fixture, &namespace).await.is_empty());
    let after = ledger(&fixture.node(node).await)[&policy].clone();
    assert_eq!(
        after.at, record.at,
        "the same drain, resumed, not a new one"
    );
    assert_eq!(
        restarted.metric_with("crashwatch_remediations_total", &[("action", "Drain")]),
        0.0,
        "the restarted operator did not cordon again"
    );
}

#[tokio::test]
async fn a_leader_that_cannot_renew_its_lease_stops_acting() {
    let Some(fixture) = Fixture::begin("partition").await else {
        return;
    };
    let lease = format!("{}-lease", fixture.id);
    let mut leader = Operator::start(&fixture, &lease, "replica-a", &["--lease-duration", "3s"]);
    leader.wait_leading().await;

    let cut = Instant::now();
    let outage = fixture.cluster.api_server_outage();
    let status = leader.wait_exit(Duration::from_secs(15));
    let waited = cut.elapsed();
    drop(outage);
    let status =
        status.unwrap_or_else(|| panic!("still running without its lease:\n{}", leader.log()));
    assert!(!status.success(), "{status}");
    assert!(
        leader.log().contains("lost the leader lease"),
        "{}",
        leader.log()
    );
    // By design it gives up once a renewal could no longer land inside the lease (2 s after
    // its last renewal with a 3 s lease), before a follower may take over (3 s after the last
    // renewal the follower saw). The stop script's own time is included here.
    eprintln!(
        "the partitioned leader stopped {waited:?} after the API server began to stop (lease 3 s)"
    );
}

/// Installs a CrashReport CRD whose spec accepts anything, as an older, looser CRD did;
/// returns once an object the strict schema refuses can be created.
async fn install_loose_report_crd(fixture: &Fixture) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(crds::CrashReport::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] =
        json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    let crd: CustomResourceDefinition = serde_json::from_value(crd).unwrap();
    // The field manager of `kubectl apply --server-side`, so that the strict CRD applies
    // over this one again without conflicts.
    Api::<CustomResourceDefinition>::all(fixture.client.clone())
        .patch(
            "crashreports.crashwatch.dev",
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
}

/// Creates CrashReport `name` from raw JSON `spec`; Ok or the API server's message.
async fn raw_report(fixture: &Fixture, name: &str, spec: Value) -> Result<(), String> {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("crashwatch.dev", "v1alpha1", "CrashReport"),
        "crashreports",
    );
    let api: Api<DynamicObject> = Api::all_with(fixture.client.clone(), &resource);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "crashwatch.dev/v1alpha1",
        "kind": "CrashReport",
        "metadata": {"name": name, "labels": {support::TEST_LABEL: fixture.id}},
        "spec": spec,
    }))
    .unwrap();
    api.create(&PostParams::default(), &object)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn only_host_processes_count_by_default_and_a_malformed_report_does_not_stop_a_cordon() {
    let Some(fixture) = Fixture::begin("hostonly").await else {
        return;
    };
    let nodes = fixture.nodes(3).await;
    // A report the operator cannot decode (an address beyond 64 bits, a kind it does not
    // know), stored while a looser CRD was installed; the strict CRD does not revalidate it.
    install_loose_report_crd(&fixture).await;
    let malformed = format!("{}.hungtask.malformed", nodes[2]);
    let absurd = json!({"nodeName": nodes[2], "kind": "HungTask", "comm": "qemu-nbd",
                        "faultAddress": "0x123456789abcdef0123456789"});
    eventually("the loose CRD to take effect", SOON, || async {
        raw_report(&fixture, &malformed, absurd.clone()).await.ok()
    })
    .await;
    fixture.cluster.install_crds();
    let refused = eventually("the strict CRD to take effect", SOON, || async {
        let probe = format!("{}.hungtask.probe", nodes[2]);
        match raw_report(&fixture, &probe, absurd.clone()).await {
            Ok(()) => {
                fixture.cluster.kubectl(&["delete", "crashreport", &probe]);
                None
            }
            Err(message) => Some(message),
        }
    })
    .await;
    assert!(refused.contains("spec.faultAddress"), "{refused}");

    // qemu-nbd hangs over the threshold on the host of node 0, and in a pod on node 1.
    fixture
        .report(&nodes[0], "qemu-nbd", "HungTask", &[90, 60])
        .await;
    let in_pod = format!("{}.hungtask.pod", nodes[1]);
    let pod = json!({"pod": {"namespace": "tenant", "name": "evil", "uid": "u1"},
                     "container": {"name": "main"}});
    fixture
        .report_with(&in_pod, &nodes[1], "qemu-nbd", "HungTask", &[90, 60], pod)
        .await;
    let policy = fixture
        .policy("hostonly", json!({"safety": {"maxUnavailable": 3}}))
        .await;
    let operator = Operator::leading(&fixture, &[]).await;
    eventually("the host node's cordon", SOON, || async {
        (fixture.cordoned().await == [nodes[0].clone()]).then_some(())
    })
    .await;
    let status = reconciled(&fixture, &policy).await;
    let names: Vec<String> = entries(&status).into_iter().map(|e| e.0).collect();
    assert_eq!(names, [nodes[0].clone()], "the pod's hangs do not count");
    eventually("the malformed report to be reported", SOON, || async {
        let events = fixture.events(&malformed).await;
        events
            .iter()
            .any(|(reason, note)| {
                reason == "Undecodable" && note.contains("0x123456789abcdef0123456789")
            })
            .then_some(())
    })
    .await;

    // Opting the pod's namespace in makes its hangs count; the malformed report is
    // reported once, however often the operator reconciles.
    fixture
        .edit_policy(
            &policy,
            json!({"match": {"pods": {"namespaces": ["tenant"]}}}),
        )
        .await;
    eventually("the pod's node cordoned once opted in", SOON, || async {
        (fixture.cordoned().await == nodes[..2]).then_some(())
    })
    .await;
    assert_eq!(operator.metric("crashwatch_reports_undecodable_total"), 1.0);
    let undecodable = fixture
        .events(&malformed)
        .await
        .into_iter()
        .filter(|(reason, _)| reason == "Undecodable")
        .count();
    assert_eq!(undecodable, 1);
}

#[tokio::test]
async fn a_count_of_ten_fires_on_the_tenth_occurrence_of_a_fault_first_seen_days_ago() {
    let Some(fixture) = Fixture::begin("ten").await else {
        return;
    };
    let nodes = fixture.nodes(1).await;
    let node = &nodes[0];
    let policy = fixture
        .policy("ten", json!({"threshold": {"count": 10, "window": "30m"}}))
        .await;
    // First seen three days ago, then nine times in the last nine minutes.
    let mut ages = vec![3 * 86_400];
    ages.extend((1..=9).map(|minute| minute * 60));
    fixture.report(node, "qemu-nbd", "HungTask", &ages).await;
    let _operator = Operator::leading(&fixture, &[]).await;
    reconciled(&fixture, &policy).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fixture.cordoned().await,
        Vec::<String>::new(),
        "nine is below ten"
    );

    ages.push(5);
    fixture.report(node, "qemu-nbd", "HungTask", &ages).await;
    eventually("the cordon on the tenth occurrence", SOON, || async {
        (fixture.cordoned().await == nodes).then_some(())
    })
    .await;
    let status = fixture.status(&policy).await;
    assert_eq!(status["nodes"][0]["occurrences"], 10, "{status}");
}

#[tokio::test]
async fn a_leader_cut_off_by_a_blackholed_api_server_stops_before_a_follower_may_take_over() {
    use k8s_openapi::api::coordination::v1::Lease;
    let Some(fixture) = Fixture::begin("blackhole").await else {
        return;
    };
    let lease = format!("{}-lease", fixture.id);
    let lease_seconds = 3;
    let duration = format!("{lease_seconds}s");
    let mut leader = Operator::start(
        &fixture,
        &lease,
        "replica-a",
        &["--lease-duration", &duration],
    );
    leader.wait_leading().await;
    // Let it renew a few times first.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let blackhole = fixture.cluster.api_server_blackhole();
    let status = leader.wait_exit(Duration::from_secs(20));
    let stopped = jiff::Timestamp::now();
    drop(blackhole);
    let status =
        status.unwrap_or_else(|| panic!("still running without its lease:\n{}", leader.log()));
    assert!(!status.success(), "{status}");
    assert!(
        leader.log().contains("lost the leader lease"),
        "{}",
        leader.log()
    );

    // The last renewal the API server stored: a follower that saw it may take over a lease
    // duration later, not before. The leader had stopped by then.
    let stored = eventually("the API server back", SOON, || async {
        Api::<Lease>::namespaced(fixture.client.clone(), "default")
            .get(&lease)
            .await
            .ok()
    })
    .await;
    let spec = stored.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-a"));
    let renewed = spec.renew_time.unwrap().0;
    let takeover = renewed + jiff::SignedDuration::from_secs(lease_seconds);
    eprintln!(
        "last renewal {renewed}, the blackholed leader stopped at {stopped}, a follower may take over from {takeover}"
    );
    // When it stopped acting, as it logged (its controller dropped); the process exits
    // just after, once the error is printed.
    let log = leader.log();
    let line = log
        .lines()
        .find(|l| l.contains("stopped acting: no longer the leader"))
        .unwrap_or_else(|| panic!("no stop logged:\n{log}"));
    let plain: String = line
        .split('\u{1b}')
        .map(|part| part.split_once('m').map_or(part, |(_, rest)| rest))
        .collect();
    let acted_until: jiff::Timestamp = plain.split_whitespace().next().unwrap().parse().unwrap();
    eprintln!("it stopped acting at {acted_until}");
    assert!(
        acted_until < takeover,
        "the leader acted until {acted_until}, after a follower could take over ({takeover})"
    );
    assert!(acted_until <= stopped);

    // And a follower does take over.
    let follower = Operator::start(
        &fixture,
        &lease,
        "replica-b",
        &["--lease-duration", &duration],
    );
    follower.wait_leading().await;
}

#[tokio::test]
async fn bare_pods_and_empty_dir_data_block_a_drain_until_the_policy_opts_in() {
    let Some(fixture) = Fixture::begin("optin").await else {
        return;
    };
    let nodes = fixture.nodes(1).await;
    let node = &nodes[0];
    let namespace = fixture.id.clone();
    fixture
        .cluster
        .kubectl(&["create", "namespace", &namespace]);
    pod(&fixture, &namespace, "replica", node, json!({})).await;
    pod(
        &fixture,
        &namespace,
        "bare",
        node,
        json!({"metadata": {"ownerReferences": null}}),
    )
    .await;
    let scratch = json!({"spec": {"volumes": [{"name": "scratch", "emptyDir": {}}]}});
    pod(&fixture, &namespace, "cache", node, scratch).await;
    fixture
        .report(node, "qemu-nbd", "HungTask", &[90, 60])
        .await;
    let policy = fixture.policy("drain", json!({"action": "Drain"})).await;
    let operator = Operator::leading(&fixture, &[]).await;

    let reason = eventually("the drain blocked as kubectl drain would", SOON, || async {
        let entries = entries(&fixture.status(&policy).await);
        entries
            .first()
            .filter(|e| e.1 == "Blocked" && e.2.starts_with("unevictable:"))
            .map(|e| e.2.clone())
    })
    .await;
    assert!(
        reason.contains(&format!("{namespace}/bare")) && reason.contains("drain.force"),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("{namespace}/cache"))
            && reason.contains("drain.deleteEmptyDirData"),
        "{reason}"
    );
    assert_eq!(
        fixture.cordoned().await,
        nodes,
        "the node is cordoned, as by kubectl drain"
    );
    assert_eq!(
        pod_names(&fixture, &namespace).await,
        ["bare", "cache", "replica"],
        "nothing is evicted while a pod needs an opt-in"
    );
    let events = fixture.events(node).await;
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "RemediationBlocked" && n.contains("unevictable")),
        "{events:?}"
    );
    assert_eq!(operator.metric("crashwatch_drain_pod_watches"), 1.0);

    // Pausing the policy ends its drain: the Pod watch is freed.
    fixture
        .edit_policy(&policy, json!({"safety": {"paused": true}}))
        .await;
    eventually(
        "the Pod watch freed when the policy pauses",
        SOON,
        || async { (operator.metric("crashwatch_drain_pod_watches") == 0.0).then_some(()) },
    )
    .await;

    fixture
        .edit_policy(
            &policy,
            json!({"safety": {"paused": false},
                   "drain": {"force": true, "deleteEmptyDirData": true}}),
        )
        .await;
    eventually("the drain to finish with the opt-ins", SOON, || async {
        let entries = entries(&fixture.status(&policy).await);
        (entries.first().map(|e| e.1.as_str()) == Some("Drained")).then_some(())
    })
    .await;
    assert_eq!(pod_names(&fixture, &namespace).await, Vec::<String>::new());
    assert_eq!(operator.metric("crashwatch_drain_pod_watches"), 0.0);
}

#[tokio::test]
async fn expired_reports_and_reports_over_the_per_node_cap_are_deleted() {
    let Some(fixture) = Fixture::begin("retention").await else {
        return;
    };
    let nodes = fixture.nodes(2).await;
    let day = 86_400;
    fixture
        .report(&nodes[0], "old", "Segfault", &[3 * day, 2 * day])
        .await;
    fixture.report(&nodes[0], "fresh", "Segfault", &[60]).await;
    for (process, age) in [("a", 600), ("b", 300), ("c", 60)] {
        fixture.report(&nodes[1], process, "Segfault", &[age]).await;
    }
    let operator = Operator::leading(
        &fixture,
        &["--report-ttl", "24h", "--max-reports-per-node", "2"],
    )
    .await;
    let label = format!("{}={}", support::TEST_LABEL, fixture.id);
    let remaining = || async {
        let mut names: Vec<String> = Api::<crds::CrashReport>::all(fixture.client.clone())
            .list(&ListParams::default().labels(&label))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|r| r.metadata.name)
            .collect();
        names.sort();
        names
    };
    let expected = vec![
        format!("{}.segfault.fresh", nodes[0]),
        format!("{}.segfault.b", nodes[1]),
        format!("{}.segfault.c", nodes[1]),
    ];
    eventually(
        "retention to delete the expired and the oldest",
        SOON,
        || async { (remaining().await == expected).then_some(()) },
    )
    .await;
    assert!(
        operator.metric_with("crashwatch_reports_deleted_total", &[("reason", "expired")]) >= 1.0
    );
    assert!(
        operator.metric_with(
            "crashwatch_reports_deleted_total",
            &[("reason", "over_cap")]
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_pod_label_selector_opts_in_only_the_pods_it_selects() {
    let Some(fixture) = Fixture::begin("podlabels").await else {
        return;
    };
    let nodes = fixture.nodes(3).await;
    let namespace = fixture.id.clone();
    fixture
        .cluster
        .kubectl(&["create", "namespace", &namespace]);
    let labelled = |app: &str| json!({"metadata": {"labels": {"app": app}}});
    pod(&fixture, &namespace, "nbd", &nodes[0], labelled("nbd")).await;
    pod(&fixture, &namespace, "web", &nodes[1], labelled("web")).await;
    // Hangs of qemu-nbd in pod nbd (node 0), in pod web (node 1), and in a pod that is gone
    // (node 2).
    for (i, pod_name) in ["nbd", "web", "gone"].into_iter().enumerate() {
        let in_pod = json!({"pod": {"namespace": namespace, "name": pod_name}});
        let name = format!("{}.hungtask.{pod_name}", nodes[i]);
        fixture
            .report_with(&name, &nodes[i], "qemu-nbd", "HungTask", &[90, 60], in_pod)
            .await;
    }
    let policy = fixture
        .policy(
            "podlabels",
            json!({"match": {"pods": {"namespaces": [namespace], "selector": {"matchLabels": {"app": "nbd"}}}},
                   "safety": {"maxUnavailable": 3}}),
        )
        .await;
    let _operator = Operator::leading(&fixture, &[]).await;
    eventually("the labelled pod's node cordoned", SOON, || async {
        (fixture.cordoned().await == [nodes[0].clone()]).then_some(())
    })
    .await;
    let status = reconciled(&fixture, &policy).await;
    let names: Vec<String> = entries(&status).into_iter().map(|e| e.0).collect();
    assert_eq!(names, [nodes[0].clone()]);
}
