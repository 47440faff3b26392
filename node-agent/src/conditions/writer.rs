//! Writing the agent's conditions on its own Node's status by server-side apply, with a
//! field manager of its own, so they coexist with the kubelet's and Node Problem Detector's;
//! and reading the operator's reboot order from the Node the apply returns.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::reboot::{self, REBOOT_ORDER_ANNOTATION, Verdict};
use super::{BOOT_ID_ANNOTATION, CONDITION_TYPES, Desired, PROCESS_HUNG};

/// The field manager of the agent's condition writes (CrashReports use another).
pub const FIELD_MANAGER: &str = "crashwatch-agent-conditions";

/// What the condition writer needs.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// This node.
    pub node: String,
    /// This boot.
    pub boot_id: String,
    /// The longest time between two writes (each moves `lastHeartbeatTime`).
    pub heartbeat: Duration,
    /// Whether the agent may carry out a reboot order for its node.
    pub allow_reboot: bool,
    /// The sysrq trigger (`/proc/sysrq-trigger` of the host).
    pub sysrq_trigger: PathBuf,
    /// How long to wait after the emergency sync and after the read-only remount.
    pub sysrq_settle: Duration,
}

/// The condition metrics (names are a contract with the chart's alerts).
#[derive(Clone)]
pub struct ConditionMetrics {
    /// 1 for the status each condition has now, by type and reason.
    pub status: IntGaugeVec,
    /// Transitions written, by type and new status.
    pub transitions: IntCounterVec,
    /// Condition writes, by result.
    pub writes: IntCounterVec,
    /// Reboot orders, by what the agent did (`rebooting`, `hang_cleared`, `not_allowed`,
    /// `invalid`, `failed`).
    pub reboot_orders: IntCounterVec,
}

impl ConditionMetrics {
    /// Creates the metrics, labelled with `node`, and registers them in `registry`.
    pub fn new(node: &str, registry: &Registry) -> ConditionMetrics {
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("node", node);
        let metrics = ConditionMetrics {
            status: IntGaugeVec::new(
                opts(
                    "crashwatch_node_condition",
                    "The agent's Node conditions: 1 when True, 0 when False, by type and reason.",
                ),
                &["type", "reason"],
            )
            .expect("valid metric"),
            transitions: IntCounterVec::new(
                opts(
                    "crashwatch_node_condition_transitions_total",
                    "Node condition transitions the agent wrote, by type and status.",
                ),
                &["type", "status"],
            )
            .expect("valid metric"),
            writes: IntCounterVec::new(
                opts(
                    "crashwatch_node_condition_writes_total",
                    "Writes of the agent's Node conditions, by result.",
                ),
                &["result"],
            )
            .expect("valid metric"),
            reboot_orders: IntCounterVec::new(
                opts(
                    "crashwatch_reboot_orders_total",
                    "Reboot orders for this node's current boot, by what the agent did.",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
        };
        for collector in [
            Box::new(metrics.status.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.transitions.clone()),
            Box::new(metrics.writes.clone()),
            Box::new(metrics.reboot_orders.clone()),
        ] {
            registry.register(collector).expect("unique metric");
        }
        metrics
    }
}

/// Each own condition type's status and `lastTransitionTime` as the Node has them.
pub type Known = BTreeMap<String, (String, String)>;

/// The agent's conditions as they are on `node`.
pub fn known_on(node: &Node) -> Known {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| CONDITION_TYPES.contains(&c.type_.as_str()))
        .map(|c| {
            let since = c
                .last_transition_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            (c.type_.clone(), (c.status.clone(), since))
        })
        .collect()
}

/// The conditions to apply at `now` (RFC 3339): a status equal to the known one keeps its
/// `lastTransitionTime`, so a restart neither resets nor re-dates a condition; every write
/// moves `lastHeartbeatTime`.
pub fn conditions_to_apply(known: &Known, desired: &[Desired], now: &str) -> Vec<Value> {
    desired
        .iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" };
            let since = match known.get(d.type_) {
                Some((was, since)) if was == status && !since.is_empty() => since.as_str(),
                _ => now,
            };
            json!({
                "type": d.type_,
                "status": status,
                "reason": d.reason,
                "message": d.message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": since,
            })
        })
        .collect()
}

fn now_text() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Applies the conditions the daemon derives (None until its first derivation) until the
/// process ends: at once when they change, and every heartbeat.
pub async fn write_loop(
    client: Client,
    config: WriterConfig,
    mut desired: watch::Receiver<Option<Vec<Desired>>>,
    metrics: ConditionMetrics,
) {
    let api: Api<Node> = Api::all(client);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let retry = config.heartbeat.min(Duration::from_secs(5));
    let mut known: Option<Known> = None;
    let mut wait = config.heartbeat;
    loop {
        let current = desired.borrow_and_update().clone();
        if let Some(current) = current {
            wait = config.heartbeat;
            if known.is_none() {
                match api.get(&config.node).await {
                    Ok(node) => known = Some(known_on(&node)),
                    Err(err) => {
                        tracing::warn!(%err, node = %config.node, "cannot read the Node; will retry");
                        metrics.writes.with_label_values(&["error"]).inc();
                        wait = retry;
                    }
                }
            }
            if let Some(was) = known.as_ref() {
                let now = now_text();
                let conditions = conditions_to_apply(was, &current, &now);
                let object = json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": config.node,
                        "annotations": { BOOT_ID_ANNOTATION: config.boot_id },
                    },
                    "status": { "conditions": conditions },
                });
                match api
                    .patch_status(&config.node, &params, &Patch::Apply(&object))
                    .await
                {
                    Ok(node) => {
                        metrics.writes.with_label_values(&["success"]).inc();
                        let written = known_on(&node);
                        for d in &current {
                            let status = if d.status { "True" } else { "False" };
                            if was.get(d.type_).map(|(s, _)| s.as_str()) != Some(status) {
                                metrics
                                    .transitions
                                    .with_label_values(&[d.type_, status])
                                    .inc();
                                tracing::info!(condition = d.type_, status, reason = d.reason, message = %d.message, "node condition changed");
                            }
                        }
                        metrics.status.reset();
                        for d in &current {
                            metrics
                                .status
                                .with_label_values(&[d.type_, d.reason])
                                .set(i64::from(d.status));
                        }
                        known = Some(written);
                        let hung = current.iter().any(|d| d.type_ == PROCESS_HUNG && d.status);
                        follow_order(&node, &config, hung, &metrics).await;
                    }
                    Err(err) => {
                        metrics.writes.with_label_values(&["error"]).inc();
                        tracing::warn!(%err, node = %config.node, "cannot write the Node conditions; will retry");
                        wait = retry;
                    }
                }
            }
        }
        tokio::select! {
            changed = desired.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Carries out a reboot order on `node` for this boot, if there is one and it still holds.
async fn follow_order(node: &Node, config: &WriterConfig, hung: bool, metrics: &ConditionMetrics) {
    let Some(order) = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REBOOT_ORDER_ANNOTATION))
    else {
        return;
    };
    let outcome = match reboot::decide(order, &config.boot_id, hung, config.allow_reboot) {
        Verdict::Done => return,
        Verdict::Reboot => "rebooting",
        Verdict::HangCleared => "hang_cleared",
        Verdict::NotAllowed => "not_allowed",
        Verdict::Invalid(_) => "invalid",
    };
    metrics.reboot_orders.with_label_values(&[outcome]).inc();
    if outcome != "rebooting" {
        tracing::warn!(%order, outcome, "not carrying out the reboot order");
        return;
    }
    tracing::error!(%order, "rebooting this node as ordered: sysrq sync, read-only remount, reset");
    let (trigger, settle) = (config.sysrq_trigger.clone(), config.sysrq_settle);
    let result =
        tokio::task::spawn_blocking(move || reboot::reboot_through_sysrq(&trigger, settle)).await;
    metrics.reboot_orders.with_label_values(&["failed"]).inc();
    tracing::error!(?result, "the reboot through sysrq failed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::{NBD_DEVICE_ERROR, process_hung};

    #[test]
    fn an_unchanged_status_keeps_its_transition_time_and_a_new_one_is_dated_now() {
        let known = Known::from([
            (
                PROCESS_HUNG.to_owned(),
                ("True".to_owned(), "2026-11-30T19:00:00Z".to_owned()),
            ),
            (
                NBD_DEVICE_ERROR.to_owned(),
                ("True".to_owned(), "2026-11-30T19:00:00Z".to_owned()),
            ),
        ]);
        let hung = process_hung(&[crate::conditions::HungThread {
            pid: 1,
            tid: 1,
            comm: "qemu-nbd".into(),
            blocked_seconds: 200,
            wchan: None,
            nbd_devices: vec![],
        }]);
        let cleared = Desired {
            type_: NBD_DEVICE_ERROR,
            status: false,
            reason: "NoNbdErrors",
            message: String::new(),
        };
        let now = "2026-11-30T20:00:00Z";
        let applied = conditions_to_apply(&known, &[hung, cleared], now);
        assert_eq!(applied[0]["lastTransitionTime"], "2026-11-30T19:00:00Z");
        assert_eq!(applied[0]["lastHeartbeatTime"], now);
        assert_eq!(applied[1]["status"], "False");
        assert_eq!(applied[1]["lastTransitionTime"], now);
    }
}
