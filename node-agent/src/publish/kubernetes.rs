//! Publishing CrashReports: events go into a bounded [`Outbox`], and a writer task turns
//! it into server-side applies, at most one write per object per interval: the first
//! occurrence of a fingerprint is written at once, repeats within an interval together.
//! A write the server refuses for good (admission, invalid, too large) drops that report's
//! occurrences, is counted as `rejected`, and does not hold up the others.
//!
//! While the API server is unreachable, the outbox keeps what it can hold (the overflow is
//! counted) and the kmsg cursor stays before the oldest unwritten occurrence, so neither
//! an outage nor an agent restart loses a report.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crds::{CrashEvent, CrashReport};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use serde_json::json;
use tokio::sync::Notify;

use super::Publish;
use super::outbox::{Outbox, Pending, merge_status};
use crate::metrics::AgentMetrics;

/// The field manager of every write.
const FIELD_MANAGER: &str = "crashwatch-agent";
/// How often an idle agent checks that the API server answers.
const PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// A name no report has: getting it is the cheapest authorized request.
const PROBE_NAME: &str = "crashwatch-readiness-probe";

/// Accepts events into the shared outbox, and wakes the writer.
pub struct KubePublisher {
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<Notify>,
    metrics: Arc<AgentMetrics>,
}

impl KubePublisher {
    /// A publisher feeding `outbox` and waking the [`write_loop`] through `wake`.
    pub fn new(
        outbox: Arc<Mutex<Outbox>>,
        wake: Arc<Notify>,
        metrics: Arc<AgentMetrics>,
    ) -> KubePublisher {
        KubePublisher {
            outbox,
            wake,
            metrics,
        }
    }
}

impl Publish for KubePublisher {
    fn publish(&mut self, event: &CrashEvent) -> io::Result<()> {
        let mut outbox = self.outbox.lock().expect("outbox lock");
        if !outbox.add(event) {
            self.metrics
                .reports_published
                .with_label_values(&["dropped"])
                .inc();
            tracing::error!(
                held = outbox.len(),
                "the report outbox is full (is the API server down?); dropping an occurrence"
            );
        }
        self.metrics.reports_pending.set(outbox.len() as i64);
        self.wake.notify_one();
        Ok(())
    }

    fn oldest_undelivered_seq(&self) -> Option<u64> {
        self.outbox.lock().expect("outbox lock").oldest_seq()
    }

    fn has_undelivered_without_seq(&self) -> bool {
        self.outbox.lock().expect("outbox lock").holds_unsequenced()
    }
}

/// Whether a failed write may succeed when retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server is unreachable, overloaded, or refused for now: retry the report.
    Transient,
    /// The server refused this object for good (admission, invalid, too large): retrying
    /// the same object fails again, so its occurrences are dropped.
    Permanent,
}

/// Classifies an API server answer by its HTTP status code and message.
pub fn classify_status(code: u16, message: &str) -> Failure {
    let admission_denial = message.contains("denied")
        && (message.contains("admission") || message.contains("ValidatingAdmissionPolicy"));
    match code {
        // Bad request, entity too large, invalid (also a ValidatingAdmissionPolicy's default).
        400 | 413 | 422 => Failure::Permanent,
        // An admission denial with reason Forbidden; RBAC's 403 may be fixed by an install.
        403 if admission_denial => Failure::Permanent,
        // etcd refused the object's size (older API servers say so with a 500).
        500 if message.contains("request is too large") => Failure::Permanent,
        _ => Failure::Transient,
    }
}

/// Classifies a failed request.
pub fn classify(err: &kube::Error) -> Failure {
    match err {
        kube::Error::Api(status) => classify_status(status.code, &status.message),
        kube::Error::SerdeError(_) => Failure::Permanent,
        _ => Failure::Transient,
    }
}

/// When each report may be written (pure): a report not written within the last interval
/// is written at once, so the first occurrence of a fingerprint goes out without delay;
/// repeats within an interval wait for its end and go out together.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    last_write: HashMap<String, Instant>,
    /// When the API server was last probed; None before the first probe.
    last_probe: Option<Instant>,
}

impl Pacer {
    /// A pacer allowing one write per report per `interval`.
    pub fn new(interval: Duration) -> Pacer {
        Pacer {
            interval,
            last_write: HashMap::new(),
            last_probe: None,
        }
    }

    /// When `name` may be written next: None when it may be written now.
    fn not_before(&self, name: &str, now: Instant) -> Option<Instant> {
        let next = self.last_write.get(name)?.checked_add(self.interval)?;
        (next > now).then_some(next)
    }

    /// Whether `name` may be written at `now`.
    pub fn is_due(&self, name: &str, now: Instant) -> bool {
        self.not_before(name, now).is_none()
    }

    /// The earliest time one of `names` that is not due at `now` becomes due.
    pub fn next_due<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) -> Option<Instant> {
        names
            .into_iter()
            .filter_map(|name| self.not_before(name, now))
            .min()
    }

    /// Records a write of `name` at `at`, and forgets reports idle for a whole interval.
    pub fn wrote(&mut self, name: &str, at: Instant) {
        let interval = self.interval;
        self.last_write
            .retain(|_, last| at.saturating_duration_since(*last) < interval);
        self.last_write.insert(name.to_owned(), at);
    }

    /// Whether the API server should be probed at `now`, probing every `every`: always
    /// before the first probe, whatever the clock reads (it may be near zero after boot).
    pub fn probe_due(&self, now: Instant, every: Duration) -> bool {
        self.last_probe
            .is_none_or(|last| now.saturating_duration_since(last) >= every)
    }

    /// Records a probe at `at`.
    pub fn probed(&mut self, at: Instant) {
        self.last_probe = Some(at);
    }

    /// When the next probe is due, probing every `every`.
    pub fn next_probe(&self, every: Duration) -> Option<Instant> {
        self.last_probe?.checked_add(every)
    }
}

/// Writes the outbox to the API server until the process ends: a report as soon as `wake`
/// says it has news and the [`Pacer`] allows it.
pub async fn write_loop(
    client: Client,
    outbox: Arc<Mutex<Outbox>>,
    wake: Arc<Notify>,
    node: String,
    boot_id: String,
    interval: Duration,
    metrics: Arc<AgentMetrics>,
) {
    let api: Api<CrashReport> = Api::all(client.clone());
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(node.clone()),
        },
    );
    let node_ref = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.clone()),
        ..ObjectReference::default()
    };
    let probe_every = PROBE_INTERVAL.min(interval * 5);
    let mut pacer = Pacer::new(interval);
    loop {
        let now = Instant::now();
        // Only what is due is copied: during a storm of repeats, a wake-up costs little.
        let (batch, idle) = {
            let outbox = outbox.lock().expect("outbox lock");
            let batch = outbox.snapshot_where(|name| pacer.is_due(name, now));
            (batch, outbox.is_empty())
        };
        // With nothing to write, a cheap request now and then keeps readiness true to
        // the API server's state.
        if idle && pacer.probe_due(now, probe_every) {
            pacer.probed(now);
            let reachable = api.get_opt(PROBE_NAME).await.is_ok();
            metrics.api_up.set(i64::from(reachable));
        }
        let mut server_down = false;
        for (name, pending) in &batch {
            let result = write_one(&api, name, pending, &boot_id).await;
            pacer.wrote(name, Instant::now());
            match result {
                Ok(added) => {
                    metrics
                        .reports_published
                        .with_label_values(&["success"])
                        .inc();
                    metrics.api_up.set(1);
                    if added > 0 {
                        let note = format!(
                            "{} ×{added}: {}",
                            crds::report::location(&pending.spec.event).unwrap_or_default(),
                            pending.spec.event.explanation.as_deref().unwrap_or(""),
                        );
                        let event = Event {
                            type_: EventType::Warning,
                            reason: pending.spec.event.kind.as_str().to_owned(),
                            note: Some(note.chars().take(1000).collect()),
                            action: "Reported".into(),
                            secondary: Some(report_reference(name)),
                        };
                        if let Err(err) = recorder.publish(&event, &node_ref).await {
                            tracing::warn!(%err, "cannot record an Event on the Node");
                        }
                        // Each new occurrence in a pod also goes to that Pod, so that
                        // `kubectl describe pod` shows why its container died.
                        let skip = pending.occurrences.len().saturating_sub(added);
                        for occurrence in &pending.occurrences[skip..] {
                            let Some(pod) = &occurrence.pod else { continue };
                            let event = pod_event(&pending.spec.event, name, occurrence);
                            if let Err(err) = recorder.publish(&event, &pod_reference(pod)).await {
                                tracing::warn!(%err, pod = %pod.name, "cannot record an Event on the Pod");
                            }
                        }
                    }
                    let mut outbox = outbox.lock().expect("outbox lock");
                    outbox.written(name, pending.occurrences.len());
                    metrics.reports_pending.set(outbox.len() as i64);
                }
                Err(err) if classify(&err) == Failure::Permanent => {
                    // The server answered, and will answer the same again: drop these
                    // occurrences (which also frees the kmsg cursor) and go on with the rest.
                    metrics
                        .reports_published
                        .with_label_values(&["rejected"])
                        .inc();
                    metrics.api_up.set(1);
                    tracing::error!(
                        %err,
                        report = %name,
                        occurrences = pending.occurrences.len(),
                        "the API server refused a CrashReport; dropping its occurrences"
                    );
                    let mut outbox = outbox.lock().expect("outbox lock");
                    outbox.written(name, pending.occurrences.len());
                    metrics.reports_pending.set(outbox.len() as i64);
                }
                Err(err) => {
                    metrics
                        .reports_published
                        .with_label_values(&["error"])
                        .inc();
                    metrics.api_up.set(0);
                    tracing::warn!(%err, report = %name, "cannot write a CrashReport; will retry");
                    server_down = true;
                    break; // the server is likely down: retry after an interval
                }
            }
        }
        let now = Instant::now();
        let wake_at = if server_down {
            now + interval
        } else {
            let next_write = pacer.next_due(outbox.lock().expect("outbox lock").names(), now);
            let next_probe = pacer.next_probe(probe_every);
            match (next_write, next_probe) {
                (Some(write), Some(probe)) => write.min(probe),
                (write, probe) => write.or(probe).unwrap_or(now + probe_every),
            }
        };
        let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(wake_at));
        if server_down {
            sleep.await;
        } else {
            tokio::select! {
                () = wake.notified() => {}
                () = sleep => {}
            }
        }
    }
}

/// The Warning Event for one occurrence in a pod: the kind as reason; the container, the
/// location and the explanation as the note.
fn pod_event(event: &CrashEvent, report: &str, occurrence: &crds::Occurrence) -> Event {
    let container = occurrence
        .container
        .as_ref()
        .and_then(|c| c.name.as_deref())
        .map(|c| format!("container {c}: "))
        .unwrap_or_default();
    let note = format!(
        "{container}{} at {}: {}",
        event.kind.as_str(),
        crds::report::location(event).unwrap_or_else(|| "an unknown location".into()),
        event.explanation.as_deref().unwrap_or(""),
    );
    Event {
        type_: EventType::Warning,
        reason: event.kind.as_str().to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "Crashed".into(),
        secondary: Some(report_reference(report)),
    }
}

fn pod_reference(pod: &crds::PodRef) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(pod.namespace.clone()),
        name: Some(pod.name.clone()),
        uid: pod.uid.clone(),
        ..ObjectReference::default()
    }
}

fn report_reference(name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(CrashReport::api_version(&()).into_owned()),
        kind: Some(CrashReport::kind(&()).into_owned()),
        name: Some(name.to_owned()),
        ..ObjectReference::default()
    }
}

/// Creates the report if needed and adds the new occurrences to its status. Returns how
/// many occurrences were counted (0 when all had been counted before a restart).
async fn write_one(
    api: &Api<CrashReport>,
    name: &str,
    pending: &Pending,
    boot_id: &str,
) -> Result<usize, kube::Error> {
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let existing = api.get_opt(name).await?;
    if existing.is_none() {
        let object = json!({
            "apiVersion": CrashReport::api_version(&()),
            "kind": CrashReport::kind(&()),
            "metadata": { "name": name },
            "spec": pending.spec,
        });
        api.patch(name, &apply, &Patch::Apply(&object)).await?;
    }
    let current = existing.as_ref().and_then(|r| r.status.as_ref());
    let Some(status) = merge_status(current, boot_id, &pending.occurrences) else {
        return Ok(0);
    };
    let added = status.count - current.map_or(0, |s| s.count);
    let object = json!({
        "apiVersion": CrashReport::api_version(&()),
        "kind": CrashReport::kind(&()),
        "metadata": { "name": name },
        "status": status,
    });
    api.patch_status(name, &apply, &Patch::Apply(&object))
        .await?;
    Ok(added as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_new_report_is_due_at_once_and_its_repeats_wait_for_the_interval() {
        let start = Instant::now();
        let mut pacer = Pacer::new(2 * SECOND);
        assert!(pacer.is_due("a", start), "never written: at once");
        pacer.wrote("a", start);
        let soon = start + SECOND / 2;
        assert!(
            !pacer.is_due("a", soon),
            "a repeat within the interval waits"
        );
        assert!(
            pacer.is_due("b", soon),
            "another fingerprint does not wait for a"
        );
        assert_eq!(
            pacer.next_due(["a", "b"], soon),
            Some(start + 2 * SECOND),
            "a becomes due one interval after its write"
        );
        assert!(pacer.is_due("a", start + 2 * SECOND));
        // Long idle: the next occurrence goes out at once too.
        pacer.wrote("b", start + 10 * SECOND);
        assert!(pacer.is_due("a", start + 10 * SECOND));
        assert_eq!(pacer.next_due(["a"], start + 10 * SECOND), None);
    }

    #[test]
    fn the_first_probe_is_due_whatever_the_monotonic_clock_reads() {
        // Shortly after boot, CLOCK_MONOTONIC is small; no "now - interval" is ever formed.
        let now = Instant::now();
        let mut pacer = Pacer::new(2 * SECOND);
        assert!(pacer.probe_due(now, 10 * SECOND));
        assert_eq!(pacer.next_probe(10 * SECOND), None);
        pacer.probed(now);
        assert!(!pacer.probe_due(now + 9 * SECOND, 10 * SECOND));
        assert!(pacer.probe_due(now + 10 * SECOND, 10 * SECOND));
        assert_eq!(pacer.next_probe(10 * SECOND), Some(now + 10 * SECOND));
    }

    #[test]
    fn refusals_for_good_are_told_from_failures_that_pass() {
        let vap = "crashreports.crashwatch.dev \"n.segfault.1\" is forbidden: ValidatingAdmissionPolicy 'only-own-node' with binding 'b' denied request: not your node";
        let rbac = "crashreports.crashwatch.dev \"n.segfault.1\" is forbidden: User \"system:serviceaccount:crashwatch:agent\" cannot patch resource \"crashreports\"";
        assert_eq!(classify_status(403, vap), Failure::Permanent);
        assert_eq!(
            classify_status(422, "is invalid: spec.comm: Too long"),
            Failure::Permanent
        );
        assert_eq!(
            classify_status(413, "Request entity too large"),
            Failure::Permanent
        );
        assert_eq!(classify_status(400, "bad request"), Failure::Permanent);
        assert_eq!(
            classify_status(500, "etcdserver: request is too large"),
            Failure::Permanent
        );
        assert_eq!(
            classify_status(403, rbac),
            Failure::Transient,
            "RBAC can be fixed"
        );
        for code in [401, 404, 409, 429, 500, 503, 504] {
            assert_eq!(
                classify_status(code, "try again"),
                Failure::Transient,
                "{code}"
            );
        }
        let status = kube::core::Status {
            code: 422,
            message: "denied".into(),
            ..kube::core::Status::default()
        };
        assert_eq!(
            classify(&kube::Error::Api(Box::new(status))),
            Failure::Permanent
        );
    }
}
