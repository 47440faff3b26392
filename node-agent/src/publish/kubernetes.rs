//! Publishing CrashReports: events go into a bounded [`Outbox`], and a writer task turns
//! it into server-side applies, at most one write per object per interval.
//!
//! While the API server is unreachable, the outbox keeps what it can hold (the overflow is
//! counted) and the kmsg cursor stays before the oldest unwritten occurrence, so neither
//! an outage nor an agent restart loses a report.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crds::{CrashEvent, CrashReport};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use serde_json::json;

use super::Publish;
use super::outbox::{Outbox, merge_status};
use crate::metrics::AgentMetrics;

/// The field manager of every write.
const FIELD_MANAGER: &str = "crashwatch-agent";
/// How often an idle agent checks that the API server answers.
const PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// A name no report has: getting it is the cheapest authorized request.
const PROBE_NAME: &str = "crashwatch-readiness-probe";

/// Accepts events into the shared outbox.
pub struct KubePublisher {
    outbox: Arc<Mutex<Outbox>>,
    metrics: Arc<AgentMetrics>,
}

impl KubePublisher {
    /// A publisher feeding `outbox`.
    pub fn new(outbox: Arc<Mutex<Outbox>>, metrics: Arc<AgentMetrics>) -> KubePublisher {
        KubePublisher { outbox, metrics }
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
        Ok(())
    }

    fn oldest_undelivered_seq(&self) -> Option<u64> {
        self.outbox.lock().expect("outbox lock").oldest_seq()
    }
}

/// Writes the outbox to the API server every `interval`, until the process ends.
pub async fn write_loop(
    client: Client,
    outbox: Arc<Mutex<Outbox>>,
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
    let mut last_probe = Instant::now() - PROBE_INTERVAL;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let batch = outbox.lock().expect("outbox lock").snapshot();
        // With nothing to write, a cheap request now and then keeps readiness true to
        // the API server's state.
        if batch.is_empty() && last_probe.elapsed() >= PROBE_INTERVAL.min(interval * 5) {
            last_probe = Instant::now();
            let reachable = api.get_opt(PROBE_NAME).await.is_ok();
            metrics.api_up.set(i64::from(reachable));
        }
        for (name, pending) in batch {
            match write_one(&api, &name, &pending, &boot_id).await {
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
                            secondary: Some(report_reference(&name)),
                        };
                        if let Err(err) = recorder.publish(&event, &node_ref).await {
                            tracing::warn!(%err, "cannot record an Event on the Node");
                        }
                    }
                    let mut outbox = outbox.lock().expect("outbox lock");
                    outbox.written(&name, pending.occurrences.len());
                    metrics.reports_pending.set(outbox.len() as i64);
                }
                Err(err) => {
                    metrics
                        .reports_published
                        .with_label_values(&["error"])
                        .inc();
                    metrics.api_up.set(0);
                    tracing::warn!(%err, report = %name, "cannot write a CrashReport; will retry");
                    break; // the server is likely down: wait for the next tick
                }
            }
        }
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
    pending: &super::outbox::Pending,
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
