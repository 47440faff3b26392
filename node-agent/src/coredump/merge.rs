//! One crash, two witnesses: the kernel log's line (error code, `Code:` bytes, the sequence
//! number the cursor needs) and the core handler's event (the pod, the whole stack,
//! symbolized from the container). They are matched by thread id and published once. Each
//! waits a little for the other; a line whose dump never comes (not dumpable, over the pipe
//! limit) is published alone, and so is a dump whose line the kernel's rate limit dropped.
//! Pure logic: the caller brings the clock and the spool.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crds::CrashEvent;

/// How long a kernel line waits for its dump's handler to start.
pub const LINE_WAITS: Duration = Duration::from_secs(2);
/// How long a kernel line waits while the handler analyses its dump.
pub const LINE_WAITS_IN_FLIGHT: Duration = Duration::from_secs(60);
/// How long a spooled event waits for its kernel line (the log reader may lag).
pub const DUMP_WAITS: Duration = Duration::from_millis(500);

/// An event ready to finish.
#[derive(Debug, Clone, PartialEq)]
pub enum Merged {
    /// Symbolized by the handler (merged with the kernel line when there was one); its
    /// spool file is removed once it is published.
    FromDump {
        /// The event.
        event: CrashEvent,
        /// The kernel timestamp of its line, when there was one.
        monotonic_usec: Option<u64>,
        /// The spool file to remove after publishing.
        spool_file: PathBuf,
    },
    /// A kernel line without a dump: symbolized the usual way, from the node's files.
    LineOnly {
        /// The event.
        event: CrashEvent,
        /// The kernel timestamp of its line.
        monotonic_usec: Option<u64>,
    },
}

struct Line {
    event: CrashEvent,
    monotonic_usec: Option<u64>,
    since: Instant,
}

struct Dump {
    event: CrashEvent,
    spool_file: PathBuf,
    since: Instant,
}

/// Kernel lines and spooled dumps waiting for each other.
#[derive(Default)]
pub struct CoreMerge {
    lines: Vec<Line>,
    dumps: Vec<Dump>,
}

/// The kernel line's facts, with the handler's stack, pod and binary.
pub fn merge(line: CrashEvent, dump: CrashEvent) -> CrashEvent {
    let mut event = line;
    event.frames = dump.frames;
    event.pod = dump.pod;
    event.container = dump.container;
    event.binary_path = dump.binary_path.or(event.binary_path);
    event.build_id = dump.build_id.or(event.build_id);
    event.binary_matches = dump.binary_matches.or(event.binary_matches);
    event.access = dump.access.or(event.access);
    event.instruction = event.instruction.or(dump.instruction);
    event.module = event.module.or(dump.module);
    event.module_offset = event.module_offset.or(dump.module_offset);
    event.vma_start = event.vma_start.or(dump.vma_start);
    event.vma_size = event.vma_size.or(dump.vma_size);
    event.fault_address = event.fault_address.or(dump.fault_address);
    event.si_code = event.si_code.or(dump.si_code);
    event.ip = event.ip.or(dump.ip);
    event.sp = event.sp.or(dump.sp);
    event
}

impl CoreMerge {
    /// A crash line from the kernel log: merged at once if its dump is spooled already.
    pub fn line(
        &mut self,
        event: CrashEvent,
        monotonic_usec: Option<u64>,
        now: Instant,
    ) -> Option<Merged> {
        if let Some(at) = self.dumps.iter().position(|d| d.event.pid == event.pid) {
            let dump = self.dumps.remove(at);
            return Some(Merged::FromDump {
                event: merge(event, dump.event),
                monotonic_usec,
                spool_file: dump.spool_file,
            });
        }
        self.lines.push(Line {
            event,
            monotonic_usec,
            since: now,
        });
        None
    }

    /// A spooled dump: merged at once if its line waits already. A file seen before is
    /// ignored.
    pub fn dump(&mut self, spool_file: PathBuf, event: CrashEvent, now: Instant) -> Option<Merged> {
        if self.dumps.iter().any(|d| d.spool_file == spool_file) {
            return None;
        }
        if let Some(at) = self.lines.iter().position(|l| l.event.pid == event.pid) {
            let line = self.lines.remove(at);
            return Some(Merged::FromDump {
                event: merge(line.event, event),
                monotonic_usec: line.monotonic_usec,
                spool_file,
            });
        }
        self.dumps.push(Dump {
            event,
            spool_file,
            since: now,
        });
        None
    }

    /// Whether `spool_file` is waiting here already.
    pub fn holds(&self, spool_file: &std::path::Path) -> bool {
        self.dumps.iter().any(|d| d.spool_file == spool_file)
    }

    /// What has waited long enough: lines whose dump did not come (longer while the
    /// handler still analyses a dump of that thread, as `in_flight` tells), and dumps
    /// whose line did not come.
    pub fn due(&mut self, now: Instant, in_flight: impl Fn(u32) -> bool) -> Vec<Merged> {
        let mut out = Vec::new();
        let mut kept = Vec::new();
        for line in self.lines.drain(..) {
            let waited = now.saturating_duration_since(line.since);
            let busy = line.event.pid.is_some_and(&in_flight);
            if waited >= LINE_WAITS_IN_FLIGHT || (waited >= LINE_WAITS && !busy) {
                out.push(Merged::LineOnly {
                    event: line.event,
                    monotonic_usec: line.monotonic_usec,
                });
            } else {
                kept.push(line);
            }
        }
        self.lines = kept;
        let mut kept = Vec::new();
        for dump in self.dumps.drain(..) {
            if now.saturating_duration_since(dump.since) >= DUMP_WAITS {
                out.push(Merged::FromDump {
                    event: dump.event,
                    monotonic_usec: None,
                    spool_file: dump.spool_file,
                });
            } else {
                kept.push(dump);
            }
        }
        self.dumps = kept;
        out
    }

    /// The kernel log sequence number of the oldest waiting line: the cursor stays before it.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.lines.iter().filter_map(|l| l.event.kmsg_seq).min()
    }

    /// Whether anything waits.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.dumps.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{Address, EventKind, Frame, PodRef};

    fn line(pid: u32, seq: u64) -> CrashEvent {
        let mut e = CrashEvent::new(EventKind::Segfault);
        e.pid = Some(pid);
        e.kmsg_seq = Some(seq);
        e.error_code = Some(4);
        e.module_offset = Some(Address(0x16b4));
        e
    }

    fn dump(pid: u32) -> CrashEvent {
        let mut e = CrashEvent::new(EventKind::Segfault);
        e.pid = Some(pid);
        e.module_offset = Some(Address(0x16b4));
        e.build_id = Some("ab".into());
        e.frames = vec![Frame {
            function: Some("read_field".into()),
            ..Frame::default()
        }];
        e.pod = Some(PodRef {
            namespace: "shop".into(),
            name: "checkout-7d9f".into(),
            uid: None,
        });
        e
    }

    #[test]
    fn a_line_and_its_dump_make_one_event_with_both_witnesses_facts() {
        let t = Instant::now();
        let mut merge = CoreMerge::default();
        assert_eq!(merge.line(line(7, 100), Some(5), t), None);
        assert_eq!(merge.oldest_seq(), Some(100));
        let Some(Merged::FromDump {
            event,
            monotonic_usec,
            spool_file,
        }) = merge.dump("7.1.json".into(), dump(7), t)
        else {
            panic!("merged");
        };
        assert_eq!(event.kmsg_seq, Some(100));
        assert_eq!(event.error_code, Some(4));
        assert_eq!(event.build_id.as_deref(), Some("ab"));
        assert_eq!(event.pod.unwrap().name, "checkout-7d9f");
        assert_eq!(event.frames.len(), 1);
        assert_eq!((monotonic_usec, spool_file), (Some(5), "7.1.json".into()));
        assert!(merge.is_empty());
        assert_eq!(merge.oldest_seq(), None);
    }

    #[test]
    fn a_dump_spooled_before_its_line_is_read_waits_for_it() {
        let t = Instant::now();
        let mut merge = CoreMerge::default();
        assert_eq!(merge.dump("7.1.json".into(), dump(7), t), None);
        assert_eq!(
            merge.dump("7.1.json".into(), dump(7), t),
            None,
            "seen before"
        );
        assert!(merge.due(t + DUMP_WAITS / 2, |_| false).is_empty());
        let merged = merge.line(line(7, 100), None, t + DUMP_WAITS / 2).unwrap();
        assert!(matches!(merged, Merged::FromDump { event, .. } if event.kmsg_seq == Some(100)));
    }

    #[test]
    fn each_witness_alone_is_published_after_its_wait() {
        let t = Instant::now();
        let mut merge = CoreMerge::default();
        merge.line(line(7, 100), None, t);
        merge.line(line(8, 101), None, t);
        merge.dump("9.1.json".into(), dump(9), t);
        // The dump of 9 (its line rate-limited away) goes after DUMP_WAITS.
        let due = merge.due(t + DUMP_WAITS, |_| false);
        assert_eq!(due.len(), 1);
        assert!(matches!(&due[0], Merged::FromDump { event, .. } if event.pid == Some(9)));
        // Thread 8's dump is being analysed: its line waits longer than 7's.
        let due = merge.due(t + LINE_WAITS, |tid| tid == 8);
        assert_eq!(due.len(), 1);
        assert!(matches!(&due[0], Merged::LineOnly { event, .. } if event.pid == Some(7)));
        assert_eq!(merge.oldest_seq(), Some(101));
        let due = merge.due(t + LINE_WAITS_IN_FLIGHT, |tid| tid == 8);
        assert!(matches!(&due[0], Merged::LineOnly { event, .. } if event.pid == Some(8)));
        assert!(merge.is_empty());
    }
}
