//! The `CrashReport` custom resource: one per node and fault fingerprint.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::bounds;
use crate::event::{ContainerRef, CrashEvent, EventKind, PodRef};

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
    printcolumn = r#"{"name":"Namespace","type":"string","jsonPath":".spec.pod.namespace"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".spec.pod.name"}"#,
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
    #[schemars(length(min = 1, max = bounds::NAME_LEN))]
    pub node_name: String,
    /// Where it happened, for people: `function file:line`, or `module+offset` without
    /// debug information.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bounds::TEXT_LEN))]
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
    #[schemars(length(max = bounds::WORD_LEN))]
    pub first_seen: Option<String>,
    /// When it was last seen (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bounds::WORD_LEN))]
    pub last_seen: Option<String>,
    /// The boot of the node whose kernel log `lastKmsgSeq` refers to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bounds::WORD_LEN))]
    pub boot_id: Option<String>,
    /// The kernel log sequence number of the last occurrence counted: occurrences at or
    /// before it in the same boot are never counted twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_kmsg_seq: Option<u64>,
    /// The last few occurrences, newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub recent: Vec<Occurrence>,
    /// Every occurrence counted, per time bucket, oldest first: minutes for the last hour,
    /// hours for the last week, days before (see [`add_to_buckets`]). Thresholds of any
    /// size are counted from these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bounds::BUCKETS))]
    pub buckets: Vec<Bucket>,
}

/// How many occurrences fell in `[start, start + seconds)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bucket {
    /// The bucket's start (RFC 3339, UTC), a multiple of its width.
    #[schemars(length(max = bounds::WORD_LEN))]
    pub start: String,
    /// Its width: 60, 3600 or 86400.
    #[schemars(range(min = 1, max = 86_400))]
    pub seconds: u32,
    /// The occurrences in it.
    #[schemars(range(min = 1))]
    pub count: u64,
}

/// How long occurrences are kept per minute.
const MINUTES_FOR: i64 = 3_600;
/// How long occurrences are kept per hour (older ones per day).
const HOURS_FOR: i64 = 7 * 86_400;

/// The width a bucket of occurrences gets once `age` seconds have passed since its end.
fn width_at(age: i64) -> i64 {
    if age < MINUTES_FOR {
        60
    } else if age < HOURS_FOR {
        3_600
    } else {
        86_400
    }
}

/// Counts one occurrence at `time` in `buckets` (oldest first) and coarsens the buckets
/// that aged: per minute for the last hour, per hour for the last week, per day before, at
/// most [`bounds::BUCKETS`] (the oldest days go first). Buckets whose start does not parse
/// are dropped. Every occurrence in a bucket is at or after its start, so a sum over the
/// buckets that start after some instant is a lower bound of the occurrences after it.
pub fn add_to_buckets(buckets: &mut Vec<Bucket>, time: jiff::Timestamp) {
    let mut parsed: Vec<(i64, i64, u64)> = buckets
        .iter()
        .filter_map(|b| {
            let start = b.start.parse::<jiff::Timestamp>().ok()?.as_second();
            Some((start, i64::from(b.seconds.max(1)), b.count))
        })
        .collect();
    let t = time.as_second();
    match parsed.iter_mut().find(|(s, w, _)| *s <= t && t < s + w) {
        Some(bucket) => bucket.2 += 1,
        None => parsed.push((t - t.rem_euclid(60), 60, 1)),
    }
    let now = parsed
        .iter()
        .map(|(s, w, _)| s + w)
        .max()
        .unwrap_or(t)
        .max(t);
    let mut merged: Vec<(i64, i64, u64)> = Vec::new();
    parsed.sort_by_key(|b| b.0);
    for (start, width, count) in parsed {
        let wanted = width_at(now - (start + width)).max(width);
        let start = start - start.rem_euclid(wanted);
        match merged.last_mut() {
            Some(last) if last.0 == start && last.1 == wanted => last.2 += count,
            Some(last) if start < last.0 + last.1 => last.2 += count,
            _ => merged.push((start, wanted, count)),
        }
    }
    let excess = merged.len().saturating_sub(bounds::BUCKETS);
    merged.drain(..excess);
    *buckets = merged
        .into_iter()
        .filter_map(|(start, width, count)| {
            Some(Bucket {
                start: jiff::Timestamp::from_second(start).ok()?.to_string(),
                seconds: u32::try_from(width).ok()?,
                count,
            })
        })
        .collect();
}

/// One occurrence of a reported fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Occurrence {
    /// When it happened (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bounds::WORD_LEN))]
    pub time: Option<String>,
    /// The process (or thread) id the kernel printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = bounds::PID_MAX))]
    pub pid: Option<u32>,
    /// The kernel log sequence number of its first record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kmsg_seq: Option<u64>,
    /// Its first kernel line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = bounds::LINE_LEN))]
    pub line: Option<String>,
    /// The pod the process ran in; absent on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The container the process ran in; absent on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,
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

    fn at(second: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    fn after(buckets: &[Bucket], since: jiff::Timestamp) -> u64 {
        buckets
            .iter()
            .filter(|b| b.start.parse::<jiff::Timestamp>().unwrap() > since)
            .map(|b| b.count)
            .sum()
    }

    #[test]
    fn buckets_keep_every_occurrence_of_the_last_hour_per_minute() {
        let mut buckets = Vec::new();
        // A fault first seen three days ago, then ten times in the last ten minutes.
        add_to_buckets(&mut buckets, at(-3 * 86_400));
        for minute in 0..10 {
            add_to_buckets(&mut buckets, at(-600 + minute * 60 + 5));
        }
        // Two in the same minute share a bucket.
        add_to_buckets(&mut buckets, at(-600 + 9 * 60 + 30));
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), 12);
        assert_eq!(after(&buckets, at(-1_800)), 11);
        assert_eq!(after(&buckets, at(-3 * 86_400 - 60)), 12);
        assert!(buckets.iter().rev().take(10).all(|b| b.seconds == 60));
        assert_eq!(buckets.first().unwrap().seconds, 3_600, "{buckets:?}");
    }

    #[test]
    fn aged_buckets_coarsen_and_the_count_is_kept() {
        let mut buckets = Vec::new();
        // One occurrence every 10 minutes for 10 days.
        let total = 10 * 144;
        for i in 0..total {
            add_to_buckets(&mut buckets, at(i * 600));
        }
        assert!(buckets.len() <= bounds::BUCKETS, "{}", buckets.len());
        assert_eq!(buckets.iter().map(|b| b.count).sum::<u64>(), total as u64);
        let widths: Vec<u32> = buckets.iter().map(|b| b.seconds).collect();
        assert!(
            widths.is_sorted_by(|a, b| a >= b),
            "oldest are coarsest: {widths:?}"
        );
        assert!(widths.contains(&86_400) && widths.contains(&3_600) && widths.contains(&60));
        // The last hour is exact to the minute: 6 occurrences.
        let last = at((total - 1) * 600);
        assert_eq!(
            after(&buckets, last - jiff::SignedDuration::from_secs(3_600)),
            6
        );
    }

    #[test]
    fn at_most_the_bound_of_buckets_is_kept_dropping_the_oldest() {
        let mut buckets = Vec::new();
        for day in 0..400 {
            add_to_buckets(&mut buckets, at(day * 86_400));
        }
        assert_eq!(buckets.len(), bounds::BUCKETS);
        // 1_800_000_000 is a whole minute: the newest bucket starts at the last day.
        assert_eq!(buckets.last().unwrap().start, at(399 * 86_400).to_string());
        // One bucket per day; the 144 oldest days went. Old buckets are whole UTC days.
        assert_eq!(
            buckets.first().unwrap().start,
            at(144 * 86_400).strftime("%Y-%m-%dT00:00:00Z").to_string()
        );
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
