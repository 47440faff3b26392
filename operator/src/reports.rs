//! CrashReports as the operator caches them: only the metadata and facts that planning and
//! retention need, decoded one object at a time. An object that does not decode as a
//! CrashReport (stored before a stricter CRD was applied, or written by a newer agent) is
//! kept as an error of its own instead of failing the whole list or watch.

use std::borrow::Cow;

use crds::{CrashReportSpec, CrashReportStatus, EventKind};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::ClusterResourceScope;
use serde::{Deserialize, Deserializer};

use crate::policy::activity::ReportTimes;

/// One CrashReport, reduced to what the operator reads.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedReport {
    /// Name, uid and resourceVersion only.
    pub metadata: ObjectMeta,
    /// The facts, or why the object does not decode.
    pub facts: Result<ReportFacts, String>,
}

/// The pod a reported process ran in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOf {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// What planning and retention read of a report.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportFacts {
    /// `spec.nodeName`.
    pub node_name: String,
    /// `spec.kind`.
    pub kind: EventKind,
    /// `spec.comm`.
    pub comm: Option<String>,
    /// `spec.binaryPath`.
    pub binary_path: Option<String>,
    /// `spec.buildId`.
    pub build_id: Option<String>,
    /// `spec.pod`: None for a process on the host.
    pub pod: Option<PodOf>,
    /// When it occurred, from the status.
    pub times: ReportTimes,
}

impl ReportFacts {
    /// The facts of a decoded spec and status.
    pub fn of(spec: &CrashReportSpec, status: Option<&CrashReportStatus>) -> ReportFacts {
        let event = &spec.event;
        ReportFacts {
            node_name: spec.node_name.clone(),
            kind: event.kind,
            comm: event.comm.clone(),
            binary_path: event.binary_path.clone(),
            build_id: event.build_id.clone(),
            pod: event.pod.as_ref().map(|p| PodOf {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            }),
            times: status.map(ReportTimes::of_status).unwrap_or_default(),
        }
    }

    /// The last occurrence the report knows of, else None.
    pub fn last_seen(&self) -> Option<Timestamp> {
        self.times.latest()
    }
}

/// What the API server sends for one object, before the spec and status are decoded.
#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: serde_json::Value,
    #[serde(default)]
    status: Option<serde_json::Value>,
}

/// Decodes a CrashReport's spec and status, or says why they do not decode.
pub fn decode(
    spec: serde_json::Value,
    status: Option<serde_json::Value>,
) -> Result<ReportFacts, String> {
    let spec: CrashReportSpec =
        serde_json::from_value(spec).map_err(|e| format!("spec does not decode: {e}"))?;
    let status: Option<CrashReportStatus> = match status {
        None | Some(serde_json::Value::Null) => None,
        Some(status) => Some(
            serde_json::from_value(status).map_err(|e| format!("status does not decode: {e}"))?,
        ),
    };
    Ok(ReportFacts::of(&spec, status.as_ref()))
}

impl<'de> Deserialize<'de> for CachedReport {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        let meta = wire.metadata;
        Ok(CachedReport {
            metadata: ObjectMeta {
                name: meta.name,
                uid: meta.uid,
                resource_version: meta.resource_version,
                ..ObjectMeta::default()
            },
            facts: decode(wire.spec, wire.status),
        })
    }
}

impl kube::Resource for CachedReport {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "CrashReport".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "crashwatch.dev".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "crashreports".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use serde_json::json;

    #[test]
    fn a_report_decodes_to_its_facts_and_drops_the_rest() {
        let report: CachedReport = serde_json::from_value(json!({
            "apiVersion": "crashwatch.dev/v1alpha1", "kind": "CrashReport",
            "metadata": {"name": "n.hungtask.1", "uid": "u1", "resourceVersion": "7",
                         "managedFields": [{"manager": "crashwatch-agent"}],
                         "labels": {"a": "b"}},
            "spec": {"nodeName": "n", "kind": "HungTask", "comm": "qemu-nbd",
                     "binaryPath": "/usr/bin/qemu-nbd", "raw": ["line"],
                     "pod": {"namespace": "ns", "name": "p", "uid": "x"}},
            "status": {"count": 3, "firstSeen": "2026-01-01T00:00:00Z",
                       "lastSeen": "2026-01-02T00:00:00Z"},
        }))
        .unwrap();
        assert_eq!(report.metadata.name.as_deref(), Some("n.hungtask.1"));
        assert_eq!(report.metadata.resource_version.as_deref(), Some("7"));
        assert!(report.metadata.managed_fields.is_none() && report.metadata.labels.is_none());
        let facts = report.facts.unwrap();
        assert_eq!(facts.node_name, "n");
        assert_eq!(facts.kind, EventKind::HungTask);
        assert_eq!(facts.binary_path.as_deref(), Some("/usr/bin/qemu-nbd"));
        assert_eq!(
            facts.pod,
            Some(PodOf {
                namespace: "ns".into(),
                name: "p".into()
            })
        );
        assert_eq!(facts.times.count, 3);
        assert_eq!(
            facts.last_seen(),
            Some("2026-01-02T00:00:00Z".parse().unwrap())
        );
        assert_eq!(
            CachedReport::url_path(&(), None),
            "/apis/crashwatch.dev/v1alpha1/crashreports"
        );
    }

    #[test]
    fn a_report_that_does_not_decode_is_kept_as_an_error_and_the_list_still_decodes() {
        let list: Vec<CachedReport> = serde_json::from_value(json!([
            {"metadata": {"name": "bad"},
             "spec": {"nodeName": "n", "kind": "Segfault", "faultAddress": "0x123456789012345678901"}},
            {"metadata": {"name": "bad-kind"}, "spec": {"nodeName": "n", "kind": "Bogus"}},
            {"metadata": {"name": "bad-status"}, "spec": {"nodeName": "n", "kind": "Segfault"},
             "status": {"count": -1}},
            {"metadata": {"name": "good"}, "spec": {"nodeName": "n", "kind": "Segfault"}},
        ]))
        .unwrap();
        let errors: Vec<_> = list
            .iter()
            .map(|r| r.facts.as_ref().err().cloned())
            .collect();
        assert!(
            errors[0]
                .as_deref()
                .unwrap()
                .contains("0x123456789012345678901"),
            "{errors:?}"
        );
        assert!(
            errors[1].as_deref().unwrap().contains("Bogus"),
            "{errors:?}"
        );
        assert!(
            errors[2].as_deref().unwrap().starts_with("status"),
            "{errors:?}"
        );
        assert_eq!(errors[3], None);
    }
}
