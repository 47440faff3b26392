//! The decision: given one policy, the nodes it selects with their reports and ledgers, and
//! the time, what to change on which node and what the policy's status says. Pure, so that
//! every rail (threshold, budget, cooldown, dry run, pause, human uncordon, recovery) is
//! tested on values, on every rung of the ladder (cordon, drain, reboot).

use std::time::Duration;

use crds::policy::{Action, NodeRemediation, RemediationPolicySpec, RemediationState};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::activity::ReportTimes;
use super::duration::{InvalidDuration, parse_duration};
use super::ledger::{
    AddedTaint, DrainPhase, Ledger, RebootPhase, RebootStep, Record, Release, ReleasedBy,
};

/// A policy's spec, checked and with its durations parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// The policy's name: its key in every node's ledger.
    pub policy: String,
    /// What to do.
    pub action: Action,
    /// Occurrences that trigger the action.
    pub threshold: u64,
    /// The window they must fall in.
    pub window: Duration,
    /// The most selected nodes that may be unavailable at once.
    pub max_unavailable: MaxUnavailable,
    /// The least time between two actions.
    pub cooldown: Duration,
    /// Say, do not do.
    pub dry_run: bool,
    /// Do nothing.
    pub paused: bool,
    /// The taint the `Taint` action adds.
    pub taint: AddedTaint,
    /// How long a drain may take.
    pub drain_timeout: Duration,
    /// The quiet time after which the operator undoes its own action, if any.
    pub uncordon_after: Option<Duration>,
    /// The reboot rung, when the policy escalates to it.
    pub reboot: Option<RebootRules>,
}

/// `escalation.reboot`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RebootRules {
    /// The node condition that must still be True.
    pub hang_condition: String,
    /// How many of the policy's nodes may be rebooting at once.
    pub max_concurrent: u64,
    /// How long the node has to come back with a new boot id.
    pub timeout: Duration,
}

/// `safety.maxUnavailable`, resolved against the number of selected nodes when planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxUnavailable {
    /// That many nodes.
    Nodes(u64),
    /// That percentage of the selected nodes, rounded down.
    Percent(u64),
}

impl MaxUnavailable {
    /// How many of `selected` nodes may be unavailable.
    pub fn of(self, selected: usize) -> u64 {
        match self {
            MaxUnavailable::Nodes(n) => n,
            MaxUnavailable::Percent(p) => p.min(100) * selected as u64 / 100,
        }
    }
}

/// A policy spec the operator cannot follow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPolicy {
    /// A duration field that does not parse.
    #[error("{field}: {source}")]
    Duration {
        /// The field.
        field: &'static str,
        /// Why.
        source: InvalidDuration,
    },
    /// `maxUnavailable` is neither a non-negative integer nor a percentage.
    #[error("safety.maxUnavailable: {0:?} is neither a node count nor a percentage such as 20%")]
    MaxUnavailable(String),
    /// An escalation after an action other than `Drain`.
    #[error("escalation: the reboot rung follows a drain that timed out; action must be Drain")]
    EscalationNeedsDrain,
}

impl Rules {
    /// Checks a policy's spec.
    pub fn new(policy: &str, spec: &RemediationPolicySpec) -> Result<Rules, InvalidPolicy> {
        let duration = |field: &'static str, text: &str| {
            parse_duration(text).map_err(|source| InvalidPolicy::Duration { field, source })
        };
        let max_unavailable = match &spec.safety.max_unavailable {
            IntOrString::Int(n) if *n >= 0 => MaxUnavailable::Nodes(*n as u64),
            IntOrString::String(text) => text
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .map(MaxUnavailable::Percent)
                .ok_or_else(|| InvalidPolicy::MaxUnavailable(text.clone()))?,
            IntOrString::Int(n) => return Err(InvalidPolicy::MaxUnavailable(n.to_string())),
        };
        let taint = spec.taint.clone().unwrap_or_default();
        Ok(Rules {
            policy: policy.to_owned(),
            action: spec.action,
            threshold: u64::from(spec.threshold.count.max(1)),
            window: duration("threshold.window", &spec.threshold.window)?,
            max_unavailable,
            cooldown: duration("safety.cooldown", &spec.safety.cooldown)?,
            dry_run: spec.safety.dry_run,
            paused: spec.safety.paused,
            taint: AddedTaint {
                key: taint.key,
                value: taint.value,
                effect: taint.effect,
            },
            drain_timeout: match &spec.drain {
                Some(drain) => duration("drain.timeout", &drain.timeout)?,
                None => Duration::from_secs(600),
            },
            uncordon_after: spec
                .recovery
                .as_ref()
                .map(|r| duration("recovery.uncordonAfter", &r.uncordon_after))
                .transpose()?,
            reboot: match &spec.escalation {
                None => None,
                Some(_) if spec.action != Action::Drain => {
                    return Err(InvalidPolicy::EscalationNeedsDrain);
                }
                Some(escalation) => Some(RebootRules {
                    hang_condition: escalation.reboot.hang_condition.clone(),
                    max_concurrent: u64::from(escalation.reboot.max_concurrent.max(1)),
                    timeout: duration("escalation.reboot.timeout", &escalation.reboot.timeout)?,
                }),
            },
        })
    }
}

/// A node as a policy sees it: the node's own state and the reports that match the policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeView {
    /// The node's name.
    pub name: String,
    /// `spec.unschedulable`, set by anyone.
    pub unschedulable: bool,
    /// A `Ready` condition that is present and not `True`.
    pub not_ready: bool,
    /// The node's taints.
    pub taints: Vec<AddedTaint>,
    /// What every policy did to it.
    pub ledger: Ledger,
    /// The reports on this node that match the policy.
    pub reports: Vec<ReportTimes>,
    /// The node's boot id (the agent's `crashwatch.dev/boot-id`, else the kubelet's).
    pub boot_id: Option<String>,
    /// The types of the node's conditions that are True.
    pub true_conditions: Vec<String>,
    /// The reboot order on the node (`crashwatch.dev/reboot-order`), when there is one.
    pub reboot_order: Option<String>,
}

impl NodeView {
    fn occurrences_after(&self, since: Timestamp) -> u64 {
        self.reports
            .iter()
            .map(|r| r.occurrences_after(since))
            .sum()
    }

    fn latest_occurrence(&self) -> Option<Timestamp> {
        self.reports.iter().filter_map(ReportTimes::latest).max()
    }

    fn is_true(&self, condition: &str) -> bool {
        self.true_conditions.iter().any(|c| c == condition)
    }

    /// The change to the reboot order that withdraws it, if there is one.
    fn withdraw_order(&self) -> Option<Option<String>> {
        self.reboot_order.is_some().then_some(None)
    }

    fn has_taint(&self, taint: &AddedTaint) -> bool {
        self.taints
            .iter()
            .any(|t| t.key == taint.key && t.effect == taint.effect)
    }
}

/// One write to one node: its new ledger, and what changes in its spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The node.
    pub node: String,
    /// What the change is, for Events, the node condition and metrics.
    pub kind: ChangeKind,
    /// The node's whole ledger after the change.
    pub ledger: Ledger,
    /// The new `spec.unschedulable`, when it changes.
    pub unschedulable: Option<bool>,
    /// A taint to add.
    pub add_taint: Option<AddedTaint>,
    /// A taint to remove.
    pub remove_taint: Option<AddedTaint>,
    /// The reboot order annotation: `Some(Some(order))` writes it, `Some(None)` removes it.
    pub reboot_order: Option<Option<String>>,
}

/// What a [`Change`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The policy's action, taken now.
    Remediate(Action),
    /// The remediation ends.
    Release(ReleasedBy),
    /// A drain ran out of time.
    DrainTimedOut,
    /// A reboot is ordered: the drain timed out and the hang is still present.
    RebootOrdered,
    /// The node came back with a new boot id.
    Rebooted,
    /// The node did not come back with a new boot id in time.
    RebootTimedOut,
    /// The order is withdrawn: the hang cleared, or the policy was paused or put in dry run.
    RebootCancelled,
}

/// A node whose pods are to be evicted in this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOrder {
    /// The node.
    pub node: String,
    /// When the drain gives up.
    pub deadline: Timestamp,
}

/// How the budget stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Nodes the policy selects.
    pub selected: usize,
    /// Of those, unavailable ones (cordoned or tainted by anyone, or not ready), after the
    /// plan's changes.
    pub unavailable: u64,
    /// `maxUnavailable`, resolved.
    pub max_unavailable: u64,
}

/// Everything one reconcile of one policy does.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Node writes, releases first: they free budget before anything new is acted on.
    pub changes: Vec<Change>,
    /// Drains to run after the changes.
    pub drains: Vec<DrainOrder>,
    /// The status's node list (drains refine their entries once run).
    pub nodes: Vec<NodeRemediation>,
    /// The budget after the plan.
    pub budget: Budget,
    /// When something will be due without any new input (cooldown end, recovery, timeout).
    pub wake_at: Option<Timestamp>,
    /// Nodes whose drain timed out while the hang is still present (and not rebooted since).
    pub hung_after_drain: u64,
}

/// Why a node is held back. Status reasons begin with the label, so that a restarted
/// operator reads back the same reasons it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReason {
    /// `maxUnavailable` is reached.
    Budget,
    /// The policy acted too recently.
    Cooldown,
    /// The policy is paused.
    Paused,
    /// A PodDisruptionBudget refuses an eviction.
    Pdb,
    /// The drain ran out of time.
    Timeout,
    /// A pod needs a drain opt-in the policy does not give (`force`,
    /// `deleteEmptyDirData`), as `kubectl drain` would refuse it.
    Unevictable,
    /// `escalation.reboot.maxConcurrent` nodes of the policy are rebooting.
    RebootLimit,
    /// The node states no boot id, so a reboot could not be told apart from none.
    NoBootId,
}

impl BlockReason {
    /// The metric label and status prefix.
    pub fn label(self) -> &'static str {
        match self {
            BlockReason::Budget => "budget",
            BlockReason::Cooldown => "cooldown",
            BlockReason::Paused => "paused",
            BlockReason::Pdb => "pdb",
            BlockReason::Timeout => "timeout",
            BlockReason::Unevictable => "unevictable",
            BlockReason::RebootLimit => "reboot-limit",
            BlockReason::NoBootId => "no-boot-id",
        }
    }

    /// The reason a status entry was blocked for, read back from its text.
    pub fn of_status(reason: &str) -> Option<BlockReason> {
        let label = reason.split(':').next()?;
        [
            BlockReason::Budget,
            BlockReason::Cooldown,
            BlockReason::Paused,
            BlockReason::Pdb,
            BlockReason::Timeout,
            BlockReason::Unevictable,
            BlockReason::RebootLimit,
            BlockReason::NoBootId,
        ]
        .into_iter()
        .find(|r| r.label() == label)
    }

    /// A status reason: the label, then the details.
    pub fn because(self, details: &str) -> String {
        if details.is_empty() {
            self.label().to_owned()
        } else {
            format!("{}: {details}", self.label())
        }
    }
}

fn later(a: Option<Timestamp>, b: Timestamp) -> Timestamp {
    a.map_or(b, |a| a.max(b))
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .expect("a SignedDuration is a valid span")
}

fn minus(t: Timestamp, d: Duration) -> Timestamp {
    t.saturating_sub(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .expect("a SignedDuration is a valid span")
}

fn state_of(record: &Record) -> (RemediationState, Option<String>) {
    if let Some(step) = &record.reboot {
        match step.phase {
            RebootPhase::Ordered => return (RemediationState::Rebooting, None),
            RebootPhase::Rebooted => return (RemediationState::Rebooted, None),
            RebootPhase::TimedOut => {
                return (
                    RemediationState::Blocked,
                    Some(BlockReason::Timeout.because(
                        "the node did not come back with a new boot id after the ordered reboot",
                    )),
                );
            }
            RebootPhase::Cancelled => {}
        }
    }
    match (record.action, record.drain) {
        (Action::Cordon, _) => (RemediationState::Cordoned, None),
        (Action::Taint, _) => (RemediationState::Tainted, None),
        (Action::Drain, Some(DrainPhase::Drained)) => (RemediationState::Drained, None),
        (Action::Drain, Some(DrainPhase::TimedOut)) => (
            RemediationState::Blocked,
            Some(BlockReason::Timeout.because("the drain gave up; see the node's Events")),
        ),
        (Action::Drain, _) => (RemediationState::Draining, None),
    }
}

fn entry(
    node: &str,
    (state, reason): (RemediationState, Option<String>),
    occurrences: u64,
) -> NodeRemediation {
    NodeRemediation {
        name: node.to_owned(),
        state,
        reason,
        occurrences,
        since: None,
    }
}

/// Whether a node counts against the budget.
fn unavailable(node: &NodeView, ledger: &Ledger, unschedulable: bool) -> bool {
    unschedulable
        || node.not_ready
        || ledger
            .values()
            .any(|r| r.is_active() && r.taint.as_ref().is_some_and(|t| node.has_taint(t)))
}

/// Plans one reconcile of a policy over the nodes it selects.
pub fn plan(rules: &Rules, nodes: &[NodeView], now: Timestamp) -> Plan {
    let window_start = minus(now, rules.window);
    let mut plan = Plan {
        changes: Vec::new(),
        drains: Vec::new(),
        nodes: Vec::new(),
        budget: Budget {
            selected: nodes.len(),
            unavailable: 0,
            max_unavailable: rules.max_unavailable.of(nodes.len()),
        },
        wake_at: None,
        hung_after_drain: 0,
    };
    let hang_condition = rules
        .reboot
        .as_ref()
        .map_or(crds::node::PROCESS_HUNG_CONDITION, |r| {
            r.hang_condition.as_str()
        });
    // Nodes of this policy with a reboot ordered and not over, and nodes whose timed-out
    // drain left the hang in place: (index, occurrences in the window, record).
    let mut rebooting: u64 = 0;
    let mut reboot_candidates: Vec<(usize, u64, Record)> = Vec::new();
    let wake = |at: Timestamp, wake_at: &mut Option<Timestamp>| {
        *wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
    };
    let touch = !rules.paused && !rules.dry_run;
    let mut last_action: Option<Timestamp> = None;
    // After releases: each node's ledger and schedulability, for the budget.
    let mut after: Vec<(Ledger, bool)> = Vec::with_capacity(nodes.len());
    let mut candidates = Vec::new();

    for node in nodes {
        let mut ledger = node.ledger.clone();
        let mut unschedulable = node.unschedulable;
        let record = ledger.get(&rules.policy).cloned();
        if let Some(record) = &record {
            last_action = Some(later(last_action, record.at));
        }
        match record {
            Some(record) if record.is_active() => {
                let in_window = node.occurrences_after(window_start);
                let human_undid = match record.action {
                    Action::Cordon | Action::Drain => !node.unschedulable,
                    Action::Taint => !node.has_taint(record.taint.as_ref().unwrap_or(&rules.taint)),
                };
                let quiet_since = later(node.latest_occurrence(), record.at);
                let recovery_due = rules.uncordon_after.map(|quiet| plus(quiet_since, quiet));
                let drain_deadline = plus(record.at, rules.drain_timeout);
                if human_undid && touch {
                    let released = released(&record, now, ReleasedBy::Human);
                    ledger.insert(rules.policy.clone(), released);
                    plan.changes.push(Change {
                        node: node.name.clone(),
                        kind: ChangeKind::Release(ReleasedBy::Human),
                        ledger: ledger.clone(),
                        unschedulable: None,
                        add_taint: None,
                        remove_taint: None,
                        reboot_order: node.withdraw_order(),
                    });
                } else if let Some(due) = recovery_due.filter(|_| touch) {
                    if due <= now {
                        let change = recover(rules, node, &mut ledger, &record, now);
                        if let Some(uncordon) = change.unschedulable {
                            unschedulable = uncordon;
                        }
                        plan.changes.push(change);
                    } else {
                        wake(due, &mut plan.wake_at);
                    }
                }
                if ledger[&rules.policy].is_active() {
                    let mut state = state_of(&record);
                    if record.drain == Some(DrainPhase::Draining) && touch {
                        if drain_deadline <= now {
                            let mut timed_out = record.clone();
                            timed_out.drain = Some(DrainPhase::TimedOut);
                            state = state_of(&timed_out);
                            ledger.insert(rules.policy.clone(), timed_out);
                            plan.changes.push(Change {
                                node: node.name.clone(),
                                kind: ChangeKind::DrainTimedOut,
                                ledger: ledger.clone(),
                                unschedulable: None,
                                add_taint: None,
                                remove_taint: None,
                                reboot_order: None,
                            });
                            // The next rung is decided on the written ledger, at once.
                            wake(now, &mut plan.wake_at);
                        } else {
                            plan.drains.push(DrainOrder {
                                node: node.name.clone(),
                                deadline: drain_deadline,
                            });
                            wake(drain_deadline, &mut plan.wake_at);
                        }
                    }
                    let hang_left = record.drain == Some(DrainPhase::TimedOut)
                        && node.is_true(hang_condition)
                        && record.reboot.as_ref().map(|s| s.phase) != Some(RebootPhase::Rebooted);
                    if hang_left {
                        plan.hung_after_drain += 1;
                    }
                    let phase = record.reboot.as_ref().map(|s| s.phase);
                    match (&rules.reboot, &record.reboot) {
                        (Some(reboot), Some(step)) if step.phase == RebootPhase::Ordered => {
                            last_action = Some(later(last_action, step.ordered_at));
                            let came_back = node
                                .boot_id
                                .as_deref()
                                .is_some_and(|b| !b.is_empty() && b != step.boot_id);
                            let deadline = plus(step.ordered_at, reboot.timeout);
                            let ended = if came_back {
                                Some((ChangeKind::Rebooted, RebootPhase::Rebooted))
                            } else if !touch
                                || !node.unschedulable
                                || !node.is_true(&reboot.hang_condition)
                            {
                                Some((ChangeKind::RebootCancelled, RebootPhase::Cancelled))
                            } else if deadline <= now {
                                Some((ChangeKind::RebootTimedOut, RebootPhase::TimedOut))
                            } else {
                                None
                            };
                            match ended {
                                Some((kind, phase)) => {
                                    let mut step = step.clone();
                                    step.phase = phase;
                                    step.ended_at = Some(now);
                                    if came_back {
                                        step.new_boot_id = node.boot_id.clone();
                                        step.seconds =
                                            Some(now.duration_since(step.ordered_at).as_secs_f64());
                                    }
                                    let mut closed = record.clone();
                                    closed.reboot = Some(step);
                                    state = state_of(&closed);
                                    ledger.insert(rules.policy.clone(), closed);
                                    plan.changes.push(Change {
                                        node: node.name.clone(),
                                        kind,
                                        ledger: ledger.clone(),
                                        unschedulable: None,
                                        add_taint: None,
                                        remove_taint: None,
                                        reboot_order: node.withdraw_order(),
                                    });
                                }
                                None => {
                                    rebooting += 1;
                                    wake(deadline, &mut plan.wake_at);
                                }
                            }
                        }
                        (Some(reboot), _)
                            if hang_left
                                && node.unschedulable
                                && matches!(phase, None | Some(RebootPhase::Cancelled))
                                && node.is_true(&reboot.hang_condition) =>
                        {
                            reboot_candidates.push((after.len(), in_window, record.clone()));
                            after.push((ledger, unschedulable));
                            continue;
                        }
                        _ => {}
                    }
                    plan.nodes.push(entry(&node.name, state, in_window));
                }
            }
            record => {
                let since = record
                    .as_ref()
                    .map_or(window_start, |r| r.acknowledged_until().max(window_start));
                let occurrences = node.occurrences_after(since);
                if occurrences >= rules.threshold {
                    candidates.push((after.len(), occurrences));
                }
            }
        }
        after.push((ledger, unschedulable));
    }

    let mut unavailable_now = nodes
        .iter()
        .zip(&after)
        .filter(|(node, (ledger, unschedulable))| unavailable(node, ledger, *unschedulable))
        .count() as u64;
    reboot_candidates.sort_by(|a, b| nodes[a.0].name.cmp(&nodes[b.0].name));
    for (index, occurrences, record) in reboot_candidates {
        let node = &nodes[index];
        let Some(reboot) = &rules.reboot else {
            continue;
        };
        let cooldown_end = last_action.map(|t| plus(t, rules.cooldown));
        let blocked = if rules.paused {
            Some(BlockReason::Paused.because(""))
        } else if node.boot_id.as_deref().is_none_or(str::is_empty) {
            Some(BlockReason::NoBootId.because(
                "the node states no boot id (crashwatch.dev/boot-id or status.nodeInfo.bootID), so a reboot could not be confirmed",
            ))
        } else if unavailable_now > plan.budget.max_unavailable {
            Some(BlockReason::Budget.because(&format!(
                "maxUnavailable {} exceeded: {} of {} selected nodes are unavailable",
                plan.budget.max_unavailable, unavailable_now, plan.budget.selected
            )))
        } else if rebooting >= reboot.max_concurrent {
            Some(BlockReason::RebootLimit.because(&format!(
                "{rebooting} nodes of this policy are rebooting, maxConcurrent {}",
                reboot.max_concurrent
            )))
        } else if let Some(end) = cooldown_end.filter(|&end| end > now) {
            wake(end, &mut plan.wake_at);
            Some(BlockReason::Cooldown.because(&format!("the next action is allowed at {end}")))
        } else {
            None
        };
        if let Some(reason) = blocked {
            let state = (RemediationState::Blocked, Some(reason));
            plan.nodes.push(entry(&node.name, state, occurrences));
            continue;
        }
        last_action = Some(now);
        rebooting += 1;
        let why = format!(
            "the drain timed out at {} and {} is still True",
            plus(record.at, rules.drain_timeout),
            reboot.hang_condition
        );
        if rules.dry_run {
            let state = (
                RemediationState::WouldAct,
                Some(format!("would reboot: {why}")),
            );
            plan.nodes.push(entry(&node.name, state, occurrences));
            continue;
        }
        let boot_id = node.boot_id.clone().unwrap_or_default();
        let order = crds::node::RebootOrder {
            policy: rules.policy.clone(),
            boot_id: boot_id.clone(),
            at: now.to_string(),
        };
        let mut ordered = record.clone();
        ordered.reboot = Some(RebootStep {
            ordered_at: now,
            boot_id,
            phase: RebootPhase::Ordered,
            new_boot_id: None,
            ended_at: None,
            seconds: None,
        });
        let mut ledger = after[index].0.clone();
        ledger.insert(rules.policy.clone(), ordered.clone());
        wake(plus(now, reboot.timeout), &mut plan.wake_at);
        plan.nodes
            .push(entry(&node.name, state_of(&ordered), occurrences));
        plan.changes.push(Change {
            node: node.name.clone(),
            kind: ChangeKind::RebootOrdered,
            ledger,
            unschedulable: None,
            add_taint: None,
            remove_taint: None,
            reboot_order: Some(Some(
                serde_json::to_string(&order).expect("an order serializes"),
            )),
        });
    }
    candidates.sort_by(|a, b| b.1.cmp(&a.1).then(nodes[a.0].name.cmp(&nodes[b.0].name)));
    for (index, occurrences) in candidates {
        let node = &nodes[index];
        let (ledger, unschedulable) = &after[index];
        let costs_budget = !unavailable(node, ledger, *unschedulable);
        let cooldown_end = last_action.map(|t| plus(t, rules.cooldown));
        let blocked = if rules.paused {
            Some(BlockReason::Paused.because(""))
        } else if costs_budget && unavailable_now >= plan.budget.max_unavailable {
            Some(BlockReason::Budget.because(&format!(
                "maxUnavailable {} reached: {} of {} selected nodes are unavailable",
                plan.budget.max_unavailable, unavailable_now, plan.budget.selected
            )))
        } else if let Some(end) = cooldown_end.filter(|&end| end > now) {
            wake(end, &mut plan.wake_at);
            Some(BlockReason::Cooldown.because(&format!("the next action is allowed at {end}")))
        } else {
            None
        };
        if let Some(reason) = blocked {
            let state = (RemediationState::Blocked, Some(reason));
            plan.nodes.push(entry(&node.name, state, occurrences));
            continue;
        }
        last_action = Some(now);
        if costs_budget {
            unavailable_now += 1;
        }
        let why = format!(
            "{occurrences} matching occurrences in {}, threshold {}",
            humantime(rules.window),
            rules.threshold
        );
        if rules.dry_run {
            let state = (
                RemediationState::WouldAct,
                Some(format!("would {}: {why}", verb(rules.action))),
            );
            plan.nodes.push(entry(&node.name, state, occurrences));
            continue;
        }
        let change = remediate(rules, node, ledger, *unschedulable, now);
        let record = &change.ledger[&rules.policy];
        plan.nodes
            .push(entry(&node.name, state_of(record), occurrences));
        if record.drain == Some(DrainPhase::Draining) {
            let deadline = plus(now, rules.drain_timeout);
            plan.drains.push(DrainOrder {
                node: node.name.clone(),
                deadline,
            });
            wake(deadline, &mut plan.wake_at);
        }
        plan.changes.push(change);
    }
    plan.budget.unavailable = unavailable_now;
    plan.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    plan
}

/// The policy's action as a verb, for people.
pub fn verb(action: Action) -> &'static str {
    match action {
        Action::Cordon => "cordon",
        Action::Taint => "taint",
        Action::Drain => "drain",
    }
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        _ => format!("{}s", d.as_secs_f64()),
    }
}

fn released(record: &Record, now: Timestamp, by: ReleasedBy) -> Record {
    let mut released = record.clone();
    if let Some(step) = released.reboot.as_mut()
        && step.phase == RebootPhase::Ordered
    {
        step.phase = RebootPhase::Cancelled;
        step.ended_at = Some(now);
    }
    released.released = Some(Release { at: now, by });
    released
}

/// Whether a policy other than `policy` holds an active remediation that needs the node
/// cordoned.
fn other_cordon_holder<'a>(ledger: &'a mut Ledger, policy: &str) -> Option<&'a mut Record> {
    ledger.iter_mut().find_map(|(name, r)| {
        (name != policy && r.is_active() && matches!(r.action, Action::Cordon | Action::Drain))
            .then_some(r)
    })
}

/// The recovery of a quiet node: undo this policy's own cordon and taint, nothing else. A
/// cordon another active remediation relies on passes to that remediation.
fn recover(
    rules: &Rules,
    node: &NodeView,
    ledger: &mut Ledger,
    record: &Record,
    now: Timestamp,
) -> Change {
    ledger.insert(
        rules.policy.clone(),
        released(record, now, ReleasedBy::Recovery),
    );
    let mut uncordon = None;
    if record.cordoned && node.unschedulable {
        match other_cordon_holder(ledger, &rules.policy) {
            Some(other) => other.cordoned = true,
            None => uncordon = Some(false),
        }
    }
    Change {
        node: node.name.clone(),
        kind: ChangeKind::Release(ReleasedBy::Recovery),
        ledger: ledger.clone(),
        unschedulable: uncordon,
        add_taint: None,
        remove_taint: record.taint.clone().filter(|t| node.has_taint(t)),
        reboot_order: node.withdraw_order(),
    }
}

fn remediate(
    rules: &Rules,
    node: &NodeView,
    ledger: &Ledger,
    unschedulable: bool,
    now: Timestamp,
) -> Change {
    let cordon = matches!(rules.action, Action::Cordon | Action::Drain) && !unschedulable;
    let taint = (rules.action == Action::Taint && !node.has_taint(&rules.taint))
        .then(|| rules.taint.clone());
    let mut ledger = ledger.clone();
    ledger.insert(
        rules.policy.clone(),
        Record {
            action: rules.action,
            at: now,
            cordoned: cordon,
            taint: taint.clone(),
            drain: (rules.action == Action::Drain).then_some(DrainPhase::Draining),
            reboot: None,
            released: None,
        },
    );
    Change {
        node: node.name.clone(),
        kind: ChangeKind::Remediate(rules.action),
        ledger,
        unschedulable: cordon.then_some(true),
        add_taint: taint,
        remove_taint: None,
        reboot_order: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::policy::{Safety, Threshold};

    const POLICY: &str = "qemu-nbd-hangs";

    fn now() -> Timestamp {
        "2026-11-24T12:00:00Z".parse().unwrap()
    }

    fn ago(seconds: i64) -> Timestamp {
        now() - SignedDuration::from_secs(seconds)
    }

    fn rules(action: Action, edit: impl FnOnce(&mut RemediationPolicySpec)) -> Rules {
        let mut spec = RemediationPolicySpec {
            selector: Default::default(),
            threshold: Threshold {
                count: 2,
                window: "10m".into(),
            },
            action,
            taint: None,
            drain: None,
            safety: Safety {
                cooldown: "0s".into(),
                ..Safety::default()
            },
            recovery: None,
            escalation: None,
        };
        edit(&mut spec);
        Rules::new(POLICY, &spec).unwrap()
    }

    /// A node with one report whose occurrences happened `seconds_ago`.
    fn node(name: &str, seconds_ago: &[i64]) -> NodeView {
        let recent: Vec<Timestamp> = seconds_ago.iter().rev().map(|&s| ago(s)).collect();
        NodeView {
            name: name.into(),
            reports: vec![ReportTimes {
                count: recent.len() as u64,
                first_seen: recent.first().copied(),
                last_seen: recent.last().copied(),
                recent,
                buckets: Vec::new(),
            }],
            ..NodeView::default()
        }
    }

    fn acted(node: &mut NodeView, action: Action, seconds_ago: i64) {
        node.unschedulable = action != Action::Taint;
        node.ledger.insert(
            POLICY.into(),
            Record {
                action,
                at: ago(seconds_ago),
                cordoned: node.unschedulable,
                taint: None,
                drain: (action == Action::Drain).then_some(DrainPhase::Draining),
                reboot: None,
                released: None,
            },
        );
    }

    fn states(plan: &Plan) -> Vec<(&str, RemediationState, Option<BlockReason>)> {
        plan.nodes
            .iter()
            .map(|n| {
                let reason = n.reason.as_deref().and_then(BlockReason::of_status);
                (n.name.as_str(), n.state, reason)
            })
            .collect()
    }

    #[test]
    fn one_occurrence_does_nothing_and_the_second_cordons() {
        let rules = rules(Action::Cordon, |_| {});
        let one = plan(&rules, &[node("a", &[30])], now());
        assert!(one.changes.is_empty() && one.nodes.is_empty(), "{one:?}");

        let two = plan(&rules, &[node("a", &[30, 5])], now());
        assert_eq!(two.changes.len(), 1);
        let change = &two.changes[0];
        assert_eq!(change.kind, ChangeKind::Remediate(Action::Cordon));
        assert_eq!(change.unschedulable, Some(true));
        let record = &change.ledger[POLICY];
        assert!(record.cordoned && record.is_active() && record.at == now());
        assert_eq!(states(&two), [("a", RemediationState::Cordoned, None)]);
    }

    #[test]
    fn occurrences_outside_the_window_do_not_count() {
        let rules = rules(Action::Cordon, |_| {});
        let plan = plan(&rules, &[node("a", &[700, 5])], now());
        assert!(plan.changes.is_empty());
    }

    #[test]
    fn the_budget_caps_a_storm_and_names_the_rest_blocked() {
        let rules = rules(Action::Cordon, |s| {
            s.safety.max_unavailable = IntOrString::Int(2)
        });
        let mut nodes: Vec<NodeView> = (0..10).map(|i| node(&format!("n{i}"), &[60])).collect();
        for node in &mut nodes[..6] {
            *node = self::node(&node.name, &[60, 30]);
        }
        let plan = plan(&rules, &nodes, now());
        assert_eq!(plan.changes.len(), 2);
        let blocked: Vec<_> = states(&plan)
            .into_iter()
            .filter(|s| s.1 == RemediationState::Blocked)
            .collect();
        assert_eq!(blocked.len(), 4);
        assert!(blocked.iter().all(|s| s.2 == Some(BlockReason::Budget)));
        assert_eq!(plan.budget.unavailable, 2);
    }

    #[test]
    fn nodes_cordoned_by_someone_else_use_up_the_budget() {
        let rules = rules(Action::Cordon, |s| {
            s.safety.max_unavailable = IntOrString::Int(2)
        });
        let mut busy = node("other", &[]);
        busy.unschedulable = true;
        let mut not_ready = node("dead", &[]);
        not_ready.not_ready = true;
        let nodes = [busy, not_ready, node("a", &[60, 30]), node("b", &[60, 30])];
        let plan = plan(&rules, &nodes, now());
        assert!(plan.changes.is_empty(), "{plan:?}");
        assert_eq!(plan.budget.unavailable, 2);
    }

    #[test]
    fn a_node_already_cordoned_by_someone_else_costs_no_budget_and_is_not_ours_to_uncordon() {
        let rules = rules(Action::Cordon, |s| {
            s.safety.max_unavailable = IntOrString::Int(2);
            s.recovery = Some(crds::policy::Recovery {
                uncordon_after: "1m".into(),
            });
        });
        let mut cordoned = node("a", &[60, 30]);
        cordoned.unschedulable = true;
        let nodes = [cordoned, node("b", &[60, 30])];
        let first = plan(&rules, &nodes, now());
        assert_eq!(first.changes.len(), 2, "{first:?}");
        let a = first.changes.iter().find(|c| c.node == "a").unwrap();
        assert_eq!(a.unschedulable, None);
        assert!(!a.ledger[POLICY].cordoned);

        // Quiet for long enough: the recovery releases a but leaves its cordon alone.
        let mut a_later = nodes[0].clone();
        a_later.ledger = a.ledger.clone();
        let later = super::plan(&rules, &[a_later], now() + SignedDuration::from_secs(120));
        assert_eq!(
            later.changes[0].kind,
            ChangeKind::Release(ReleasedBy::Recovery)
        );
        assert_eq!(later.changes[0].unschedulable, None);
    }

    #[test]
    fn a_percentage_is_of_the_selected_nodes_rounded_down() {
        assert_eq!(MaxUnavailable::Percent(25).of(10), 2);
        assert_eq!(MaxUnavailable::Percent(10).of(5), 0);
        assert_eq!(MaxUnavailable::Percent(250).of(4), 4);
        let rules = rules(Action::Cordon, |s| {
            s.safety.max_unavailable = IntOrString::String("20%".into())
        });
        assert_eq!(rules.max_unavailable, MaxUnavailable::Percent(20));
        let bad = RemediationPolicySpec {
            safety: Safety {
                max_unavailable: IntOrString::String("two".into()),
                ..Safety::default()
            },
            ..serde_json::from_value(serde_json::json!({
                "threshold": {"count": 1, "window": "1m"}, "action": "Cordon"
            }))
            .unwrap()
        };
        assert!(matches!(
            Rules::new(POLICY, &bad),
            Err(InvalidPolicy::MaxUnavailable(_))
        ));
    }

    #[test]
    fn the_cooldown_holds_back_the_next_action_and_says_until_when() {
        let rules = rules(Action::Cordon, |s| {
            s.safety.max_unavailable = IntOrString::Int(5);
            s.safety.cooldown = "10m".into();
        });
        let plan = plan(&rules, &[node("a", &[60, 30]), node("b", &[60, 30])], now());
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(
            states(&plan)[1],
            ("b", RemediationState::Blocked, Some(BlockReason::Cooldown))
        );
        assert_eq!(plan.wake_at, Some(now() + SignedDuration::from_mins(10)));
    }

    #[test]
    fn dry_run_and_paused_change_nothing() {
        let nodes = [node("a", &[60, 30])];
        let dry = plan(
            &rules(Action::Drain, |s| s.safety.dry_run = true),
            &nodes,
            now(),
        );
        assert!(dry.changes.is_empty() && dry.drains.is_empty());
        assert_eq!(states(&dry), [("a", RemediationState::WouldAct, None)]);
        assert!(
            dry.nodes[0]
                .reason
                .as_deref()
                .unwrap()
                .starts_with("would drain")
        );

        let paused = plan(
            &rules(Action::Cordon, |s| s.safety.paused = true),
            &nodes,
            now(),
        );
        assert!(paused.changes.is_empty());
        assert_eq!(
            states(&paused),
            [("a", RemediationState::Blocked, Some(BlockReason::Paused))]
        );
    }

    #[test]
    fn a_human_uncordon_is_respected_until_new_occurrences_cross_the_threshold() {
        let rules = rules(Action::Cordon, |_| {});
        let mut a = node("a", &[90, 60]);
        acted(&mut a, Action::Cordon, 50);
        a.unschedulable = false;
        let noticed = plan(&rules, std::slice::from_ref(&a), now());
        assert_eq!(noticed.changes.len(), 1);
        assert_eq!(
            noticed.changes[0].kind,
            ChangeKind::Release(ReleasedBy::Human)
        );
        assert_eq!(noticed.changes[0].unschedulable, None);
        assert!(noticed.nodes.is_empty());

        a.ledger = noticed.changes[0].ledger.clone();
        let again = plan(
            &rules,
            std::slice::from_ref(&a),
            now() + SignedDuration::from_secs(5),
        );
        assert!(again.changes.is_empty(), "the same reports: {again:?}");

        let newer = node("a", &[90, 60, -20, -30]);
        let a = NodeView {
            ledger: a.ledger,
            ..newer
        };
        let new = plan(&rules, &[a], now() + SignedDuration::from_secs(40));
        assert_eq!(new.changes[0].kind, ChangeKind::Remediate(Action::Cordon));
    }

    #[test]
    fn recovery_undoes_only_its_own_action_after_the_quiet_period_and_frees_budget() {
        let rules = rules(Action::Taint, |s| {
            s.recovery = Some(crds::policy::Recovery {
                uncordon_after: "5m".into(),
            });
        });
        let mut a = node("a", &[500, 400]);
        acted(&mut a, Action::Taint, 390);
        a.ledger.get_mut(POLICY).unwrap().taint = Some(rules.taint.clone());
        a.taints.push(rules.taint.clone());
        let waiting = node("b", &[60, 30]);

        let plan = plan(&rules, &[a.clone(), waiting.clone()], now());
        let release = &plan.changes[0];
        assert_eq!(release.kind, ChangeKind::Release(ReleasedBy::Recovery));
        assert_eq!(release.remove_taint.as_ref(), Some(&rules.taint));
        assert_eq!(release.unschedulable, None);
        assert_eq!(
            plan.changes[1].node, "b",
            "the freed budget goes to the next node"
        );

        // Not yet quiet long enough: nothing, and a wake-up when it will be.
        let mut recent = a.clone();
        recent.reports = node("a", &[500, 100]).reports;
        let early = super::plan(&rules, &[recent], now());
        assert!(early.changes.is_empty());
        assert_eq!(early.wake_at, Some(ago(100) + SignedDuration::from_mins(5)));
    }

    #[test]
    fn a_drain_that_runs_out_of_time_is_reported_blocked_and_stops() {
        let rules = rules(Action::Drain, |s| {
            s.drain = Some(crds::policy::DrainSpec {
                timeout: "2m".into(),
                grace_period_seconds: None,
                force: false,
                delete_empty_dir_data: false,
            })
        });
        let mut a = node("a", &[300, 200]);
        acted(&mut a, Action::Drain, 60);
        let running = plan(&rules, std::slice::from_ref(&a), now());
        assert_eq!(running.drains.len(), 1);
        assert_eq!(states(&running), [("a", RemediationState::Draining, None)]);

        let late = plan(&rules, &[a], now() + SignedDuration::from_mins(2));
        assert!(late.drains.is_empty());
        assert_eq!(late.changes[0].kind, ChangeKind::DrainTimedOut);
        assert_eq!(
            states(&late),
            [("a", RemediationState::Blocked, Some(BlockReason::Timeout))]
        );
    }

    #[test]
    fn a_new_drain_cordons_and_starts_evicting_at_once() {
        let plan = plan(
            &rules(Action::Drain, |_| {}),
            &[node("a", &[60, 30])],
            now(),
        );
        assert_eq!(plan.changes[0].unschedulable, Some(true));
        assert_eq!(plan.drains[0].node, "a");
        assert_eq!(
            plan.drains[0].deadline,
            now() + SignedDuration::from_mins(10)
        );
    }

    fn escalating(edit: impl FnOnce(&mut RemediationPolicySpec)) -> Rules {
        rules(Action::Drain, |s| {
            s.drain = Some(crds::policy::DrainSpec {
                timeout: "2m".into(),
                grace_period_seconds: None,
                force: false,
                delete_empty_dir_data: false,
            });
            s.escalation = Some(crds::policy::Escalation {
                reboot: crds::policy::RebootEscalation {
                    hang_condition: "ProcessHung".into(),
                    max_concurrent: 1,
                    timeout: "15m".into(),
                },
            });
            s.safety.max_unavailable = IntOrString::Int(5);
            edit(s);
        })
    }

    /// A node whose drain (started 700 s ago, 2 m timeout) timed out with ProcessHung True.
    fn hung_after_drain(name: &str, boot: &str) -> NodeView {
        let mut node = node(name, &[900, 800]);
        acted(&mut node, Action::Drain, 700);
        node.ledger.get_mut(POLICY).unwrap().drain = Some(DrainPhase::TimedOut);
        node.boot_id = Some(boot.into());
        node.true_conditions = vec!["Ready".into(), "ProcessHung".into()];
        node
    }

    /// `node` after `change` was written.
    fn written(node: &NodeView, change: &Change) -> NodeView {
        let mut node = node.clone();
        node.ledger = change.ledger.clone();
        if let Some(order) = &change.reboot_order {
            node.reboot_order = order.clone();
        }
        node
    }

    fn step(plan: &Plan, node: &str) -> RebootStep {
        let change = plan.changes.iter().find(|c| c.node == node).unwrap();
        change.ledger[POLICY].reboot.clone().unwrap()
    }

    #[test]
    fn a_drain_that_timed_out_with_the_hang_present_orders_a_reboot_of_that_boot() {
        let rules = escalating(|_| {});
        let plan = plan(&rules, &[hung_after_drain("a", "boot-1")], now());
        assert_eq!(plan.changes.len(), 1, "{plan:?}");
        let change = &plan.changes[0];
        assert_eq!(change.kind, ChangeKind::RebootOrdered);
        let order: crds::node::RebootOrder =
            serde_json::from_str(change.reboot_order.clone().unwrap().unwrap().as_str()).unwrap();
        assert_eq!(
            order,
            crds::node::RebootOrder {
                policy: POLICY.into(),
                boot_id: "boot-1".into(),
                at: "2026-11-24T12:00:00Z".into()
            }
        );
        let step = step(&plan, "a");
        assert_eq!((step.phase, step.ordered_at), (RebootPhase::Ordered, now()));
        assert_eq!(states(&plan), [("a", RemediationState::Rebooting, None)]);
        assert_eq!(plan.hung_after_drain, 1);
        assert_eq!(plan.wake_at, Some(now() + SignedDuration::from_mins(15)));
    }

    #[test]
    fn the_drain_timing_out_is_written_before_the_reboot_is_decided() {
        let rules = escalating(|_| {});
        let mut a = hung_after_drain("a", "boot-1");
        a.ledger.get_mut(POLICY).unwrap().drain = Some(DrainPhase::Draining);
        let plan = plan(&rules, &[a], now());
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(plan.changes[0].kind, ChangeKind::DrainTimedOut);
        assert_eq!(plan.changes[0].reboot_order, None);
        assert_eq!(plan.wake_at, Some(now()), "the next rung right after");
    }

    #[test]
    fn a_node_whose_hang_cleared_is_never_rebooted() {
        let rules = escalating(|_| {});
        let mut a = hung_after_drain("a", "boot-1");
        a.true_conditions = vec!["Ready".into()];
        let plan = plan(&rules, &[a.clone()], now());
        assert!(plan.changes.is_empty(), "{plan:?}");
        assert_eq!(
            states(&plan),
            [("a", RemediationState::Blocked, Some(BlockReason::Timeout))]
        );
        assert_eq!(plan.hung_after_drain, 0);

        // Ordered, then the hang clears before the agent acts: the order is withdrawn.
        let ordered = super::plan(&rules, &[hung_after_drain("a", "boot-1")], now());
        let mut cleared = written(&hung_after_drain("a", "boot-1"), &ordered.changes[0]);
        cleared.true_conditions.clear();
        let later = super::plan(&rules, &[cleared], now() + SignedDuration::from_secs(30));
        assert_eq!(later.changes[0].kind, ChangeKind::RebootCancelled);
        assert_eq!(later.changes[0].reboot_order, Some(None));
        assert_eq!(step(&later, "a").phase, RebootPhase::Cancelled);
    }

    #[test]
    fn a_node_a_human_uncordoned_is_never_rebooted_and_its_order_is_withdrawn() {
        let rules = escalating(|_| {});
        let mut a = hung_after_drain("a", "boot-1");
        a.unschedulable = false;
        let plan = plan(&rules, &[a], now());
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(plan.changes[0].kind, ChangeKind::Release(ReleasedBy::Human));
        assert_eq!(plan.changes[0].reboot_order, None, "no order to withdraw");

        let ordered = super::plan(&rules, &[hung_after_drain("a", "boot-1")], now());
        let mut uncordoned = written(&hung_after_drain("a", "boot-1"), &ordered.changes[0]);
        uncordoned.unschedulable = false;
        let later = super::plan(&rules, &[uncordoned], now() + SignedDuration::from_secs(30));
        assert_eq!(later.changes.len(), 1);
        assert_eq!(
            later.changes[0].kind,
            ChangeKind::Release(ReleasedBy::Human)
        );
        assert_eq!(later.changes[0].reboot_order, Some(None));
        assert_eq!(step(&later, "a").phase, RebootPhase::Cancelled);

        // In dry run a human's uncordon is not written, and still nothing would reboot.
        let mut dry_uncordoned = hung_after_drain("a", "boot-1");
        dry_uncordoned.unschedulable = false;
        let dry = super::plan(
            &escalating(|s| s.safety.dry_run = true),
            &[dry_uncordoned],
            now(),
        );
        assert!(dry.changes.is_empty());
        assert!(
            dry.nodes
                .iter()
                .all(|n| n.state != RemediationState::WouldAct)
        );
    }

    #[test]
    fn a_new_boot_id_closes_the_step_with_success_and_its_duration() {
        let rules = escalating(|_| {});
        let ordered = plan(&rules, &[hung_after_drain("a", "boot-1")], now());
        let mut back = written(&hung_after_drain("a", "boot-1"), &ordered.changes[0]);
        back.boot_id = Some("boot-2".into());
        // After the reboot the agent finds no hung process.
        back.true_conditions = vec!["Ready".into()];
        let at = now() + SignedDuration::from_secs(95);
        let done = plan(&rules, std::slice::from_ref(&back), at);
        assert_eq!(done.changes.len(), 1, "{done:?}");
        assert_eq!(done.changes[0].kind, ChangeKind::Rebooted);
        assert_eq!(done.changes[0].reboot_order, Some(None), "order withdrawn");
        let step = step(&done, "a");
        assert_eq!(step.phase, RebootPhase::Rebooted);
        assert_eq!(step.new_boot_id.as_deref(), Some("boot-2"));
        assert_eq!(step.seconds, Some(95.0));
        assert_eq!(step.ended_at, Some(at));
        assert_eq!(states(&done), [("a", RemediationState::Rebooted, None)]);

        // Hung again after the reboot: this remediation does not reboot twice.
        let mut again = written(&back, &done.changes[0]);
        again.true_conditions = vec!["ProcessHung".into()];
        let later = plan(&rules, &[again], at + SignedDuration::from_mins(30));
        assert!(later.changes.is_empty(), "{later:?}");
    }

    #[test]
    fn a_node_that_does_not_come_back_in_time_fails_the_step() {
        let rules = escalating(|_| {});
        let ordered = plan(&rules, &[hung_after_drain("a", "boot-1")], now());
        let stuck = written(&hung_after_drain("a", "boot-1"), &ordered.changes[0]);
        let waiting = plan(
            &rules,
            std::slice::from_ref(&stuck),
            now() + SignedDuration::from_mins(14),
        );
        assert!(waiting.changes.is_empty());
        assert_eq!(states(&waiting), [("a", RemediationState::Rebooting, None)]);
        let late = plan(&rules, &[stuck], now() + SignedDuration::from_mins(15));
        assert_eq!(late.changes[0].kind, ChangeKind::RebootTimedOut);
        assert_eq!(late.changes[0].reboot_order, Some(None));
        assert_eq!(
            states(&late),
            [("a", RemediationState::Blocked, Some(BlockReason::Timeout))]
        );
    }

    #[test]
    fn at_most_max_concurrent_nodes_of_a_policy_reboot_at_once() {
        let rules = escalating(|_| {});
        let nodes = [
            hung_after_drain("a", "boot-a"),
            hung_after_drain("b", "boot-b"),
        ];
        let first = plan(&rules, &nodes, now());
        assert_eq!(first.changes.len(), 1);
        assert_eq!(
            states(&first),
            [
                ("a", RemediationState::Rebooting, None),
                (
                    "b",
                    RemediationState::Blocked,
                    Some(BlockReason::RebootLimit)
                ),
            ]
        );
        // While a reboots, b waits; once a is back, b goes.
        let a = written(&nodes[0], &first.changes[0]);
        let still = plan(
            &rules,
            &[a.clone(), nodes[1].clone()],
            now() + SignedDuration::from_secs(30),
        );
        assert!(still.changes.is_empty());
        let mut a_back = a;
        a_back.boot_id = Some("boot-a2".into());
        let next = plan(
            &rules,
            &[a_back, nodes[1].clone()],
            now() + SignedDuration::from_secs(60),
        );
        let kinds: Vec<_> = next
            .changes
            .iter()
            .map(|c| (c.node.as_str(), c.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                ("a", ChangeKind::Rebooted),
                ("b", ChangeKind::RebootOrdered)
            ]
        );
        // Two at once when the policy says so.
        let two = plan(
            &escalating(|s| s.escalation.as_mut().unwrap().reboot.max_concurrent = 2),
            &nodes,
            now(),
        );
        assert_eq!(two.changes.len(), 2);
    }

    #[test]
    fn a_node_without_a_boot_id_is_not_rebooted() {
        let mut a = hung_after_drain("a", "");
        a.boot_id = None;
        let plan = plan(&escalating(|_| {}), &[a], now());
        assert!(plan.changes.is_empty());
        assert_eq!(
            states(&plan),
            [("a", RemediationState::Blocked, Some(BlockReason::NoBootId))]
        );
    }

    #[test]
    fn escalation_follows_only_a_drain() {
        let mut spec = serde_json::from_value::<RemediationPolicySpec>(serde_json::json!({
            "threshold": {"count": 1, "window": "1m"}, "action": "Cordon",
            "escalation": {"reboot": {}}
        }))
        .unwrap();
        assert_eq!(
            Rules::new(POLICY, &spec),
            Err(InvalidPolicy::EscalationNeedsDrain)
        );
        spec.action = Action::Drain;
        let rules = Rules::new(POLICY, &spec).unwrap();
        let reboot = rules.reboot.unwrap();
        assert_eq!(
            (
                reboot.hang_condition.as_str(),
                reboot.max_concurrent,
                reboot.timeout
            ),
            ("ProcessHung", 1, Duration::from_secs(900)),
            "the documented defaults"
        );
    }

    /// Every rail on every rung: the cordon (action Cordon), the drain (action Drain) and
    /// the reboot (a timed-out drain with the hang present). Paused and dry run change
    /// nothing, the budget and the cooldown hold each rung back, and the same node with no
    /// rail in the way acts.
    #[test]
    fn every_rail_holds_on_every_rung() {
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Rung {
            Cordon,
            Drain,
            Reboot,
        }
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum Rail {
            None,
            Paused,
            DryRun,
            Budget,
            Cooldown,
        }
        for rung in [Rung::Cordon, Rung::Drain, Rung::Reboot] {
            for rail in [
                Rail::None,
                Rail::Paused,
                Rail::DryRun,
                Rail::Budget,
                Rail::Cooldown,
            ] {
                let edit = |s: &mut RemediationPolicySpec| {
                    s.safety.max_unavailable = IntOrString::Int(1);
                    match rail {
                        Rail::Paused => s.safety.paused = true,
                        Rail::DryRun => s.safety.dry_run = true,
                        Rail::Cooldown => s.safety.cooldown = "1h".into(),
                        Rail::None | Rail::Budget => {}
                    }
                };
                let rules = match rung {
                    Rung::Cordon => rules(Action::Cordon, edit),
                    Rung::Drain => rules(Action::Drain, edit),
                    Rung::Reboot => escalating(edit),
                };
                let mut nodes = vec![match rung {
                    Rung::Reboot => hung_after_drain("a", "boot-1"),
                    _ => node("a", &[60, 30]),
                }];
                if rail == Rail::Budget {
                    // Someone else's cordon: one more unavailable node than the budget
                    // allows, counting a itself once it is (or is going to be) cordoned.
                    let mut other = node("other", &[]);
                    other.unschedulable = true;
                    nodes.push(other);
                }
                if rail == Rail::Cooldown {
                    // This policy acted on another node 10 minutes ago.
                    let mut other = node("other", &[]);
                    other.ledger.insert(
                        POLICY.into(),
                        Record {
                            action: Action::Taint,
                            at: ago(600),
                            cordoned: false,
                            taint: None,
                            drain: None,
                            reboot: None,
                            released: None,
                        },
                    );
                    nodes.push(other);
                }
                let plan = plan(&rules, &nodes, now());
                let a = plan.nodes.iter().find(|n| n.name == "a").cloned();
                let acted = plan.changes.iter().any(|c| c.node == "a");
                let reason = a
                    .as_ref()
                    .and_then(|a| a.reason.as_deref())
                    .and_then(BlockReason::of_status);
                let what = format!("{rung:?} with {rail:?}: {plan:?}");
                match rail {
                    Rail::None => assert!(acted, "{what}"),
                    Rail::Paused => {
                        assert!(!acted, "{what}");
                        assert_eq!(reason, Some(BlockReason::Paused), "{what}");
                    }
                    Rail::DryRun => {
                        assert!(!acted && plan.drains.is_empty(), "{what}");
                        assert_eq!(a.unwrap().state, RemediationState::WouldAct, "{what}");
                    }
                    Rail::Budget => {
                        assert!(!acted, "{what}");
                        assert_eq!(reason, Some(BlockReason::Budget), "{what}");
                    }
                    Rail::Cooldown => {
                        assert!(!acted, "{what}");
                        assert_eq!(reason, Some(BlockReason::Cooldown), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn pausing_or_a_dry_run_withdraws_an_outstanding_order() {
        let ordered = plan(
            &escalating(|_| {}),
            &[hung_after_drain("a", "boot-1")],
            now(),
        );
        let a = written(&hung_after_drain("a", "boot-1"), &ordered.changes[0]);
        for edit in [
            (|s: &mut RemediationPolicySpec| s.safety.paused = true)
                as fn(&mut RemediationPolicySpec),
            |s: &mut RemediationPolicySpec| s.safety.dry_run = true,
        ] {
            let later = plan(
                &escalating(edit),
                std::slice::from_ref(&a),
                now() + SignedDuration::from_secs(10),
            );
            assert_eq!(later.changes.len(), 1, "{later:?}");
            assert_eq!(later.changes[0].kind, ChangeKind::RebootCancelled);
            assert_eq!(later.changes[0].reboot_order, Some(None));
        }
    }
}
