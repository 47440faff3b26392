//! The operator's Prometheus metrics (names are a contract with the chart's alerts and
//! dashboard).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the operator exports.
pub struct OperatorMetrics {
    registry: Registry,
    /// Node writes by action (`Cordon`, `Taint`, `Drain`, `Recover`, `ReleaseByUser`,
    /// `DrainTimeout`, `DrainComplete`, and the escalation's `Reboot`, `RebootComplete`,
    /// `RebootTimeout`, `RebootCancel`) and result (`success`, `error`, `dry_run`).
    pub remediations: IntCounterVec,
    /// Remediations held back, by reason (`budget`, `cooldown`, `paused`, `pdb`, `timeout`).
    pub remediations_blocked: IntCounterVec,
    /// Nodes with a remediation in force.
    pub nodes_remediated: IntGauge,
    /// How long one reconcile of one policy takes.
    pub reconcile_seconds: Histogram,
    /// 1 while this process holds the leader Lease.
    pub leader: IntGauge,
    /// CrashReports that do not decode, each counted once (they are skipped).
    pub reports_undecodable: IntCounter,
    /// CrashReports the operator deleted, by reason (`expired`, `over_cap`).
    pub reports_deleted: IntCounterVec,
    /// Pod watches open for draining nodes.
    pub drain_pod_watches: IntGauge,
    /// From a reboot order to the node's new boot id.
    pub reboot_seconds: Histogram,
    /// Nodes whose drain timed out while the hang is still present, by policy.
    pub hung_after_drain: IntGaugeVec,
}

impl OperatorMetrics {
    /// Creates and registers every metric.
    pub fn new() -> OperatorMetrics {
        let registry = Registry::new();
        let remediations = IntCounterVec::new(
            Opts::new(
                "crashwatch_remediations_total",
                "Node remediations by action and result",
            ),
            &["action", "result"],
        )
        .unwrap();
        let remediations_blocked = IntCounterVec::new(
            Opts::new(
                "crashwatch_remediations_blocked_total",
                "Remediations held back by a safety rail or a disruption budget, by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let nodes_remediated = IntGauge::new(
            "crashwatch_nodes_remediated",
            "Nodes with a crashwatch remediation in force",
        )
        .unwrap();
        let reconcile_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "crashwatch_reconcile_seconds",
                "Time to reconcile one policy",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
        )
        .unwrap();
        let leader = IntGauge::new(
            "crashwatch_operator_leader",
            "1 while this operator process holds the leader Lease",
        )
        .unwrap();
        registry.register(Box::new(remediations.clone())).unwrap();
        registry
            .register(Box::new(remediations_blocked.clone()))
            .unwrap();
        registry
            .register(Box::new(nodes_remediated.clone()))
            .unwrap();
        registry
            .register(Box::new(reconcile_seconds.clone()))
            .unwrap();
        let reports_undecodable = IntCounter::new(
            "crashwatch_reports_undecodable_total",
            "CrashReports the operator cannot decode and skips, each counted once",
        )
        .unwrap();
        let reports_deleted = IntCounterVec::new(
            Opts::new(
                "crashwatch_reports_deleted_total",
                "CrashReports deleted by retention, by reason (expired, over_cap)",
            ),
            &["reason"],
        )
        .unwrap();
        let drain_pod_watches = IntGauge::new(
            "crashwatch_drain_pod_watches",
            "Pod watches open, one per node being drained",
        )
        .unwrap();
        registry
            .register(Box::new(drain_pod_watches.clone()))
            .unwrap();
        registry.register(Box::new(leader.clone())).unwrap();
        registry
            .register(Box::new(reports_undecodable.clone()))
            .unwrap();
        registry
            .register(Box::new(reports_deleted.clone()))
            .unwrap();
        let reboot_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "crashwatch_reboot_seconds",
                "From a reboot order to the node's new boot id",
            )
            .buckets(vec![10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]),
        )
        .unwrap();
        let hung_after_drain = IntGaugeVec::new(
            Opts::new(
                "crashwatch_nodes_hung_after_drain",
                "Nodes whose drain timed out while the hang condition is still True (not rebooted since), by policy",
            ),
            &["policy"],
        )
        .unwrap();
        registry.register(Box::new(reboot_seconds.clone())).unwrap();
        registry
            .register(Box::new(hung_after_drain.clone()))
            .unwrap();
        OperatorMetrics {
            reboot_seconds,
            hung_after_drain,
            registry,
            remediations,
            remediations_blocked,
            nodes_remediated,
            reconcile_seconds,
            leader,
            reports_undecodable,
            reports_deleted,
            drain_pod_watches,
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        OperatorMetrics::new()
    }
}
