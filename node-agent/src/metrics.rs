//! The agent's Prometheus metrics (names are a contract with the chart's alerts and dashboard).

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// At most this many distinct `(kind, process, module)` label sets: process and module
/// names come from whatever crashes, so an attacker could otherwise grow the series forever.
const MAX_CRASH_SERIES: usize = 1000;
/// The label value used once the budget is spent.
const OTHER: &str = "_other";

/// Every metric the agent exports.
pub struct AgentMetrics {
    registry: Registry,
    crashes: IntCounterVec,
    hung_tasks: IntCounterVec,
    /// Kernel records read from `/dev/kmsg`.
    pub kmsg_records: IntCounter,
    /// Kernel records overwritten before the agent read them.
    pub kmsg_records_lost: IntCounter,
    /// Records user space wrote into the kernel log, ignored.
    pub kmsg_records_untrusted: IntCounter,
    /// Kernel records that are not valid kmsg records.
    pub kmsg_records_malformed: IntCounter,
    /// Crash reports the kernel's rate limit dropped.
    pub crashes_suppressed: IntCounter,
    /// Times the kernel announced it stops printing hung-task reports.
    pub hung_task_reports_suppressed: IntCounter,
    /// Time spent symbolizing one event.
    pub symbolization_seconds: Histogram,
    /// Symbolization failures by reason.
    pub symbolization_failures: IntCounterVec,
    /// CrashReport writes by result.
    pub reports_published: IntCounterVec,
    /// Whether the kmsg reader is running (1) or not (0).
    pub kmsg_reader_up: IntGauge,
    /// Whether the last request to the API server succeeded (1) or not (0).
    pub api_up: IntGauge,
    /// Occurrences waiting to be written as CrashReports.
    pub reports_pending: IntGauge,
    /// Whether the agent is the kernel's core handler (1) or not (0).
    pub core_handler_installed: IntGauge,
    /// Crashes whose event came from the core handler.
    pub core_dumps_handled: IntCounter,
    /// Spool files that held no readable event, removed.
    pub core_dumps_unreadable: IntCounter,
    crash_series: Mutex<HashSet<(String, String, String)>>,
}

impl AgentMetrics {
    /// Creates and registers every metric, labelled with `node`.
    pub fn new(node: &str) -> Self {
        let registry = Registry::new();
        let node_opts = |name: &str, help: &str| Opts::new(name, help).const_label("node", node);
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(node_opts(name, help)).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(node_opts(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(node_opts(name, help)).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let metrics = AgentMetrics {
            crashes: counter_vec(
                "crashwatch_crashes_total",
                "User-space crashes recognised, by kind, process and module.",
                &["kind", "process", "module"],
            ),
            hung_tasks: counter_vec(
                "crashwatch_hung_tasks_total",
                "Hung-task episodes recognised, by process.",
                &["process"],
            ),
            kmsg_records: counter("crashwatch_kmsg_records_total", "Kernel log records read."),
            kmsg_records_lost: counter(
                "crashwatch_kmsg_records_lost_total",
                "Kernel log records overwritten before they were read.",
            ),
            kmsg_records_untrusted: counter(
                "crashwatch_kmsg_records_untrusted_total",
                "Records written into the kernel log by user space, ignored.",
            ),
            kmsg_records_malformed: counter(
                "crashwatch_kmsg_records_malformed_total",
                "Records that could not be parsed.",
            ),
            crashes_suppressed: counter(
                "crashwatch_crashes_suppressed_total",
                "Crash reports dropped by the kernel's printk rate limit.",
            ),
            hung_task_reports_suppressed: counter(
                "crashwatch_hung_task_reports_suppressed_total",
                "Times the kernel stopped printing hung-task reports.",
            ),
            symbolization_seconds: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "crashwatch_symbolization_seconds",
                        "Time to symbolize one event.",
                    )
                    .const_label("node", node)
                    .buckets(vec![0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0]),
                )
                .expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            symbolization_failures: counter_vec(
                "crashwatch_symbolization_failures_total",
                "Symbolization failures, by reason.",
                &["reason"],
            ),
            reports_published: counter_vec(
                "crashwatch_reports_published_total",
                "CrashReport writes, by result.",
                &["result"],
            ),
            kmsg_reader_up: gauge(
                "crashwatch_kmsg_reader_up",
                "1 while the kernel log reader runs.",
            ),
            api_up: gauge(
                "crashwatch_api_up",
                "1 when the last request to the API server succeeded (publishing agents only).",
            ),
            reports_pending: gauge(
                "crashwatch_reports_pending",
                "Occurrences waiting to be written as CrashReports.",
            ),
            core_handler_installed: gauge(
                "crashwatch_core_handler_installed",
                "1 while the agent is the kernel's core_pattern handler.",
            ),
            core_dumps_handled: counter(
                "crashwatch_core_dumps_handled_total",
                "Crashes reported with the core handler's stack and pod.",
            ),
            core_dumps_unreadable: counter(
                "crashwatch_core_dumps_unreadable_total",
                "Spooled core handler events that could not be read, removed.",
            ),
            crash_series: Mutex::new(HashSet::new()),
            registry,
        };
        let build_info = IntCounterVec::new(
            node_opts("crashwatch_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .inc();
        metrics
            .registry
            .register(Box::new(build_info))
            .expect("unique metric");
        metrics
    }

    /// Counts one user-space crash.
    pub fn count_crash(&self, kind: &str, process: &str, module: &str) {
        let key = (kind.to_owned(), process.to_owned(), module.to_owned());
        let admitted = {
            let mut series = self.crash_series.lock().expect("metrics lock");
            series.contains(&key) || series.len() < MAX_CRASH_SERIES && series.insert(key)
        };
        let labels = if admitted {
            [kind, process, module]
        } else {
            [kind, OTHER, OTHER]
        };
        self.crashes.with_label_values(&labels).inc();
    }

    /// Counts one hung-task episode.
    pub fn count_hung_task(&self, process: &str) {
        self.hung_tasks.with_label_values(&[process]).inc();
    }

    /// The registry, for metrics kept elsewhere (the Node condition writer's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition format of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding cannot fail");
        String::from_utf8(buffer).expect("exposition is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_series_are_bounded() {
        let metrics = AgentMetrics::new("n1");
        for i in 0..MAX_CRASH_SERIES + 50 {
            metrics.count_crash("Segfault", &format!("p{i}"), "m");
        }
        let text = metrics.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("crashwatch_crashes_total{"))
            .count();
        assert_eq!(series, MAX_CRASH_SERIES + 1);
        assert!(text.contains(r#"crashwatch_crashes_total{kind="Segfault",module="_other",node="n1",process="_other"} 50"#), "{text}");
    }
}
