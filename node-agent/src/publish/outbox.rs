//! Reports waiting to be written to the API server (pure): bounded, merged per object, and
//! counted exactly once.
//!
//! Every occurrence carries the kernel log sequence number of its first record. The status
//! of a CrashReport records the boot and the last sequence number counted, so an
//! occurrence read again after an agent restart (the kmsg cursor is only advanced past
//! what was written) is recognised and not counted twice.

use std::collections::BTreeMap;

use crds::limits;
use crds::report::{RECENT_OCCURRENCES, location, report_name};
use crds::{CrashEvent, CrashReportSpec, CrashReportStatus, Occurrence};

/// Occurrences of one CrashReport that are not written yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// The spec, from the first event of the fingerprint seen by this agent.
    pub spec: CrashReportSpec,
    /// The occurrences, oldest first.
    pub occurrences: Vec<Occurrence>,
}

/// Pending reports, keyed by object name, holding at most `limit` occurrences in all.
#[derive(Debug)]
pub struct Outbox {
    node: String,
    entries: BTreeMap<String, Pending>,
    limit: usize,
    held: usize,
    /// Occurrences dropped because the outbox was full.
    pub dropped: u64,
}

impl Outbox {
    /// An empty outbox for reports of `node`, holding at most `limit` occurrences.
    pub fn new(node: &str, limit: usize) -> Outbox {
        Outbox {
            node: node.to_owned(),
            entries: BTreeMap::new(),
            limit,
            held: 0,
            dropped: 0,
        }
    }

    /// Adds one event; false (and counted in `dropped`) when the outbox is full.
    pub fn add(&mut self, event: &CrashEvent) -> bool {
        if self.held >= self.limit {
            self.dropped += 1;
            return false;
        }
        let name = report_name(&self.node, event);
        let mut occurrence = Occurrence {
            time: event.timestamp.clone(),
            pid: event.pid,
            kmsg_seq: event.kmsg_seq,
            line: event.raw.first().cloned(),
            pod: event.pod.clone(),
            container: event.container.clone(),
        };
        limits::bound_string_option(&mut occurrence.time, limits::MAX_NAME_BYTES);
        limits::bound_string_option(&mut occurrence.line, limits::MAX_LINE_BYTES);
        self.entries
            .entry(name)
            .or_insert_with(|| {
                let mut event = event.clone();
                limits::bound_event(&mut event);
                let mut location = location(&event);
                limits::bound_string_option(&mut location, limits::MAX_TEXT_BYTES);
                Pending {
                    spec: CrashReportSpec {
                        node_name: self.node.clone(),
                        location,
                        event,
                    },
                    occurrences: Vec::new(),
                }
            })
            .occurrences
            .push(occurrence);
        self.held += 1;
        true
    }

    /// The pending reports, to be written (a copy: the outbox keeps filling meanwhile).
    pub fn snapshot(&self) -> Vec<(String, Pending)> {
        self.entries
            .iter()
            .map(|(name, pending)| (name.clone(), pending.clone()))
            .collect()
    }

    /// Forgets the first `written` occurrences of `name`, now on the server.
    pub fn written(&mut self, name: &str, written: usize) {
        if let Some(pending) = self.entries.get_mut(name) {
            let written = written.min(pending.occurrences.len());
            pending.occurrences.drain(..written);
            self.held -= written;
            if pending.occurrences.is_empty() {
                self.entries.remove(name);
            }
        }
    }

    /// The pending reports whose name `due` accepts, to be written (a copy: the outbox
    /// keeps filling meanwhile).
    pub fn snapshot_where(&self, mut due: impl FnMut(&str) -> bool) -> Vec<(String, Pending)> {
        self.entries
            .iter()
            .filter(|(name, _)| due(name))
            .map(|(name, pending)| (name.clone(), pending.clone()))
            .collect()
    }

    /// The names of the reports with occurrences waiting.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Whether an occurrence without a kernel log sequence number (a hang found by the
    /// `/proc` scan) waits: the cursor cannot stand for it.
    pub fn holds_unsequenced(&self) -> bool {
        self.entries
            .values()
            .any(|p| p.occurrences.iter().any(|o| o.kmsg_seq.is_none()))
    }

    /// How many occurrences wait.
    pub fn len(&self) -> usize {
        self.held
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// The smallest kernel log sequence number not yet written: the kmsg cursor must stay
    /// before it.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.entries
            .values()
            .flat_map(|p| p.occurrences.iter().filter_map(|o| o.kmsg_seq))
            .min()
    }
}

/// The status after adding `occurrences` to `current`, for the boot `boot_id`. Occurrences
/// of the same boot at or before `current.lastKmsgSeq` were counted before and are skipped.
/// None when nothing is new.
pub fn merge_status(
    current: Option<&CrashReportStatus>,
    boot_id: &str,
    occurrences: &[Occurrence],
) -> Option<CrashReportStatus> {
    let mut status = current.cloned().unwrap_or_default();
    let same_boot = status.boot_id.as_deref() == Some(boot_id);
    let counted_through = if same_boot {
        status.last_kmsg_seq
    } else {
        None
    };
    let new: Vec<&Occurrence> = occurrences
        .iter()
        .filter(|o| match (o.kmsg_seq, counted_through) {
            (Some(seq), Some(through)) => seq > through,
            _ => true,
        })
        .collect();
    if new.is_empty() {
        return None;
    }
    status.count += new.len() as u64;
    if status.first_seen.is_none() {
        status.first_seen = new.iter().find_map(|o| o.time.clone());
    }
    if let Some(time) = new.iter().rev().find_map(|o| o.time.clone()) {
        status.last_seen = Some(time);
    }
    if let Some(seq) = new.iter().filter_map(|o| o.kmsg_seq).max() {
        status.boot_id = Some(boot_id.to_owned());
        status.last_kmsg_seq = Some(seq);
    }
    // Every occurrence also lands in a time bucket, so thresholds above the few recent
    // ones count correctly; an occurrence without a time cannot be placed.
    for time in new.iter().filter_map(|o| o.time.as_deref()?.parse().ok()) {
        crds::report::add_to_buckets(&mut status.buckets, time);
    }
    status.recent.extend(new.into_iter().cloned());
    let excess = status.recent.len().saturating_sub(RECENT_OCCURRENCES);
    status.recent.drain(..excess);
    Some(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{Address, EventKind};

    fn crash(seq: u64, offset: u64) -> CrashEvent {
        let mut event = CrashEvent::new(EventKind::Segfault);
        event.comm = Some("qemu-nbd".into());
        event.module = Some("qemu-nbd".into());
        event.module_offset = Some(Address(offset));
        event.kmsg_seq = Some(seq);
        event.timestamp = Some(format!("2026-11-24T00:00:{seq:02}Z"));
        event
    }

    fn occurrences(seqs: &[u64]) -> Vec<Occurrence> {
        seqs.iter()
            .map(|&seq| Occurrence {
                kmsg_seq: Some(seq),
                time: Some(format!("t{seq}")),
                ..Occurrence::default()
            })
            .collect()
    }

    #[test]
    fn repeats_merge_into_one_entry_and_the_bound_is_counted() {
        let mut outbox = Outbox::new("node-1", 3);
        assert!(outbox.add(&crash(10, 0x100)));
        assert!(outbox.add(&crash(11, 0x100)));
        assert!(outbox.add(&crash(12, 0x200)));
        assert!(!outbox.add(&crash(13, 0x200)));
        assert_eq!(outbox.dropped, 1);
        let snapshot = outbox.snapshot();
        assert_eq!(snapshot.len(), 2);
        assert_eq!(outbox.oldest_seq(), Some(10));
        let (first, pending) = &snapshot[0..1][0];
        let written = pending.occurrences.len();
        outbox.written(first, written);
        assert_eq!(outbox.len(), 3 - written);
        assert!(outbox.add(&crash(14, 0x100)), "room again");
    }

    #[test]
    fn occurrences_already_counted_in_this_boot_are_not_counted_again() {
        let first = merge_status(None, "boot-a", &occurrences(&[5, 7])).unwrap();
        assert_eq!(first.count, 2);
        assert_eq!(first.last_kmsg_seq, Some(7));
        assert_eq!(first.first_seen.as_deref(), Some("t5"));
        // After a restart the agent reads 7 again, and 9 is new.
        let second = merge_status(Some(&first), "boot-a", &occurrences(&[7, 9])).unwrap();
        assert_eq!(second.count, 3);
        assert_eq!(second.last_seen.as_deref(), Some("t9"));
        // Only old ones: nothing to write.
        assert_eq!(
            merge_status(Some(&second), "boot-a", &occurrences(&[5, 9])),
            None
        );
        // A new boot numbers its log from the start again.
        let rebooted = merge_status(Some(&second), "boot-b", &occurrences(&[3])).unwrap();
        assert_eq!(rebooted.count, 4);
        assert_eq!(rebooted.boot_id.as_deref(), Some("boot-b"));
    }

    #[test]
    fn a_report_of_a_huge_event_stays_within_the_bounds() {
        // A hung task with a 5000-frame stack, 5000 raw lines and overlong names.
        let mut event = CrashEvent::new(EventKind::HungTask);
        event.comm = Some("c".repeat(10_000));
        event.wchan = Some("w".repeat(10_000));
        event.kernel_stack = (0..5000).map(|i| format!("frame_{i}+0x1/0x2")).collect();
        event.raw = (0..5000)
            .map(|i| format!("line {i} {}", "x".repeat(3000)))
            .collect();
        event.explanation = Some("e".repeat(100_000));
        let mut outbox = Outbox::new("node-1", 10);
        assert!(outbox.add(&event));
        let (_, pending) = outbox.snapshot().remove(0);
        let spec = &pending.spec;
        assert!(spec.event.comm.as_ref().unwrap().len() <= 256);
        assert!(spec.event.wchan.as_ref().unwrap().len() <= 256);
        assert!(spec.event.explanation.as_ref().unwrap().len() <= 4096);
        assert_eq!(spec.event.kernel_stack.len(), 64);
        assert_eq!(spec.event.kernel_stack[0], "frame_0+0x1/0x2");
        assert_eq!(spec.event.raw.len(), 100);
        assert!(spec.event.raw.iter().all(|l| l.len() <= 1024));
        assert!(spec.location.as_ref().unwrap().len() <= 4096);
        let line = pending.occurrences[0].line.as_ref().unwrap();
        assert!(
            line.starts_with("line 0 ") && line.len() <= 1024,
            "{}",
            line.len()
        );
        let bytes = serde_json::to_vec(spec).unwrap().len();
        assert!(bytes < 512 << 10, "the spec is {bytes} bytes");
    }

    #[test]
    fn the_status_keeps_the_last_few_occurrences() {
        let seqs: Vec<u64> = (1..=12).collect();
        let status = merge_status(None, "b", &occurrences(&seqs)).unwrap();
        assert_eq!(status.count, 12);
        let kept: Vec<_> = status.recent.iter().map(|o| o.kmsg_seq.unwrap()).collect();
        assert_eq!(kept, [8, 9, 10, 11, 12]);
    }

    #[test]
    fn every_new_occurrence_is_counted_in_a_time_bucket() {
        let timed = |seq: u64, time: &str| Occurrence {
            kmsg_seq: Some(seq),
            time: Some(time.into()),
            ..Occurrence::default()
        };
        let first = merge_status(
            None,
            "boot",
            &[
                timed(1, "2026-01-01T10:00:05Z"),
                timed(2, "2026-01-01T10:00:50Z"),
                timed(3, "2026-01-01T10:03:00Z"),
            ],
        )
        .unwrap();
        let buckets: Vec<(&str, u64)> = first
            .buckets
            .iter()
            .map(|b| (b.start.as_str(), b.count))
            .collect();
        assert_eq!(
            buckets,
            [("2026-01-01T10:00:00Z", 2), ("2026-01-01T10:03:00Z", 1)]
        );
        // Read again after a restart: counted once.
        let again = merge_status(Some(&first), "boot", &[timed(3, "2026-01-01T10:03:00Z")]);
        assert_eq!(again, None);
        let later =
            merge_status(Some(&first), "boot", &[timed(4, "2026-01-01T10:03:30Z")]).unwrap();
        assert_eq!(later.buckets.last().unwrap().count, 2);
    }
}
