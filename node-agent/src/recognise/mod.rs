//! Stage 2 of the pipeline: turning kernel log lines into [`CrashEvent`]s (pure, no I/O).
//!
//! Most reports span several records: a segfault is followed by its `Code:` record, a hung
//! task by its state line and stack, an oops by dozens of lines. The [`Recogniser`] keeps at
//! most one report open, adds the records that belong to it, and closes it when a record
//! does not belong, when the report's last record arrives, or when the caller
//! [flushes](Recogniser::flush) it after a quiet period.

/// A substring finder for an anchor, built once (memchr's SIMD `memmem`). Every record is
/// searched for a dozen anchors; `str::find` would build a new searcher on every call.
macro_rules! anchor {
    ($needle:literal) => {{
        static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new($needle));
        &*FINDER
    }};
}

/// Like [`anchor!`], for the last occurrence (memchr's `FinderRev`).
macro_rules! anchor_rev {
    ($needle:literal) => {{
        static FINDER: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new($needle));
        &*FINDER
    }};
}

pub mod arch;
pub mod error_code;
pub mod hung;
pub mod line;
pub mod misc;
pub mod prefilter;
pub mod user_fault;

use crds::limits::{self, MAX_KERNEL_STACK, MAX_RAW_LINES};
use crds::{CrashEvent, DetectedBy, EventKind};

pub use line::LogLine;
use prefilter::Start;

/// The most records one report may take before it is closed regardless (an OOM report lists
/// every task, one record each; an nbd device may log thousands of errors in a row).
const MAX_REPORT_RECORDS: usize = 5000;

/// Something the recogniser found in the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Recognised {
    /// A crash or hang.
    Event(Box<Found>),
    /// The kernel's rate limit dropped this many crash reports (`N callbacks suppressed`).
    CrashesSuppressed(u64),
    /// The kernel stopped printing hung-task reports (`hung_task_warnings` reached 0).
    HungTaskReportsSuppressed,
    /// A line user space wrote into the kernel log; never trusted as a report.
    Untrusted,
}

/// A recognised event with where it was found.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    /// The event.
    pub event: CrashEvent,
    /// Microseconds since boot of the event's first record, when the source carried it.
    pub monotonic_usec: Option<u64>,
}

/// Groups kernel log lines into events. Feed lines in log order.
#[derive(Debug, Default)]
pub struct Recogniser {
    open: Option<OpenReport>,
    /// The nbd device whose orderly disconnect was announced last, and when.
    nbd_disconnect: Option<(String, Option<u64>)>,
}

/// How soon after an orderly disconnect notice the driver's `shutting down sockets` belongs
/// to it (6.1 printed it within 5 ms).
const NBD_DISCONNECT_WINDOW_USEC: u64 = 5_000_000;

#[derive(Debug)]
struct OpenReport {
    shape: Shape,
    /// Boxed from the start: the report is handed out as it is, without moving the event.
    found: Box<Found>,
    first_seq: Option<u64>,
    /// Records taken, the first included.
    records: usize,
    /// Records taken but not kept in `raw` (beyond [`MAX_RAW_LINES`]).
    omitted: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// An x86 user fault, waiting for its `Code:` record (or a location printed separately).
    X86Fault,
    /// An arm64 user fault, taking the register lines that follow.
    Arm64Fault,
    /// Another architecture's user fault, taking that architecture's lines that follow.
    Arch(arch::Arch),
    /// A hung-task report; `stack_done` once its own stack has ended.
    Hung { stack_done: bool },
    /// A kernel oops, until `---[ end trace`.
    Oops { records: usize },
    /// An OOM report, from `invoked oom-killer` until `Killed process`.
    Oom { records: usize },
    /// The victim an OOM killer before 5.x chose (`Kill process … or sacrifice child`),
    /// waiting for its `Killed process` line.
    OomChosen,
    /// Consecutive nbd errors on one device.
    Nbd,
}

enum Absorb {
    Taken,
    TakenAndComplete,
    NotMine,
}

impl Recogniser {
    /// A recogniser with nothing open.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next line; returns whatever it completed or found.
    ///
    /// A pasted line that holds more than one kernel line (another CPU's report glued into it,
    /// or text pasted in front of a timestamp) is fed as its pieces. A `/dev/kmsg` record is
    /// one message by construction and is never split: a task name such as `[1.1] x` must not
    /// cut the report that prints it in two.
    ///
    /// The line is taken by value: a record that joins an open report keeps its text without
    /// a copy.
    pub fn feed(&mut self, line: LogLine) -> Vec<Recognised> {
        if line.from_user_space {
            return vec![Recognised::Untrusted];
        }
        let pieces = match line.seq {
            Some(_) => None,
            None => glued_pieces(&line.message),
        };
        let Some(pieces) = pieces else {
            return self.feed_one(line);
        };
        let mut out = Vec::new();
        for (n, piece) in pieces.into_iter().enumerate() {
            // Text in front of a timestamp (a prompt, a build log's own clock) is fed only
            // when it starts a report of its own.
            if n == 0 && !starts_anything(piece) {
                continue;
            }
            let parsed = LogLine::parse_text(piece);
            let sub = LogLine {
                message: parsed.message,
                raw: Some(piece.to_owned()),
                monotonic_usec: parsed.monotonic_usec.or(line.monotonic_usec),
                ..line.clone()
            };
            out.extend(self.feed_one(sub));
        }
        out
    }

    fn feed_one(&mut self, mut line: LogLine) -> Vec<Recognised> {
        let mut out = Vec::new();
        if let Some(open) = self.open.as_mut() {
            match open.absorb(&mut line) {
                Absorb::Taken => return out,
                Absorb::TakenAndComplete => {
                    out.extend(self.flush());
                    return out;
                }
                Absorb::NotMine => out.extend(self.flush()),
            }
        }
        self.start(&line, &mut out);
        if let Some(open) = self.open.as_mut() {
            // Nothing was open before: the report is this line's, and keeps its text.
            open.found.event.raw.push(line.take_raw_text());
        }
        out
    }

    /// Closes the open report, if any (call after a quiet period or at the end of input).
    pub fn flush(&mut self) -> Option<Recognised> {
        self.open.take().map(|open| {
            let mut found = open.found;
            limits::bound_lines(&mut found.event.raw, MAX_RAW_LINES, open.omitted);
            Recognised::Event(found)
        })
    }

    /// The sequence number of the oldest record not yet turned into output: a persisted
    /// cursor must stay before it, or a restart would lose the open report.
    pub fn oldest_pending_seq(&self) -> Option<u64> {
        self.open.as_ref().and_then(|open| open.first_seq)
    }

    /// Whether a report is open.
    pub fn has_open_report(&self) -> bool {
        self.open.is_some()
    }

    fn start(&mut self, line: &LogLine, out: &mut Vec<Recognised>) {
        let message = line.message.as_str();
        // Each recogniser runs only when the line contains the text it requires.
        let may = prefilter::candidates(message);
        if may.is_empty() {
            return;
        }
        let open = |shape, event| OpenReport::new(shape, event, line);
        if let Some(event) = may.run(Start::Segfault, || user_fault::parse_segfault(message)) {
            self.open = Some(open(Shape::X86Fault, event));
        } else if let Some(event) = may.run(Start::Trap, || user_fault::parse_trap(message)) {
            self.open = Some(open(Shape::X86Fault, event));
        } else if let Some(event) =
            may.run(Start::Arm64Fault, || user_fault::parse_arm64_fault(message))
        {
            self.open = Some(open(Shape::Arm64Fault, event));
        } else if let Some((arch, event)) = arch::parse_among(message, may) {
            self.open = Some(open(Shape::Arch(arch), event));
        } else if let Some(header) = may.run(Start::HungTask, || hung::parse_header(message)) {
            let mut event = CrashEvent::new(EventKind::HungTask);
            event.comm = Some(header.comm);
            event.pid = Some(header.pid);
            event.blocked_seconds = Some(header.blocked_seconds);
            event.detected_by = Some(DetectedBy::KernelReport);
            self.open = Some(open(Shape::Hung { stack_done: false }, event));
        } else if let Some((blocked, blocker)) = may.run(Start::HungTask, || {
            hung::parse_blocked_task(message).zip(hung::parse_blocker(message))
        }) {
            // A lock-owner line whose hung-task header was not seen.
            let mut event = CrashEvent::new(EventKind::HungTask);
            event.comm = Some(blocked.0);
            event.pid = Some(blocked.1);
            event.detected_by = Some(DetectedBy::KernelReport);
            event.explanation = Some(blocker);
            self.open = Some(open(Shape::Hung { stack_done: true }, event));
        } else if may.may(Start::HungTaskSuppressed) && hung::is_suppression_notice(message) {
            out.push(Recognised::HungTaskReportsSuppressed);
        } else if let Some(count) = may.run(Start::CrashesSuppressed, || {
            misc::parse_crash_suppression(message)
        }) {
            out.push(Recognised::CrashesSuppressed(count));
        } else if let Some(error) = may.run(Start::Nbd, || misc::parse_nbd(message)) {
            if error.meaning == misc::NBD_SHUTDOWN && self.disconnect_announced(&error.device, line)
            {
                return;
            }
            let mut event = CrashEvent::new(EventKind::NbdError);
            event.explanation = Some(format!("{}: {}.", error.device, error.meaning));
            event.device = Some(error.device);
            self.open = Some(open(Shape::Nbd, event));
        } else if let Some(device) = may.run(Start::Nbd, || misc::parse_nbd_disconnect(message)) {
            self.nbd_disconnect = Some((device.to_owned(), line.monotonic_usec));
        } else if let Some(invoker) =
            may.run(Start::OomInvoker, || misc::parse_oom_invoker(message))
        {
            let mut event = CrashEvent::new(EventKind::OomKill);
            event.comm = Some(invoker.to_owned());
            self.open = Some(open(Shape::Oom { records: 1 }, event));
        } else if let Some(victim) = may.run(Start::OomChoice, || misc::parse_oom_choice(message)) {
            let mut event = CrashEvent::new(EventKind::OomKill);
            event.comm = Some(victim.comm.clone());
            event.victim_pid = Some(victim.pid);
            event.victim_comm = Some(victim.comm);
            self.open = Some(open(Shape::OomChosen, event));
        } else if let Some(victim) = may.run(Start::OomKill, || misc::parse_oom_kill(message)) {
            let mut event = CrashEvent::new(EventKind::OomKill);
            event.comm = Some(victim.comm.clone());
            event.victim_pid = Some(victim.pid);
            event.victim_comm = Some(victim.comm);
            out.push(found(event, line));
        } else if may.may(Start::Oops) && misc::is_oops_header(message) {
            let mut event = CrashEvent::new(EventKind::KernelOops);
            event.fault_address = misc::parse_oops_address(message).map(crds::Address);
            self.open = Some(open(Shape::Oops { records: 1 }, event));
        }
    }
}

impl Recogniser {
    /// Whether `device` announced an orderly disconnect just before `line` (the notice is
    /// used up): its `shutting down sockets` is then no failure.
    fn disconnect_announced(&mut self, device: &str, line: &LogLine) -> bool {
        let Some((announced, at)) = self.nbd_disconnect.take() else {
            return false;
        };
        let recent = match (at, line.monotonic_usec) {
            (Some(at), Some(now)) => now.saturating_sub(at) <= NBD_DISCONNECT_WINDOW_USEC,
            _ => true,
        };
        announced == device && recent
    }
}

fn found(mut event: CrashEvent, line: &LogLine) -> Recognised {
    event.kmsg_seq = line.seq;
    event.raw.push(line.raw_text().to_owned());
    Recognised::Event(Box::new(Found {
        event,
        monotonic_usec: line.monotonic_usec,
    }))
}

/// Whether a line starts a user-space or hang report of its own, and so cannot belong to an
/// open oops or OOM report (another CPU printed it in between). `may` is the line's
/// [`prefilter::candidates`].
fn starts_report(message: &str, may: prefilter::Candidates) -> bool {
    may.run(Start::Segfault, || user_fault::parse_segfault(message))
        .is_some()
        || may
            .run(Start::Trap, || user_fault::parse_trap(message))
            .is_some()
        || arch::parse_among(message, may).is_some()
        || may
            .run(Start::HungTask, || hung::parse_header(message))
            .is_some()
}

/// Whether a line starts any report or notice on its own.
fn starts_anything(message: &str) -> bool {
    let mut scratch = Recogniser::new();
    !scratch.feed_one(LogLine::bare(message)).is_empty() || scratch.has_open_report()
}

/// The kernel lines inside one line of text, when there is more than one: a `traps:` report
/// glued to the end of another (`… error 14traps: kdump[5307] general protection …`), or a
/// dmesg timestamp after other text (a shell prompt, a `grep -n` prefix, another record).
fn glued_pieces(message: &str) -> Option<Vec<&str>> {
    let mut starts: Vec<usize> = message
        .match_indices("traps: ")
        .map(|(at, _)| at)
        .filter(|&at| at > 0)
        .collect();
    starts.extend(
        message
            .match_indices('[')
            .map(|(at, _)| at)
            .filter(|&at| at > 0 && is_timestamp_at(&message[at..])),
    );
    if starts.is_empty() {
        return None;
    }
    starts.sort_unstable();
    starts.insert(0, 0);
    starts.push(message.len());
    Some(
        starts
            .windows(2)
            .map(|w| &message[w[0]..w[1]])
            .filter(|piece| !piece.trim().is_empty())
            .collect(),
    )
}

/// Whether `text` starts with a dmesg timestamp, `[  605.503265]`.
fn is_timestamp_at(text: &str) -> bool {
    let Some((inner, _)) = text[1..].split_once(']') else {
        return false;
    };
    let Some((secs, frac)) = inner.trim().split_once('.') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(secs) && digits(frac) && frac.len() <= 9
}

impl OpenReport {
    /// The report `line` opens; the caller adds the line's text to its `raw`.
    fn new(shape: Shape, mut event: CrashEvent, line: &LogLine) -> Self {
        event.kmsg_seq = line.seq;
        OpenReport {
            shape,
            found: Box::new(Found {
                event,
                monotonic_usec: line.monotonic_usec,
            }),
            first_seq: line.seq,
            records: 1,
            omitted: 0,
        }
    }

    /// Whether the open report takes `line`; a line it takes leaves its text (`raw`) to it.
    fn absorb(&mut self, line: &mut LogLine) -> Absorb {
        let message = line.message.as_str();
        let event = &mut self.found.event;
        let verdict = match &mut self.shape {
            Shape::X86Fault => match message.strip_prefix("Code: ") {
                Some(code) => {
                    if !code.starts_with("Unable to access opcode bytes") {
                        event.code = Some(code.trim().to_owned());
                    }
                    Absorb::TakenAndComplete
                }
                None if user_fault::trailing_location(event, message) => Absorb::Taken,
                None => Absorb::NotMine,
            },
            Shape::Arm64Fault => {
                if user_fault::arm64_register(event, message) {
                    Absorb::Taken
                } else {
                    Absorb::NotMine
                }
            }
            Shape::Arch(which) => match arch::continuation(*which, event, message) {
                arch::Continuation::Taken => Absorb::Taken,
                arch::Continuation::TakenAndComplete => Absorb::TakenAndComplete,
                arch::Continuation::NotMine => Absorb::NotMine,
            },
            Shape::Hung { stack_done } => {
                if hung::parse_header(message).is_some() || !hung::is_report_continuation(message) {
                    Absorb::NotMine
                } else {
                    if let Some(blocker) = hung::parse_blocker(message) {
                        event.explanation.get_or_insert(blocker);
                        *stack_done = true;
                    } else if message.trim() == "</TASK>" {
                        *stack_done = true;
                    } else if let Some(frame) = hung::stack_frame(message)
                        .filter(|_| !*stack_done && event.kernel_stack.len() < MAX_KERNEL_STACK)
                    {
                        event.kernel_stack.push(frame.to_owned());
                    }
                    Absorb::Taken
                }
            }
            Shape::Oops { records } => {
                if starts_report(message, prefilter::candidates(message)) {
                    Absorb::NotMine
                } else {
                    *records += 1;
                    if let Some((cpu, pid, comm)) = misc::parse_oops_task(message) {
                        event.cpu.get_or_insert(cpu);
                        event.pid.get_or_insert(pid);
                        event.comm.get_or_insert(comm);
                    } else if let Some(location) = misc::parse_oops_location(message) {
                        if event.kernel_stack.is_empty() {
                            event.kernel_stack.push(location.to_owned());
                        }
                    } else if event.fault_address.is_none() {
                        event.fault_address = misc::parse_oops_address(message).map(crds::Address);
                    }
                    if misc::is_oops_end(message) || *records >= MAX_REPORT_RECORDS {
                        Absorb::TakenAndComplete
                    } else {
                        Absorb::Taken
                    }
                }
            }
            Shape::Oom { records } => {
                // Most records of an OOM report list tasks: none of the texts below is in them.
                let may = prefilter::candidates(message);
                if starts_report(message, may)
                    || may
                        .run(Start::OomInvoker, || misc::parse_oom_invoker(message))
                        .is_some()
                {
                    Absorb::NotMine
                } else {
                    *records += 1;
                    if let Some((cpu, pid, _)) = misc::parse_oops_task(message) {
                        event.cpu.get_or_insert(cpu);
                        event.pid.get_or_insert(pid);
                    }
                    if let Some(ids) = misc::parse_oom_task_memcg(message)
                        .and_then(crate::coredump::attribute::ids_in_path)
                    {
                        // The victim's pod and container by id; the agent adds the names.
                        let (pod, container) = crate::coredump::attribute::refs_in_bundle(
                            &serde_json::Value::Null,
                            &ids,
                        );
                        event.pod = Some(pod);
                        event.container = Some(container);
                    }
                    if let Some(victim) = may.run(Start::OomKill, || misc::parse_oom_kill(message))
                    {
                        event.victim_pid = Some(victim.pid);
                        event.victim_comm = Some(victim.comm);
                        Absorb::TakenAndComplete
                    } else if let Some(chosen) =
                        may.run(Start::OomChoice, || misc::parse_oom_choice(message))
                    {
                        event.victim_pid = Some(chosen.pid);
                        event.victim_comm = Some(chosen.comm);
                        Absorb::Taken
                    } else if *records >= MAX_REPORT_RECORDS {
                        Absorb::TakenAndComplete
                    } else {
                        Absorb::Taken
                    }
                }
            }
            Shape::OomChosen => match misc::parse_oom_kill(message) {
                Some(victim) => {
                    event.victim_pid = Some(victim.pid);
                    event.victim_comm = Some(victim.comm);
                    Absorb::TakenAndComplete
                }
                None => Absorb::NotMine,
            },
            Shape::Nbd => match misc::parse_nbd(message) {
                Some(error) if Some(&error.device) == event.device.as_ref() => Absorb::Taken,
                _ => Absorb::NotMine,
            },
        };
        if matches!(verdict, Absorb::NotMine) {
            return verdict;
        }
        if event.raw.len() < MAX_RAW_LINES {
            event.raw.push(line.take_raw_text());
        } else {
            self.omitted += 1;
        }
        self.records += 1;
        if self.records >= MAX_REPORT_RECORDS {
            Absorb::TakenAndComplete
        } else {
            verdict
        }
    }
}

/// Recognises every event in a complete text (one log line per line), in order.
pub fn recognise_text(text: &str) -> Vec<Recognised> {
    let mut recogniser = Recogniser::new();
    let mut out: Vec<Recognised> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .flat_map(|l| recogniser.feed(LogLine::parse_text(l)))
        .collect();
    out.extend(recogniser.flush());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &str) -> Vec<CrashEvent> {
        recognise_text(text)
            .into_iter()
            .filter_map(|r| match r {
                Recognised::Event(found) => Some(found.event),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_segfault_is_paired_with_its_code_record() {
        let text = "6,346,605503265,-;crashy[10504]: segfault at 100 ip 0000564bc14194f0 sp 00007ffc75ee83d8 error 4 in crashy[14f0,564bc1419000+1000] likely on CPU 0 (core 0, socket 0)
6,347,605503279,-;Code: ff e8 64 ff ff ff c6 05 f5 2b 00 00 01 5d c3 0f 1f 00 c3 0f 1f 80 00 00 00 00 f3 0f 1e fa e9 77 ff ff ff 0f 1f 80 00 00 00 00 <48> 8b 87 00 01 00 00 c3 0f 1f 84 00 00 00 00 00 53 48 89 fb e8 d7
6,350,605515912,-;crashy[10508]: segfault at 0 ip 0000000000000000 sp 00007ffdd7237068 error 14 likely on CPU 0 (core 0, socket 0)
6,351,605515921,-;Code: Unable to access opcode bytes at 0xffffffffffffffd6.
6,356,605535707,-;traps: crashy[10515] general protection fault ip:560331b03580 sp:7ffc62cb8048 error:0 in crashy[1580,560331b03000+1000]";
        let found = events(text);
        assert_eq!(found.len(), 3);
        assert!(
            found[0]
                .code
                .as_deref()
                .unwrap()
                .contains("<48> 8b 87 00 01 00 00")
        );
        assert_eq!(found[0].kmsg_seq, Some(346));
        assert_eq!(found[0].raw.len(), 2);
        assert_eq!(found[1].code, None, "unreadable opcode bytes are not code");
        assert_eq!(found[1].raw.len(), 2);
        assert_eq!(found[2].kind, EventKind::GeneralProtection);
    }

    #[test]
    fn the_cursor_stays_before_an_open_report() {
        let mut r = Recogniser::new();
        let seg = LogLine::parse_text(
            "6,10,1,-;a[1]: segfault at 0 ip 0000000000000001 sp 0000000000000002 error 4",
        );
        assert!(r.feed(seg).is_empty());
        assert_eq!(r.oldest_pending_seq(), Some(10));
        let out = r.feed(LogLine::parse_text("6,11,2,-;Code: 90 <90> 90"));
        assert_eq!(out.len(), 1);
        assert_eq!(r.oldest_pending_seq(), None);
    }

    #[test]
    fn a_hung_task_report_is_one_event_with_its_stack() {
        let text = r#"3,8316,1299450327,-;INFO: task qemu-nbd:645 blocked for more than 2 seconds.
3,8317,1299451112,-;      Not tainted 6.18.44-fc-v669 #1
3,8318,1299451684,-;"echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.
6,8319,1299452574,-;task:qemu-nbd        state:D stack:0     pid:645   tgid:645   ppid:584    task_flags:0x400000 flags:0x00080001
6,8320,1299452580,-;Call Trace:
6,8321,1299452582,-; <TASK>
6,8322,1299452602,-; __schedule+0x3cc/0xf50
6,8323,1299452611,-; ? srso_alias_return_thunk+0x5/0xfbef5
6,8324,1299452618,-; schedule+0x23/0xa0
6,8326,1299452623,-; folio_wait_bit+0xd6/0x220
6,8331,1299452654,-; blkdev_fsync+0x38/0x60
6,8346,1299452713,-; entry_SYSCALL_64_after_hwframe+0x76/0x7e
6,8347,1299452716,-;RIP: 0033:0x7fe35d664c20
6,8348,1299452718,-;RSP: 002b:00007ffd6c974ea8 EFLAGS: 00000202 ORIG_RAX: 000000000000004a
6,8354,1299452736,-; </TASK>
6,8355,1299452800,-;crashy[1]: segfault at 0 ip 0000000000000001 sp 0000000000000002 error 4"#;
        let found = events(text);
        assert_eq!(found.len(), 2);
        let hung = &found[0];
        assert_eq!(hung.kind, EventKind::HungTask);
        assert_eq!(
            (hung.comm.as_deref(), hung.pid, hung.blocked_seconds),
            (Some("qemu-nbd"), Some(645), Some(2))
        );
        assert_eq!(
            hung.kernel_stack,
            [
                "__schedule+0x3cc/0xf50",
                "schedule+0x23/0xa0",
                "folio_wait_bit+0xd6/0x220",
                "blkdev_fsync+0x38/0x60",
                "entry_SYSCALL_64_after_hwframe+0x76/0x7e"
            ]
        );
        assert_eq!(hung.raw.len(), 15);
        assert_eq!(found[1].kind, EventKind::Segfault);
    }

    #[test]
    fn consecutive_hung_reports_are_separate_events() {
        let text = "INFO: task a:1 blocked for more than 2 seconds.\n task:a state:D\nINFO: task b:2 blocked for more than 2 seconds.";
        let found = events(text);
        assert_eq!(
            found.iter().map(|e| e.pid).collect::<Vec<_>>(),
            [Some(1), Some(2)]
        );
    }

    #[test]
    fn user_written_lines_are_untrusted_and_break_nothing() {
        let out = recognise_text(
            "14,8265,1,-;faultlab-fake[123]: segfault at 100 ip 0000000000000001 sp 0000000000000002 error 4",
        );
        assert_eq!(out, [Recognised::Untrusted]);
    }

    #[test]
    fn suppression_notices() {
        let out = recognise_text(
            "4,394,659669993,-;show_signal_msg: 990 callbacks suppressed\n6,8264,1,-;Future hung task reports are suppressed, see sysctl kernel.hung_task_warnings",
        );
        assert_eq!(
            out,
            [
                Recognised::CrashesSuppressed(990),
                Recognised::HungTaskReportsSuppressed
            ]
        );
    }

    #[test]
    fn nbd_errors_on_one_device_group_into_one_incident() {
        let text = "block nbd0: Connection timed out\nblock nbd0: shutting down sockets\nI/O error, dev nbd0, sector 0 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0\nblock nbd1: Connection timed out";
        let found = events(text);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].raw.len(), 3);
        assert_eq!(found[0].device.as_deref(), Some("nbd0"));
        assert_eq!(found[1].device.as_deref(), Some("nbd1"));
    }

    #[test]
    fn an_orderly_nbd_disconnect_is_no_failure() {
        // Debian's 6.1 in the fault VM (tests/fault_vm_kmsg.rs): `nbd-client -d` of a healthy
        // device, then of one whose server was killed.
        let text = "[   14.557620] block nbd0: NBD_DISCONNECT
[   14.560592] block nbd0: Disconnected due to user request.
[   14.561755] block nbd0: shutting down sockets
[   22.680956] block nbd2: Receive control failed (result -32)
[   22.882738] block nbd2: NBD_DISCONNECT
[   22.882939] block nbd2: Send disconnect failed -32
[   22.883008] block nbd2: shutting down sockets";
        let found = events(text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].device.as_deref(), Some("nbd2"));
        assert_eq!(
            found[0].raw,
            ["[   22.680956] block nbd2: Receive control failed (result -32)"]
        );
        // A shutdown with no notice, of another device, or long after it is a failure.
        for text in [
            "block nbd0: shutting down sockets",
            "block nbd1: NBD_DISCONNECT\nblock nbd0: shutting down sockets",
            "[   10.000000] block nbd0: NBD_DISCONNECT\n[   15.000001] block nbd0: shutting down sockets",
        ] {
            let found = events(text);
            assert_eq!(found.len(), 1, "{text}: {found:?}");
            assert_eq!(found[0].device.as_deref(), Some("nbd0"), "{text}");
        }
    }

    #[test]
    fn a_huge_hung_task_report_and_an_nbd_error_storm_stay_within_the_report_bounds() {
        // A hung-task report whose stack goes on for 3000 frames.
        let mut text = String::from(
            "INFO: task qemu-nbd:645 blocked for more than 2 seconds.\ntask:qemu-nbd state:D\nCall Trace:\n <TASK>\n",
        );
        for i in 0..3000 {
            text.push_str(&format!(" frame_{i}+0x10/0x20\n"));
        }
        text.push_str(" </TASK>\n");
        // 4000 errors of one nbd device in a row.
        for i in 0..4000 {
            text.push_str(&format!(
                "I/O error, dev nbd0, sector {i} op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0\n"
            ));
        }
        let found = events(&text);
        let hung = &found[0];
        assert_eq!(hung.kind, EventKind::HungTask);
        assert_eq!(hung.kernel_stack.len(), 64, "the innermost 64 frames");
        assert_eq!(hung.kernel_stack[0], "frame_0+0x10/0x20");
        assert_eq!(hung.raw.len(), 100);
        assert_eq!(
            hung.raw[0],
            "INFO: task qemu-nbd:645 blocked for more than 2 seconds."
        );
        // 3005 lines in all, 99 kept as they were.
        assert_eq!(hung.raw[99], "[2906 more lines omitted]");
        let nbd: Vec<_> = found
            .iter()
            .filter(|e| e.kind == EventKind::NbdError)
            .collect();
        assert_eq!(
            nbd.len(),
            1,
            "4000 records are one incident (below the record bound)"
        );
        assert_eq!(nbd[0].raw.len(), 100);
        assert_eq!(nbd[0].raw[99], "[3901 more lines omitted]");
    }

    #[test]
    fn an_oops_is_never_a_user_crash() {
        let text = "BUG: kernel NULL pointer dereference, address: 0000000000000008
#PF: supervisor read access in kernel mode
Oops: 0000 [#1] PREEMPT SMP NOPTI
CPU: 1 PID: 4242 Comm: qemu-nbd Not tainted 6.1.0 #1
RIP: 0010:nbd_queue_rq+0x12/0x340 [nbd]
---[ end trace 0000000000000000 ]---
qemu-nbd[1]: segfault at 0 ip 0000000000000001 sp 0000000000000002 error 4";
        let found = events(text);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].kind, EventKind::KernelOops);
        assert_eq!(
            (found[0].pid, found[0].comm.as_deref()),
            (Some(4242), Some("qemu-nbd"))
        );
        assert_eq!(found[0].kernel_stack, ["nbd_queue_rq+0x12/0x340 [nbd]"]);
        assert_eq!(found[0].raw.len(), 6);
        assert_eq!(found[1].kind, EventKind::Segfault);
    }

    #[test]
    fn reports_glued_into_one_line_are_each_recognised() {
        // Two CPUs printing at once: the second report starts right after the first one's
        // error code, and the first one's location arrives later on its own.
        let found = events(
            "cat[11602]: segfault at 0 ip           (null) sp 00007fff85a583f0 error 14traps: kdump[5307] general protection ip:3c8d22a8db sp:7fff03d1b418 error:0 in libc-2.12.so[3c8d200000+18a000]",
        );
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].kind, found[0].comm.as_deref(), found[0].error_code),
            (EventKind::Segfault, Some("cat"), Some(0x14))
        );
        assert_eq!(
            (
                found[1].kind,
                found[1].comm.as_deref(),
                found[1].module.as_deref()
            ),
            (
                EventKind::GeneralProtection,
                Some("kdump"),
                Some("libc-2.12.so")
            )
        );
        // A shell prompt in front of the timestamp.
        let found = events(
            "root@Gateway:~# [138846.005947] do_page_fault(): sending SIGSEGV to pidof for invalid read access from 00000ea1\n[138846.014883] epc = 77e1f034 in libc.so[77d98000+b2000]\n[138846.020327] ra  = 77e1f3f8 in libc.so[77d98000+b2000]",
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].comm.as_deref(), Some("pidof"));
        assert_eq!(found[0].module.as_deref(), Some("libc.so"));
        assert_eq!(found[0].raw.len(), 3);
    }

    #[test]
    fn a_kmsg_record_is_never_split_by_the_task_name_it_prints() {
        // A task may name itself like a timestamp or a `traps:` line; in a record read from
        // /dev/kmsg that text is the task name, and the report must survive it.
        let found = events(
            "3,10,1,-;INFO: task [1.1] a:5 blocked for more than 120 seconds.\n6,11,2,-;xtraps: b[6]: segfault at 0 ip 0000000000000001 sp 0000000000000002 error 4",
        );
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].kind, found[0].comm.as_deref(), found[0].pid),
            (EventKind::HungTask, Some("[1.1] a"), Some(5))
        );
        assert_eq!(found[1].comm.as_deref(), Some("xtraps: b"));
    }

    #[test]
    fn no_user_crash_from_context_registers_or_kernel_faults() {
        let text = "CPU: 3 PID: 1673 Comm: udevd Not tainted 4.14.0-xilinx-v2018.2 #5
pc : [<0000007f9867eb10>] lr : [<0000007f98681b20>] pstate: 60000000
x29: 0000007fc50c0b50 x28: 0000007f98758a20
epc : 0000003faee8d1aa ra : 0000003faf093baa sp : 0000003faae67fc0
User PSW : 0705000180000000 000003ff9ed119fe
Call Trace:
 [<ffffffff8150b9f5>] schedule+0x35/0x80
NIP [c0088b8c] free_block+0xc4/0x16c
Code: 48 89 44 24 38 31 c0 <ff> 10
epc = 77e1f034 in libc.so[77d98000+b2000]
vi[4489]: code: 813f000c 2c090000 41800034 813f0008 <8129010c> 815f000c 7c0a4800 40800020
swapper/2[0]: undefined instruction: pc=ffffffc0006e77e4
Failing address: 00000d52b2080000 TEID: 00000d52b2080800
traps: PANIC: double fault, error_code: 0x0";
        let found = events(text);
        assert!(found.iter().all(|e| !e.kind.is_user_crash()), "{found:#?}");
    }

    #[test]
    fn an_old_oom_kill_names_the_chosen_victim() {
        let found = events(
            "Out of memory: Kill process 18694 (perl) score 246 or sacrifice child\nKilled process 18694 (perl) total-vm:1972392kB, anon-rss:1953348kB, file-rss:0kB",
        );
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].victim_pid, found[0].victim_comm.as_deref()),
            (Some(18694), Some("perl"))
        );
        assert_eq!(found[0].raw.len(), 2);
    }

    #[test]
    fn oom_kill_names_the_invoker_and_the_victim() {
        let text = "qemu-nbd invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), order=0, oom_score_adj=0\nOut of memory: Killed process 4711 (java) total-vm:1kB, anon-rss:1kB";
        let found = events(text);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].comm.as_deref(), Some("qemu-nbd"));
        assert_eq!(
            (found[0].victim_pid, found[0].victim_comm.as_deref()),
            (Some(4711), Some("java"))
        );
    }

    #[test]
    fn an_oom_kill_in_a_pod_names_the_pod_and_container_by_id() {
        // The 5.x summary line, with a kubelet cgroupfs path.
        let text = "stress invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=999\n\
            oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=ca1d417e0814,mems_allowed=0,oom_memcg=/kubepods/burstable/pod863a656b-ce85-4ab3-a7fd-71ebe3d3a5df,task_memcg=/kubepods/burstable/pod863a656b-ce85-4ab3-a7fd-71ebe3d3a5df/ca1d417e0814bae39a16aaccd7a65b99e61d28c3ad16730d6e99eb44a9b4b708,task=stress,pid=4711,uid=0\n\
            Memory cgroup out of memory: Killed process 4711 (stress) total-vm:1kB, anon-rss:1kB";
        let found = events(text);
        assert_eq!(found.len(), 1);
        let pod = found[0].pod.as_ref().unwrap();
        assert_eq!(
            pod.uid.as_deref(),
            Some("863a656b-ce85-4ab3-a7fd-71ebe3d3a5df")
        );
        assert_eq!(
            found[0].container.as_ref().unwrap().id.as_deref(),
            Some("containerd://ca1d417e0814bae39a16aaccd7a65b99e61d28c3ad16730d6e99eb44a9b4b708")
        );
        // A host process's OOM kill names no pod.
        let host = events(
            "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/user.slice,task=stress,pid=4711,uid=0\nOut of memory: Killed process 4711 (stress) total-vm:1kB, anon-rss:1kB",
        );
        assert!(host.iter().all(|e| e.pod.is_none()), "{host:?}");
    }
}
