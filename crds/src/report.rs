//! The `CrashReport` custom resource: one per node and fault fingerprint.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::event::{CrashEvent, EventKind};

/// How many recent occurrences a report keeps in its status.
pub const RECENT_OCCURRENCES: usize = 5;

/// A crash or hang seen on one node, once or many times: the first event of its
/// fingerprint (node, kind, module identity and offset), with counts in the status.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "crashwatch.dev",
    version = "v1alpha1",
    kind = "CrashReport",
    plural = "crashreports",
    shortname = "crash",
    status = "CrashReportStatus",
    doc = "A user-space crash or hang that crashwatch-agent recognised in a node's kernel log, symbolized and explained; one object per node and fault fingerprint.",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Process","type":"string","jsonPath":".spec.comm"}"#,
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.kind"}"#,
    printcolumn = r#"{"name":"Location","type":"string","jsonPath":".spec.location"}"#,
    printcolumn = r#"{"name":"Count","type":"integer","jsonPath":".status.count"}"#,
    printcolumn = r#"{"name":"Last Seen","type":"date","jsonPath":".status.lastSeen"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CrashReportSpec {
    /// The node the crash or hang happened on.
    pub node_name: String,
    /// Where it happened, for people: `function file:line`, or `module+offset` without
    /// debug information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The event, with the field names of `crashwatch-agent explain --json`.
    #[serde(flatten)]
    pub event: CrashEvent,
}

/// How often and when the fingerprint was seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CrashReportStatus {
    /// How many times it happened.
    #[schemars(range(min = 1))]
    pub count: u64,
    /// When it was first seen (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<String>,
    /// When it was last seen (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// The boot of the node whose kernel log `lastKmsgSeq` refers to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The kernel log sequence number of the last occurrence counted: occurrences at or
    /// before it in the same boot are never counted twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_kmsg_seq: Option<u64>,
    /// The last few occurrences, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub recent: Vec<Occurrence>,
}

/// One occurrence of a reported fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Occurrence {
    /// When it happened (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The process (or thread) id the kernel printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The kernel log sequence number of its first record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kmsg_seq: Option<u64>,
    /// Its first kernel line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
}

/// What makes two events the same fault: node, kind, module identity (build-id, or the
/// module or process name without one) and the module offset (or the wait channel of a
/// hang).
pub fn fingerprint(node: &str, event: &CrashEvent) -> String {
    let identity = event
        .build_id
        .clone()
        .or_else(|| event.module.clone())
        .or_else(|| event.comm.clone())
        .unwrap_or_default();
    let place = match (event.module_offset, &event.wchan) {
        (Some(offset), _) => offset.to_string(),
        (None, Some(wchan)) => wchan.clone(),
        (None, None) => String::new(),
    };
    format!(
        "{node}\u{0}{}\u{0}{identity}\u{0}{place}",
        event.kind.as_str()
    )
}

/// The deterministic object name of a fingerprint: `NODE.KIND.HASH`, a valid DNS
/// subdomain of at most 253 characters.
pub fn report_name(node: &str, event: &CrashEvent) -> String {
    let hash = fnv1a64(fingerprint(node, event).as_bytes());
    let kind = event.kind.as_str().to_ascii_lowercase();
    let node: String = node
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let room = 253 - kind.len() - 16 - 2;
    let node = node.get(..node.len().min(room)).unwrap_or_default();
    let node = node.trim_matches(|c: char| c == '-' || c == '.');
    let node = if node.is_empty() { "node" } else { node };
    format!("{node}.{kind}.{hash:016x}")
}

/// `function file:line` of the innermost frame, or `module+offset`.
pub fn location(event: &CrashEvent) -> Option<String> {
    if let Some(frame) = event.frames.first() {
        let function = frame.function.as_deref().unwrap_or("??");
        return Some(match (&frame.file, frame.line) {
            (Some(file), Some(line)) => format!("{function} {file}:{line}"),
            _ => function.to_owned(),
        });
    }
    match (&event.module, event.module_offset, &event.wchan) {
        (Some(module), Some(offset), _) => Some(format!("{module}+{offset}")),
        (Some(module), None, _) => Some(module.clone()),
        (None, _, Some(wchan)) if event.kind == EventKind::HungTask => Some(wchan.clone()),
        _ => None,
    }
}

/// 64-bit FNV-1a: stable across versions and platforms, for names, not for security.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Address;

    fn segfault(offset: u64, pid: u32) -> CrashEvent {
        let mut event = CrashEvent::new(EventKind::Segfault);
        event.comm = Some("qemu-nbd".into());
        event.pid = Some(pid);
        event.module = Some("qemu-nbd".into());
        event.module_offset = Some(Address(offset));
        event
    }

    #[test]
    fn names_are_deterministic_per_fingerprint() {
        let a = report_name("node-1", &segfault(0x761c7, 1));
        assert_eq!(
            a,
            report_name("node-1", &segfault(0x761c7, 2)),
            "pid is not identity"
        );
        assert_ne!(a, report_name("node-2", &segfault(0x761c7, 1)));
        assert_ne!(a, report_name("node-1", &segfault(0x761c8, 1)));
        assert!(a.starts_with("node-1.segfault."), "{a}");
        let mut with_build_id = segfault(0x761c7, 1);
        with_build_id.build_id = Some("ab12".into());
        assert_ne!(a, report_name("node-1", &with_build_id));
    }

    #[test]
    fn names_are_valid_dns_subdomains_for_any_node_name() {
        for node in ["Node_With.CAPS", &"x".repeat(300), "--", "ünïcode"] {
            let name = report_name(node, &segfault(1, 1));
            assert!(name.len() <= 253, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'),
                "{name}"
            );
            assert!(
                name.starts_with(|c: char| c.is_ascii_alphanumeric()),
                "{name}"
            );
        }
    }
}
