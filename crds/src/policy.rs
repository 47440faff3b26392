//! The `RemediationPolicy` custom resource: when and how the operator takes a node out of
//! service, and the safety rails around it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::bounds::{self, MATCH_ITEMS};
use crate::event::EventKind;

/// A Go-style duration such as `90s`, `10m` or `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// Cordons, taints or drains nodes on which a watched process crashes or hangs repeatedly,
/// never taking more than `safety.maxUnavailable` nodes out of service.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "crashwatch.dev",
    version = "v1alpha1",
    kind = "RemediationPolicy",
    plural = "remediationpolicies",
    shortname = "rpol",
    status = "RemediationPolicyStatus",
    doc = "When and how crashwatch-operator cordons, taints or drains nodes whose watched processes crash or hang repeatedly, within safety rails.",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Dry Run","type":"boolean","jsonPath":".spec.safety.dryRun"}"#,
    printcolumn = r#"{"name":"Paused","type":"boolean","jsonPath":".spec.safety.paused"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RemediationPolicySpec {
    /// Which CrashReports count against a node.
    #[serde(default, rename = "match")]
    pub selector: ReportSelector,
    /// How many matching occurrences within which window make a node act.
    pub threshold: Threshold,
    /// What to do to the node.
    pub action: Action,
    /// The taint to add when `action` is `Taint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taint: Option<TaintSpec>,
    /// How to drain when `action` is `Drain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainSpec>,
    /// The rails that keep the operator from taking down the fleet.
    #[serde(default)]
    pub safety: Safety,
    /// When the operator undoes its own action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<Recovery>,
    /// The next rungs of the ladder after `action` (which must be `Drain`: cordon, then
    /// evict), for a node the drain cannot free: its stuck pods never terminate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalation: Option<Escalation>,
}

/// The rungs after the drain: `Cordon`, then `Drain`, then `Reboot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Escalation {
    /// Reboot a node whose drain timed out while the hang is still present.
    pub reboot: RebootEscalation,
}

/// When and how a node is rebooted: the operator orders it on the Node
/// (`crashwatch.dev/reboot-order`), the node's own agent carries it out through sysrq
/// (it must run with `agent.allowReboot`), and a new boot id closes the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebootEscalation {
    /// The node condition that must still be `True` when the reboot is ordered (the hang
    /// is still present); the agent's `ProcessHung` by default.
    #[serde(default = "default_hang_condition")]
    #[schemars(length(min = 1, max = 316))]
    pub hang_condition: String,
    /// How many of this policy's nodes may be rebooting at once.
    #[serde(default = "default_max_concurrent_reboots")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrent: u32,
    /// How long the node has to come back with a new boot id before the step is reported
    /// failed, for example `15m`.
    #[serde(default = "default_reboot_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub timeout: String,
}

fn default_hang_condition() -> String {
    crate::node::PROCESS_HUNG_CONDITION.into()
}

fn default_max_concurrent_reboots() -> u32 {
    1
}

fn default_reboot_timeout() -> String {
    "15m".into()
}

/// Which reports match a policy. Empty lists match everything. The identity lists
/// (`processNames`, `binaryPaths`, `buildIds`) must each match when given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReportSelector {
    /// Process names (the kernel's `comm`, up to 15 characters), for example `qemu-nbd`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MATCH_ITEMS), inner(length(max = bounds::COMM_LEN)))]
    pub process_names: Vec<String>,
    /// Paths of the crashed binary as the agent found it (`binaryPath`), for example
    /// `/usr/bin/qemu-nbd`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MATCH_ITEMS), inner(length(max = bounds::PATH_LEN)))]
    pub binary_paths: Vec<String>,
    /// GNU build-ids of the crashed binary, in lowercase hex.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MATCH_ITEMS), inner(length(max = bounds::BUILD_ID_LEN)))]
    pub build_ids: Vec<String>,
    /// Event kinds, for example `HungTask` and `Segfault`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MATCH_ITEMS))]
    pub kinds: Vec<EventKind>,
    /// Opts processes in pods in. Without it only processes on the host, outside any pod,
    /// count: a pod can name its process anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodSelector>,
    /// The nodes the policy covers (all nodes when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// Which pods' processes count.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSelector {
    /// The namespaces whose pods count (every namespace when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MATCH_ITEMS), inner(length(max = bounds::LABEL_LEN)))]
    pub namespaces: Vec<String>,
    /// The labels those pods must have. The operator reads each Pod's labels when it
    /// plans; a pod that is gone does not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// How many occurrences within which window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Threshold {
    /// Occurrences (summed over matching reports' counts) that trigger the action.
    #[schemars(range(min = 1))]
    pub count: u32,
    /// The sliding window they must fall in, for example `30m`.
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub window: String,
}

/// What the operator does to a node that crossed the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Action {
    /// Mark the node unschedulable.
    Cordon,
    /// Add a taint (see `taint`).
    Taint,
    /// Cordon, then evict the node's pods through the Eviction API, respecting
    /// PodDisruptionBudgets; DaemonSet and mirror pods stay.
    Drain,
}

/// The taint added by the `Taint` action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaintSpec {
    /// The taint key.
    #[serde(default = "default_taint_key")]
    pub key: String,
    /// The taint value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The effect.
    #[serde(default)]
    pub effect: TaintEffect,
}

fn default_taint_key() -> String {
    "crashwatch.dev/unhealthy".into()
}

impl Default for TaintSpec {
    /// `crashwatch.dev/unhealthy:NoSchedule`, the taint when the policy names none.
    fn default() -> Self {
        TaintSpec {
            key: default_taint_key(),
            value: None,
            effect: TaintEffect::default(),
        }
    }
}

/// A taint's effect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TaintEffect {
    /// New pods are not scheduled.
    #[default]
    NoSchedule,
    /// New pods avoid the node when they can.
    PreferNoSchedule,
    /// Running pods without a toleration are evicted too.
    NoExecute,
}

/// How a drain runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// How long the drain may take before it is reported as failed, for example `10m`.
    #[serde(default = "default_drain_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub timeout: String,
    /// The grace period given to evicted pods; the pods' own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub grace_period_seconds: Option<i64>,
    /// Evict pods that no controller manages (bare pods), which are gone for good
    /// afterwards, as `kubectl drain --force`. Without it such a pod blocks the drain.
    #[serde(default)]
    pub force: bool,
    /// Evict pods with `emptyDir` volumes, whose data is lost, as `kubectl drain
    /// --delete-emptydir-data`. Without it such a pod blocks the drain.
    #[serde(default)]
    pub delete_empty_dir_data: bool,
}

fn default_drain_timeout() -> String {
    "10m".into()
}

/// The rails around every action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Safety {
    /// The most nodes (a number, or a percentage of the nodes the policy selects) that may
    /// be unavailable at once, counting nodes cordoned by anyone.
    #[serde(default = "default_max_unavailable")]
    pub max_unavailable: IntOrString,
    /// The least time between two actions of this policy, for example `10m`.
    #[serde(default = "default_cooldown")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub cooldown: String,
    /// Say what would be done, in Events and status, and change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Do nothing at all.
    #[serde(default)]
    pub paused: bool,
}

impl Default for Safety {
    fn default() -> Self {
        Safety {
            max_unavailable: default_max_unavailable(),
            cooldown: default_cooldown(),
            dry_run: false,
            paused: false,
        }
    }
}

fn default_max_unavailable() -> IntOrString {
    IntOrString::Int(1)
}

fn default_cooldown() -> String {
    "10m".into()
}

/// When the operator undoes its own cordon or taint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Recovery {
    /// How long a remediated node must stay quiet (no matching occurrence) before the
    /// operator uncordons it or removes its taint, for example `1h`.
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub uncordon_after: String,
}

/// What the policy is doing to which nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemediationPolicyStatus {
    /// The nodes past the threshold, and what became of each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeRemediation>,
    /// The policy's conditions (`Ready`, `BudgetExhausted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One node past the threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeRemediation {
    /// The node.
    pub name: String,
    /// Where the remediation stands.
    pub state: RemediationState,
    /// Why, when it is blocked or would act in a dry run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Matching occurrences in the window.
    pub occurrences: u64,
    /// When the state last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// Where a node's remediation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RemediationState {
    /// Cordoned by this policy.
    Cordoned,
    /// Tainted by this policy.
    Tainted,
    /// Pods are being evicted.
    Draining,
    /// Every evictable pod is gone.
    Drained,
    /// The action is held back: budget, PDB, cooldown, paused, or a timeout.
    Blocked,
    /// A dry run: what would have been done.
    WouldAct,
    /// A reboot is ordered; the node has not come back with a new boot id yet.
    Rebooting,
    /// The node came back with a new boot id after the ordered reboot.
    Rebooted,
}
