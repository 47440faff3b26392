//! One pass over a line that tells which recognisers could start a report on it (pure).
//!
//! Every recogniser that starts a report or gives a notice requires a fixed text of the
//! kernel's format string in the line before it looks any further: `]: segfault at `, ` ip:`,
//! `INFO: task `, `Killed process `… [`candidates`] looks for all of those texts in one pass,
//! and a recogniser is then run only when its own text is present. A recogniser is never
//! skipped on a line it would accept, so no answer changes; most records (register dumps, call
//! traces, driver messages) contain none of the texts and cost that one pass.
//!
//! A recogniser added to [`super::Recogniser`]'s start needs its text in [`candidates`]; the
//! tests below check every recogniser against its text on every line the tests know.

use super::misc;

/// The recognisers that can start a report or give a notice, in the order they are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// [`super::user_fault::parse_segfault`].
    Segfault,
    /// [`super::user_fault::parse_trap`].
    Trap,
    /// [`super::user_fault::parse_arm64_fault`].
    Arm64Fault,
    /// [`super::arch::parse_powerpc`].
    PowerPc,
    /// [`super::arch::parse_riscv`].
    RiscV,
    /// [`super::arch::parse_s390`].
    S390,
    /// [`super::arch::parse_mips`].
    Mips,
    /// [`super::arch::parse_arm_undefined`].
    ArmUndefined,
    /// [`super::hung::parse_header`], and [`super::hung::parse_blocked_task`] with
    /// [`super::hung::parse_blocker`].
    HungTask,
    /// [`super::hung::is_suppression_notice`].
    HungTaskSuppressed,
    /// [`super::misc::parse_crash_suppression`].
    CrashesSuppressed,
    /// [`super::misc::parse_nbd`] and [`super::misc::parse_nbd_disconnect`].
    Nbd,
    /// [`super::misc::parse_oom_invoker`].
    OomInvoker,
    /// [`super::misc::parse_oom_choice`].
    OomChoice,
    /// [`super::misc::parse_oom_kill`].
    OomKill,
    /// [`super::misc::is_oops_header`].
    Oops,
}

/// Which bytes an oops header starts with, so that most lines skip comparing the headers.
const OOPS_FIRST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < misc::OOPS_HEADERS.len() {
        table[misc::OOPS_HEADERS[i].as_bytes()[0] as usize] = true;
        i += 1;
    }
    table
};

/// The set of recognisers whose required text a line contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidates(u32);

impl Candidates {
    /// Every recogniser, as if no line were filtered.
    pub const ALL: Candidates = Candidates(u32::MAX);

    /// Whether `start` may accept the line.
    pub fn may(self, start: Start) -> bool {
        self.0 & (1 << start as u32) != 0
    }

    /// Runs the recogniser `recognise` only when the line contains the text `start` requires.
    pub fn run<T>(self, start: Start, recognise: impl FnOnce() -> Option<T>) -> Option<T> {
        if self.may(start) { recognise() } else { None }
    }

    /// Whether no recogniser can accept the line.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// The recognisers whose required text `message` contains. The texts, each as its recogniser
/// requires it:
/// - `NAME[PID]: ` for the user faults of every architecture (`]: segfault at `, `]: unhandled `,
///   powerpc's `]: ` with ` nip `), or a line that starts with `segfault at `;
/// - ` ip:` or ` rip:` for x86 traps; `User process fault: ` (s390); `do_page_fault(): ` or
///   `do_page_fault() #2: ` (MIPS);
/// - `INFO: task ` and `Future hung task reports are suppressed` at the start of a line,
///   ` callbacks suppressed` at its end;
/// - `nbd`; ` invoked oom-killer: `; `: Kill process ` (or `kill`); `Killed process ` at the
///   start of a line or after `: `; an oops header at the start of a line.
///
/// All but `nbd` and the ones a line starts or ends with have a `:`, so one `memchr` pass over
/// the colons and a look at the text around each finds them.
pub fn candidates(message: &str) -> Candidates {
    #[cfg(test)]
    if tests::FILTER_OFF.get() {
        return Candidates::ALL;
    }
    let line = message.as_bytes();
    let mut may = Candidates(0);
    let mut add = |start: Start| may.0 |= 1 << start as u32;
    if line.starts_with(b"segfault at ") {
        add(Start::Segfault);
    }
    if line.starts_with(b"INFO: task ") {
        add(Start::HungTask);
    }
    if line.starts_with(b"Future hung task reports are suppressed") {
        add(Start::HungTaskSuppressed);
    }
    if line.ends_with(b" callbacks suppressed") {
        add(Start::CrashesSuppressed);
    }
    if line.starts_with(b"Killed process ") {
        add(Start::OomKill);
    }
    if line
        .first()
        .is_some_and(|&b| OOPS_FIRST_BYTES[usize::from(b)])
        && misc::is_oops_header(message)
    {
        add(Start::Oops);
    }
    if anchor!("nbd").find(line).is_some() {
        add(Start::Nbd);
    }
    for colon in memchr::memchr_iter(b':', line) {
        let (before, after) = (&line[..colon], &line[colon + 1..]);
        // The byte before the colon tells which texts can end there.
        match before.last() {
            Some(b']') => {
                if after.starts_with(b" segfault at ") {
                    add(Start::Segfault);
                }
                if after.starts_with(b" unhandled ") {
                    add(Start::Arm64Fault);
                }
                if after.starts_with(b" unhandled signal ") {
                    add(Start::RiscV);
                }
                if after.starts_with(b" undefined instruction: pc=") {
                    add(Start::ArmUndefined);
                }
                // powerpc prints `NAME[PID]: ` and a signal's name after it.
                add(Start::PowerPc);
            }
            Some(b'p') if before.ends_with(b" ip") || before.ends_with(b" rip") => {
                add(Start::Trap);
            }
            Some(b't') if before.ends_with(b"User process fault") => add(Start::S390),
            Some(b')' | b'2')
                if before.ends_with(b"do_page_fault()")
                    || before.ends_with(b"do_page_fault() #2") =>
            {
                add(Start::Mips);
            }
            Some(b'r') if before.ends_with(b" invoked oom-killer") => add(Start::OomInvoker),
            _ => {}
        }
        if let [b' ', b'K' | b'k', ..] = after {
            if after.starts_with(b" Killed process ") {
                add(Start::OomKill);
            }
            if after.starts_with(b" Kill process ") || after.starts_with(b" kill process ") {
                add(Start::OomChoice);
            }
        }
    }
    may
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    use super::super::{Recognised, Recogniser, arch, hung, misc, recognise_text, user_fault};
    use super::*;
    use crate::kmsg::parse_record;
    use crate::recognise::LogLine;

    thread_local! {
        /// Set by [`unfiltered`]: this thread's recognisers try every recogniser on every line.
        pub(crate) static FILTER_OFF: Cell<bool> = const { Cell::new(false) };
    }

    /// Runs `f` with the pre-filter off on this thread.
    fn unfiltered<T>(f: impl FnOnce() -> T) -> T {
        FILTER_OFF.set(true);
        let out = f();
        FILTER_OFF.set(false);
        out
    }

    /// The recognisers that accept `message`, each tried on its own.
    fn accepted_by(message: &str) -> Vec<Start> {
        let mut accepted = Vec::new();
        let mut add = |start, yes: bool| {
            if yes {
                accepted.push(start);
            }
        };
        add(
            Start::Segfault,
            user_fault::parse_segfault(message).is_some(),
        );
        add(Start::Trap, user_fault::parse_trap(message).is_some());
        add(
            Start::Arm64Fault,
            user_fault::parse_arm64_fault(message).is_some(),
        );
        add(Start::PowerPc, arch::parse_powerpc(message).is_some());
        add(Start::RiscV, arch::parse_riscv(message).is_some());
        add(Start::S390, arch::parse_s390(message).is_some());
        add(Start::Mips, arch::parse_mips(message).is_some());
        add(
            Start::ArmUndefined,
            arch::parse_arm_undefined(message).is_some(),
        );
        add(
            Start::HungTask,
            hung::parse_header(message).is_some()
                || hung::parse_blocked_task(message).is_some()
                || hung::parse_blocker(message).is_some(),
        );
        add(
            Start::HungTaskSuppressed,
            hung::is_suppression_notice(message),
        );
        add(
            Start::CrashesSuppressed,
            misc::parse_crash_suppression(message).is_some(),
        );
        add(
            Start::Nbd,
            misc::parse_nbd(message).is_some() || misc::parse_nbd_disconnect(message).is_some(),
        );
        add(
            Start::OomInvoker,
            misc::parse_oom_invoker(message).is_some(),
        );
        add(Start::OomChoice, misc::parse_oom_choice(message).is_some());
        add(Start::OomKill, misc::parse_oom_kill(message).is_some());
        add(Start::Oops, misc::is_oops_header(message));
        accepted
    }

    /// Every kernel line the tests know: the public corpus, the benchmark's storm records,
    /// and every line of every string literal in the recogniser's sources and its tests.
    fn known_lines() -> Vec<String> {
        const SOURCES: [&str; 20] = [
            include_str!("../../tests/data/public-kernel-lines.txt"),
            include_str!("mod.rs"),
            include_str!("user_fault.rs"),
            include_str!("arch.rs"),
            include_str!("hung.rs"),
            include_str!("misc.rs"),
            include_str!("line.rs"),
            include_str!("error_code.rs"),
            include_str!("../kmsg/record.rs"),
            include_str!("../conditions/mod.rs"),
            include_str!("../explain/mod.rs"),
            include_str!("../hangwatch/mod.rs"),
            include_str!("../../tests/public_lines.rs"),
            include_str!("../../tests/kernel.rs"),
            include_str!("../../tests/cli.rs"),
            include_str!("../../tests/debuginfod.rs"),
            include_str!("../../tests/fault_vm.rs"),
            include_str!("../../tests/hang.rs"),
            include_str!("../../tests/node_conditions.rs"),
            include_str!("../../tests/storm.rs"),
        ];
        let mut lines: Vec<String> = SOURCES[0]
            .lines()
            .filter(|l| !l.starts_with("## "))
            .map(str::to_owned)
            .collect();
        for source in &SOURCES[1..] {
            lines.extend(string_literals(source));
        }
        for i in 0..3 {
            lines.push(format!(
                "6,{},{},-;crashy[{}]: segfault at 100 ip 000055d0c8a4c1c7 sp 00007ffd5d1e3c00 error 4 in crashy[1c7,55d0c8a4c000+1000] likely on CPU 1 (core 1, socket 0)",
                2 * i,
                i * 1000,
                4000 + i
            ));
            lines.push(format!("6,{},{},c;Code: 00 00 00 00 00 00 00 55 48 89 e5 48 89 7d f8 48 8b 45 f8 <48> 8b 80 00 01 00 00 5d c3 55 48 89 e5 48 83 ec 10 89 7d fc", 2 * i + 1, i * 1000 + 1));
        }
        lines
    }

    /// The lines of the string literals in Rust source text (`"…"` and `r#"…"#`, with the
    /// common escapes undone; good enough for kernel lines, which have no odd escapes).
    fn string_literals(source: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = source;
        while let Some(at) = rest.find('"') {
            let raw = rest[..at].ends_with("r#");
            let body = &rest[at + 1..];
            let (text, after) = if raw {
                match body.split_once("\"#") {
                    Some((text, after)) => (text.to_owned(), after),
                    None => break,
                }
            } else {
                let mut text = String::new();
                let mut chars = body.char_indices();
                let mut end = body.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        '\\' => match chars.next() {
                            Some((_, 'n')) => text.push('\n'),
                            Some((_, 't')) => text.push('\t'),
                            Some((_, '\n')) => {
                                // A continued line: skip the next line's indentation.
                                while let Some((_, ' ')) = chars.clone().next() {
                                    chars.next();
                                }
                            }
                            Some((_, other)) => text.push(other),
                            None => {}
                        },
                        c => text.push(c),
                    }
                }
                (text, &body[end.min(body.len())..])
            };
            out.extend(text.lines().map(str::to_owned));
            rest = after;
        }
        out
    }

    /// The messages a line gives the recogniser: the line as pasted text, and as a kmsg
    /// record when it is one.
    fn messages(line: &str) -> Vec<String> {
        let mut messages = vec![line.to_owned(), LogLine::parse_text(line).message];
        if let Ok(record) = parse_record(line.as_bytes()) {
            messages.push(record.message);
        }
        messages
    }

    #[test]
    fn no_recogniser_is_skipped_on_a_line_it_accepts() {
        let lines = known_lines();
        assert!(lines.len() > 2000, "only {} lines", lines.len());
        let mut accepted = 0;
        let mut rejected = 0;
        for line in &lines {
            for message in messages(line) {
                let may = candidates(&message);
                for start in accepted_by(&message) {
                    assert!(
                        may.may(start),
                        "{start:?} accepts but was filtered: {message:?}"
                    );
                    accepted += 1;
                }
                rejected += usize::from(may.is_empty());
            }
        }
        // The lines are both: reports the recognisers take, and context lines the filter
        // answers alone.
        assert!(accepted > 600, "only {accepted} acceptances");
        assert!(rejected > 1000, "only {rejected} lines filtered out");
    }

    #[test]
    fn the_recogniser_answers_the_same_with_and_without_the_filter() {
        let lines = known_lines();
        let corpus = include_str!("../../tests/data/public-kernel-lines.txt");
        let texts = [lines.join("\n"), corpus.to_owned()];
        for text in &texts {
            let filtered = recognise_text(text);
            let all = unfiltered(|| recognise_text(text));
            assert!(filtered.len() > 200, "{} items", filtered.len());
            assert_eq!(filtered, all);
        }
        // Record by record, as the agent reads /dev/kmsg, including user-space records.
        let records: Vec<Vec<u8>> = corpus
            .lines()
            .filter(|l| !l.starts_with("## ") && !l.trim().is_empty())
            .enumerate()
            .map(|(seq, l)| format!("{},{seq},{seq},-;{l}\n", 6 + 8 * (seq % 2)).into_bytes())
            .collect();
        let feed_all = || {
            let mut recogniser = Recogniser::new();
            let mut out: Vec<Recognised> = Vec::new();
            for bytes in &records {
                let record = parse_record(bytes).unwrap();
                out.extend(recogniser.feed(LogLine::from_owned_record(record)));
            }
            out.extend(recogniser.flush());
            out
        };
        let filtered = feed_all();
        assert!(filtered.len() > 100, "{} items", filtered.len());
        assert_eq!(filtered, unfiltered(feed_all));
    }

    #[test]
    fn context_lines_are_filtered_out_and_report_lines_are_not() {
        for context in [
            " __schedule+0x3cc/0xf50",
            "RIP: 0033:0x7fe35d664c20",
            "R13: 0000000000000000 R14: 0000000000000001 R15: 0000000000000001",
            "Code: 48 89 44 24 38 31 c0 <ff> 10",
            "x29: 0000007fc50c0b50 x28: 0000007f98758a20",
        ] {
            assert!(candidates(context).is_empty(), "{context}");
        }
        let segfault =
            candidates("a[1]: segfault at 0 ip 0000000000000001 sp 0000000000000002 error 4");
        assert!(segfault.may(Start::Segfault) && !segfault.may(Start::Trap));
        let hang = candidates("INFO: task a:1 blocked for more than 2 seconds.");
        assert!(hang.may(Start::HungTask) && !hang.may(Start::Segfault));
        assert!(candidates("traps: PANIC: double fault, error_code: 0x0").may(Start::Oops));
        let riscv = candidates("x[7]: unhandled signal 11 code 0x1 at 0x0");
        assert!(riscv.may(Start::RiscV) && riscv.may(Start::Arm64Fault));
        assert!(!riscv.may(Start::S390) && !riscv.may(Start::Mips));
    }
}
