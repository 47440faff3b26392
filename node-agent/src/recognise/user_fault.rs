//! User-space crash lines: x86 `segfault at`, `traps:` and arm64 unhandled faults (pure).
//!
//! Process and file names may contain spaces, brackets and `: `, so every parser anchors on
//! the fixed text the kernel prints and checks that everything after the anchor has the exact
//! grammar of the kernel's format string before it accepts a match.

use crds::{Address, CrashEvent, EventKind};

use super::error_code;

/// Parses an x86 `COMM[TID]: segfault at ADDR ip IP sp SP error ERR[ in FILE[…]][ likely on CPU …]`
/// line of any kernel era (`rip`/`rsp` on old 64-bit kernels, 8-digit addresses on 32-bit,
/// `ip           (null)` before 4.15). A line that a paste or a title cut short is accepted
/// when what is left has the grammar so far, and so is a bare `segfault at …` with no task.
pub fn parse_segfault(message: &str) -> Option<CrashEvent> {
    const ANCHOR: &str = "]: segfault at ";
    // One event, filled in place: it is large, and each move copies it.
    let mut event = CrashEvent::new(EventKind::Segfault);
    for at in anchor!("]: segfault at ").find_iter(message.as_bytes()) {
        let Some((comm, pid)) = comm_and_pid(&message[..at]) else {
            continue;
        };
        if segfault_tail(&mut event, &message[at + ANCHOR.len()..]).is_none() {
            // A later anchor starts afresh.
            event = CrashEvent::new(EventKind::Segfault);
            continue;
        }
        event.comm = Some(comm.to_owned());
        event.pid = Some(pid);
        return Some(event);
    }
    let bare = message.strip_prefix("segfault at ")?;
    segfault_tail(&mut event, bare)?;
    event.ip.is_some().then_some(event)
}

/// One `NAME VALUE` field of a segfault line: the value is hex, or `(null)` padded to the
/// pointer's width (`%p` before 4.15). Returns None when the text has another shape, and
/// `Some(None)` when the text ends (a line cut short) before the field.
fn field<'a>(rest: &'a str, names: &[&str]) -> Option<Option<(u64, &'a str)>> {
    if rest.is_empty() {
        return Some(None);
    }
    let rest = rest.strip_prefix(' ')?;
    // Fields are short: a byte loop finds their ends faster than a vectorised search.
    let (name, after) = match space_at(rest) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, ""),
    };
    if after.is_empty() && names.iter().any(|n| n.starts_with(name)) {
        return Some(None); // cut inside or right after the name
    }
    if !names.contains(&name) {
        return None;
    }
    if let Some(after_null) = after.trim_start_matches(' ').strip_prefix("(null)") {
        return Some(Some((0, after_null)));
    }
    Some(Some(hex_word(after)?))
}

/// Where the first space of a short field is.
fn space_at(text: &str) -> Option<usize> {
    text.bytes().position(|b| b == b' ')
}

/// Fills a new segfault `event` from the text after `segfault at `; None when the text has
/// another shape (the event is then partly filled).
fn segfault_tail(event: &mut CrashEvent, tail: &str) -> Option<()> {
    let (address, rest) = hex_word(tail)?;
    event.fault_address = Some(Address(address));
    let Some((ip, rest)) = field(rest, &["ip", "rip"])? else {
        return Some(());
    };
    event.ip = Some(Address(ip));
    let Some((sp, rest)) = field(rest, &["sp", "rsp"])? else {
        return Some(());
    };
    event.sp = Some(Address(sp));
    let Some((error_code, rest)) = field(rest, &["error"])? else {
        return Some(());
    };
    event.error_code = Some(error_code);
    event.error_bits = error_code::x86_page_fault_bits(error_code);
    apply_location(event, rest)
}

/// Parses `traps: COMM[TID] <what> ip:IP sp:SP error:E[ in FILE[…]]`, with or without the
/// `traps: ` prefix (kernels before 3.x printed none).
///
/// A pasted line that lost its `NAME[PID]` (`trap divide error ip:… sp:… error:0 in …`) is
/// accepted too, with no task.
pub fn parse_trap(message: &str) -> Option<CrashEvent> {
    let body = message.strip_prefix("traps: ").unwrap_or(message);
    let ip_at = |text: &str| {
        anchor!(" ip:")
            .find(text.as_bytes())
            .or_else(|| anchor!(" rip:").find(text.as_bytes()))
    };
    let first_ip = ip_at(body)?;
    if let Some(kind) = trap_kind(&body[..first_ip]) {
        return trap_tail(kind, &body[first_ip + 1..]);
    }
    for at in anchor!("] ").find_iter(body.as_bytes()) {
        let Some((comm, pid)) = comm_and_pid(&body[..at]) else {
            continue;
        };
        let after = &body[at + 2..];
        let Some(ip_at) = ip_at(after) else {
            continue;
        };
        let Some(kind) = trap_kind(&after[..ip_at]) else {
            continue;
        };
        let Some(event) = trap_tail(kind, &after[ip_at + 1..]) else {
            continue;
        };
        return Some(with_task(event, comm, pid));
    }
    None
}

fn trap_kind(description: &str) -> Option<EventKind> {
    Some(match description {
        "general protection fault" | "general protection" | "trap stack segment" => {
            EventKind::GeneralProtection
        }
        "trap divide error" => EventKind::DivideError,
        "trap invalid opcode" => EventKind::InvalidOpcode,
        "trap int3" => EventKind::Breakpoint,
        // #AC, a misaligned access with EFLAGS.AC set: SIGBUS.
        "trap alignment check" => EventKind::Segfault,
        _ => return None,
    })
}

/// `ip:IP sp:SP error:E[ in FILE[…]]`; a line cut short after `ip:` keeps what it has.
fn trap_tail(kind: EventKind, tail: &str) -> Option<CrashEvent> {
    let mut words = tail.splitn(4, ' ');
    let ip_word = words.next()?;
    let ip = hex(ip_word
        .strip_prefix("ip:")
        .or_else(|| ip_word.strip_prefix("rip:"))?)?;
    let mut event = CrashEvent::new(kind);
    event.ip = Some(Address(ip));
    let Some(sp_word) = words.next().filter(|w| !w.is_empty()) else {
        return Some(event);
    };
    let sp = hex(sp_word
        .strip_prefix("sp:")
        .or_else(|| sp_word.strip_prefix("rsp:"))?)?;
    event.sp = Some(Address(sp));
    let Some(error_word) = words.next().filter(|w| !w.is_empty()) else {
        return Some(event);
    };
    event.error_code = Some(hex(error_word.strip_prefix("error:")?)?);
    let rest = words.next().map_or("", |r| r);
    apply_location(&mut event, rest)?;
    Some(event)
}

/// Parses the first line of an arm64 user fault report:
/// `COMM[PID]: unhandled level N translation fault (11) at 0xADDR, esr 0xESR[, in FILE[…]]`
/// (up to 4.x) or `COMM[PID]: unhandled exception: CLASS, ESR 0xESR, DESCRIPTION[ in FILE[…]]`
/// (5.x on). The `pc :` and `sp :` register lines that follow are added by [`arm64_register`].
pub fn parse_arm64_fault(message: &str) -> Option<CrashEvent> {
    for at in anchor!("]: unhandled ").find_iter(message.as_bytes()) {
        let Some((comm, pid)) = comm_and_pid(&message[..at]) else {
            continue;
        };
        let tail = &message[at + "]: unhandled ".len()..];
        let event = if let Some(rest) = tail.strip_prefix("exception: ") {
            arm64_exception(rest)
        } else {
            arm64_legacy(tail)
        };
        if let Some(event) = event {
            return Some(with_task(event, comm, pid));
        }
    }
    None
}

/// `level 1 translation fault (11) at 0x00000000, esr 0x92000005[, in FILE[…]]`
fn arm64_legacy(tail: &str) -> Option<CrashEvent> {
    let (description, rest) = tail.split_once(" (")?;
    let (_signal, rest) = rest.split_once(") at ")?;
    let (address, rest) = rest.split_once(", esr ")?;
    let (esr, rest) = match rest.split_once(", in ") {
        Some((esr, location)) => (esr, location),
        None => (rest.trim_end(), ""),
    };
    let mut event = CrashEvent::new(arm64_kind(description));
    event.fault_address = Some(Address(hex(address.strip_prefix("0x")?)?));
    let esr = hex(esr.strip_prefix("0x")?)?;
    event.error_code = Some(esr);
    event.esr = Some(esr);
    event.error_bits = error_code::arm64_esr_bits(esr);
    if !rest.is_empty() {
        apply_location(&mut event, &format!("in {rest}"))?;
    }
    Some(event)
}

/// `DABT (lower EL), ESR 0x92000006, level 2 translation fault[ in FILE[…]]`
fn arm64_exception(tail: &str) -> Option<CrashEvent> {
    let (esr, description_and_location) = match tail.split_once(", ESR 0x") {
        Some((_class, rest)) => {
            let (esr, rest) = rest.split_once(", ")?;
            (Some(hex(esr)?), rest)
        }
        None => (None, tail),
    };
    let (description, location) = match description_and_location.find(" in ") {
        Some(i) => (
            &description_and_location[..i],
            &description_and_location[i..],
        ),
        None => (description_and_location.trim_end(), ""),
    };
    let mut event = CrashEvent::new(arm64_kind(description));
    if let Some(esr) = esr {
        event.error_code = Some(esr);
        event.esr = Some(esr);
        event.error_bits = error_code::arm64_esr_bits(esr);
    }
    apply_location(&mut event, location)?;
    Some(event)
}

fn arm64_kind(description: &str) -> EventKind {
    if description.contains("undefined instruction")
        || description.contains("Undefined instruction")
    {
        EventKind::InvalidOpcode
    } else if description.contains("BRK") {
        EventKind::Breakpoint
    } else {
        EventKind::Segfault
    }
}

/// Adds an arm64 `pc : HEX` or `sp : HEX` register line to an open fault report; false when
/// the line is not one of the register dump lines that follow such a report.
/// Before 4.16 the report also has `CPU:`, `Hardware name:`, `task:`, `PC is at`, `LR is at`
/// and `pc : [<…>] lr : [<…>] pstate: …` lines, which are taken too.
pub fn arm64_register(event: &mut CrashEvent, message: &str) -> bool {
    if message.starts_with('x') && message.as_bytes().get(1).is_some_and(u8::is_ascii_digit) {
        return true; // general-purpose registers: x29: … x28: …
    }
    if let Some((cpu, _, _)) = super::misc::parse_oops_task(message) {
        event.cpu.get_or_insert(cpu);
        return true;
    }
    const BANNERS: [&str; 6] = [
        "Hardware name: ",
        "task: ",
        "PC is at ",
        "LR is at ",
        "pgd = ",
        ", *p",
    ];
    // The page-table walk (`[00000028] *pgd=…`) and the empty line before the registers.
    let walk = message.starts_with('[') && message.contains("] *pgd=");
    if message.trim().is_empty() || walk || BANNERS.iter().any(|b| message.starts_with(b)) {
        return true;
    }
    // Since 4.16 the processor state has a line of its own before `pc :`:
    // `pstate: %08llx (%c%c%c%c %c%c%c%c %cPAN %cUAO …)`.
    if let Some(rest) = message.strip_prefix("pstate: ") {
        let (digits, flags) = rest.split_at(rest.len().min(8));
        return digits.len() == 8
            && digits.bytes().all(|b| b.is_ascii_hexdigit())
            && (flags.trim_end().is_empty() || flags.starts_with(" ("));
    }
    let Some((name, value)) = message.split_once(" : ") else {
        return false;
    };
    let value = value.split_whitespace().next().map(|v| {
        v.strip_prefix("[<")
            .and_then(|v| v.strip_suffix(">]"))
            .unwrap_or(v)
    });
    let value = value.and_then(hex);
    match (name, value) {
        ("pc", Some(pc)) => event.ip = Some(Address(pc)),
        ("sp", Some(sp)) => event.sp = Some(Address(sp)),
        ("lr" | "pstate", _) => {}
        _ => return false,
    }
    true
}

/// Adds a location that arrived as a record of its own (` in FILE[START+SIZE]`, printed as a
/// continuation by some 4.x kernels) to an event that has none; false if it is not one.
///
/// The mapping must contain the event's instruction pointer: when two CPUs print at once, the
/// location that follows may be another report's.
pub fn trailing_location(event: &mut CrashEvent, message: &str) -> bool {
    if event.module.is_some() || !message.trim_start().starts_with("in ") {
        return false;
    }
    let mut located = event.clone();
    let fits = apply_location(&mut located, message.trim_start()).is_some()
        && match (located.ip, located.vma_start, located.vma_size) {
            (Some(ip), Some(start), Some(size)) => ip.0 >= start.0 && ip.0 - start.0 < size.0,
            _ => false,
        };
    if fits {
        *event = located;
    }
    fits
}

/// Parses the `[ in FILE[OFF,START+SIZE]][ likely on CPU N (core C, socket S)]` tail.
/// Returns None when the tail has some other shape. A tail cut short (`in libc.so.6[7f12`,
/// `in parser.so`, `…+1000] likely on CPU 3 (co`) keeps what was printed before the cut.
pub(crate) fn apply_location(event: &mut CrashEvent, rest: &str) -> Option<()> {
    let rest = rest.trim_end();
    let rest = match strip_cpu_suffix(rest) {
        Some((before, cpu)) => {
            event.cpu = Some(cpu);
            before
        }
        None => rest,
    };
    if rest.is_empty() || is_cut_keyword(rest) {
        return Some(());
    }
    let mapping = rest
        .strip_prefix("in ")
        .or_else(|| rest.strip_prefix(" in "))?;
    let Some(inner_start) = memchr::memrchr(b'[', mapping.as_bytes()) else {
        // Cut before the brackets: only the file name is left.
        (!mapping.is_empty() && !mapping.contains(' ')).then_some(())?;
        event.module = Some(mapping.to_owned());
        return Some(());
    };
    let file = &mapping[..inner_start];
    if file.is_empty() {
        return None;
    }
    let inner = &mapping[inner_start + 1..];
    let inner = match inner.strip_suffix(']') {
        Some(inner) => inner,
        None => match split_at_byte(inner, b']') {
            // Cut inside the CPU suffix.
            Some((inner, after)) if is_cut_keyword(after) => inner,
            Some(_) => return None,
            // Cut inside the brackets.
            None => {
                event.module = Some(file.to_owned());
                return Some(());
            }
        },
    };
    let (offset, range) = match split_at_byte(inner, b',') {
        Some((offset, range)) => (Some(hex(offset)?), range),
        None => (None, inner),
    };
    let (start, size) = split_at_byte(range, b'+')?;
    event.module = Some(file.to_owned());
    event.module_offset = offset.map(Address);
    event.vma_start = Some(Address(hex(start)?));
    event.vma_size = Some(Address(hex(size)?));
    Some(())
}

/// Whether `text` is the start of ` in …` or ` likely on CPU N (core …` that a cut ended.
fn is_cut_keyword(text: &str) -> bool {
    const LIKELY: &str = " likely on CPU ";
    let cpu_tail = |t: &str| {
        t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" (),".contains(&b))
    };
    " in".starts_with(text)
        || (!text.is_empty() && LIKELY.starts_with(text))
        || text.strip_prefix(LIKELY).is_some_and(cpu_tail)
}

/// `… likely on CPU 0 (core 0, socket 0)` at the very end.
fn strip_cpu_suffix(text: &str) -> Option<(&str, u32)> {
    const MARKER: &str = "likely on CPU ";
    let at = match text.strip_prefix(MARKER) {
        Some(_) => 0,
        None => last_cpu_marker(text)? + 1,
    };
    let suffix = &text[at + MARKER.len()..];
    let (cpu, topology) = split_at_byte(suffix, b' ')?;
    let topology = topology.strip_prefix("(core ")?.strip_suffix(')')?;
    // Up to the first comma: a core number with a comma in it is no number either.
    let (core, socket) = split_at_byte(topology, b',')?;
    let socket = socket.strip_prefix(" socket ")?;
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (numeric(core) && numeric(socket)).then_some(())?;
    Some((text[..at].trim_end(), cpu.parse().ok()?))
}

/// Where the last ` likely on CPU ` in `text` starts. A forward search finds it faster than a
/// reverse one; each search starts one byte after the previous find, so occurrences that
/// share their spaces are all seen.
fn last_cpu_marker(text: &str) -> Option<usize> {
    let finder = anchor!(" likely on CPU ");
    let mut last = finder.find(text.as_bytes())?;
    while let Some(next) = finder.find(&text.as_bytes()[last + 1..]) {
        last += 1 + next;
    }
    Some(last)
}

/// Splits `COMM[PID` (the text before an anchor's `]`) at its last `[`.
///
/// A task name has at most 15 bytes (`TASK_COMM_LEN`). A longer head carries text pasted in
/// front of the line (a shell prompt, a `grep -n` prefix, another report printed on the same
/// line); the name then starts after the first separator that leaves at most 15 bytes.
pub(crate) fn comm_and_pid(head: &str) -> Option<(&str, u32)> {
    let open = head.rfind('[')?;
    let digits = &head[open + 1..];
    if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((trim_pasted_prefix(&head[..open]), digits.parse().ok()?))
}

/// The task name at the end of `comm`, without text pasted in front of it.
fn trim_pasted_prefix(comm: &str) -> &str {
    const MAX_COMM: usize = 15;
    if comm.len() <= MAX_COMM {
        return comm;
    }
    for (at, _) in comm.char_indices() {
        let rest = &comm[at..];
        let separator = ["] ", ": ", "# ", "$ ", "> ", "]"]
            .iter()
            .find(|s| rest.starts_with(**s));
        if let Some(separator) = separator {
            let name = &comm[at + separator.len()..];
            if !name.is_empty() && name.len() <= MAX_COMM {
                return name;
            }
        }
    }
    comm
}

pub(crate) fn with_task(mut event: CrashEvent, comm: &str, pid: u32) -> CrashEvent {
    event.comm = Some(comm.to_owned());
    event.pid = Some(pid);
    event
}

/// Parses bare hex digits (no `0x`), as the kernel prints addresses.
pub(crate) fn hex(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 16 {
        return None;
    }
    // At most 16 digits: the value cannot overflow. One pass, no sign accepted.
    text.bytes()
        .try_fold(0u64, |value, b| Some(value << 4 | hex_digit(b)?))
}

/// [`hex`] of the text up to the next space (or the end), and the text from that space on.
fn hex_word(text: &str) -> Option<(u64, &str)> {
    let bytes = text.as_bytes();
    let mut value = 0u64;
    let mut end = 0;
    while let Some(&b) = bytes.get(end).filter(|&&b| b != b' ') {
        if end == 16 {
            return None;
        }
        value = value << 4 | hex_digit(b)?;
        end += 1;
    }
    (end > 0).then_some((value, &text[end..]))
}

/// The value of each byte as a hex digit, or `NOT_HEX`.
const HEX_DIGITS: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = match b as u8 {
            d @ b'0'..=b'9' => d - b'0',
            d @ b'a'..=b'f' => d - b'a' + 10,
            d @ b'A'..=b'F' => d - b'A' + 10,
            _ => NOT_HEX,
        };
        b += 1;
    }
    table
};
const NOT_HEX: u8 = 0xff;

fn hex_digit(b: u8) -> Option<u64> {
    let digit = HEX_DIGITS[usize::from(b)];
    (digit != NOT_HEX).then_some(u64::from(digit))
}

/// `str::split_once` at an ASCII byte, found by `memchr` (cheaper than the `char` searcher
/// on short text).
fn split_at_byte(text: &str, byte: u8) -> Option<(&str, &str)> {
    let at = memchr::memchr(byte, text.as_bytes())?;
    Some((&text[..at], &text[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(line: &str) -> CrashEvent {
        parse_segfault(line).unwrap_or_else(|| panic!("not recognised: {line}"))
    }

    #[test]
    fn the_seed_line() {
        let e = seg(
            "qemu-nbd[13647]: segfault at 100 ip 0000561c8817d1c7 sp 00007fc8f1ce9c00 error 4 in qemu-nbd[561c88107000+155000]",
        );
        assert_eq!(e.comm.as_deref(), Some("qemu-nbd"));
        assert_eq!(e.pid, Some(13647));
        assert_eq!(e.fault_address, Some(Address(0x100)));
        assert_eq!(e.ip, Some(Address(0x561c_8817_d1c7)));
        assert_eq!(e.sp, Some(Address(0x7fc8_f1ce_9c00)));
        assert_eq!(e.error_code, Some(4));
        assert_eq!(e.error_bits, ["user", "read", "not-present"]);
        assert_eq!(e.module.as_deref(), Some("qemu-nbd"));
        assert_eq!(e.module_offset, None, "old kernels print no file offset");
        assert_eq!(e.vma_start, Some(Address(0x561c_8810_7000)));
        assert_eq!(e.vma_size, Some(Address(0x155000)));
        assert_eq!(e.cpu, None);
    }

    #[test]
    fn hostile_names_parse_from_the_anchors() {
        let e = seg(
            "x[9]: segfault[524]: segfault at 100 ip 000055c9990a5040 sp 00007ffd33ada978 error 4 in x[9]: segfault[1040,55c9990a5000+1000] likely on CPU 1 (core 1, socket 0)",
        );
        assert_eq!(
            (e.comm.as_deref(), e.pid),
            (Some("x[9]: segfault"), Some(524))
        );
        assert_eq!(e.module.as_deref(), Some("x[9]: segfault"));
        assert_eq!(e.module_offset, Some(Address(0x1040)));
        assert_eq!(e.cpu, Some(1));
        let e = seg(
            "my prog[523]: segfault at 100 ip 00005586d65ed040 sp 00007fffac0560e8 error 4 in my prog[1040,5586d65ed000+1000] likely on CPU 1 (core 1, socket 0)",
        );
        assert_eq!(
            (e.comm.as_deref(), e.module.as_deref()),
            (Some("my prog"), Some("my prog"))
        );
        // A comm (15 bytes, the most there can be) that contains the anchor text itself.
        let e = seg(
            "]: segfault at [7]: segfault at 0 ip 0000000000000000 sp 00007ffdd7237068 error 14",
        );
        assert_eq!(
            (e.comm.as_deref(), e.pid),
            (Some("]: segfault at "), Some(7))
        );
    }

    #[test]
    fn no_location_part_for_anonymous_code() {
        let e = seg(
            "crashy[10508]: segfault at 0 ip 0000000000000000 sp 00007ffdd7237068 error 14 likely on CPU 0 (core 0, socket 0)",
        );
        assert_eq!(e.module, None);
        assert_eq!(e.error_code, Some(0x14));
        assert_eq!(e.error_bits, ["user", "instruction-fetch", "not-present"]);
        assert_eq!(e.cpu, Some(0));
    }

    #[test]
    fn traps_of_every_kind() {
        let gp = parse_trap("traps: crashy[10515] general protection fault ip:560331b03580 sp:7ffc62cb8048 error:0 in crashy[1580,560331b03000+1000]").unwrap();
        assert_eq!(gp.kind, EventKind::GeneralProtection);
        assert_eq!(
            (gp.pid, gp.ip, gp.module_offset),
            (
                Some(10515),
                Some(Address(0x5603_31b0_3580)),
                Some(Address(0x1580))
            )
        );
        assert_eq!(gp.fault_address, None, "a GPF has no fault address");
        let de = parse_trap("traps: crashy[10517] trap divide error ip:563e83462593 sp:7ffffb2f89a8 error:0 in crashy[1593,563e83462000+1000]").unwrap();
        assert_eq!(de.kind, EventKind::DivideError);
        let ud = parse_trap("traps: crashy[10519] trap invalid opcode ip:5570824a6130 sp:7ffe1c5c59b8 error:0 in crashy[1130,5570824a6000+1000]").unwrap();
        assert_eq!(ud.kind, EventKind::InvalidOpcode);
        let bp = parse_trap("traps: crashy[10883] trap int3 ip:55bbb1e093b8 sp:7ffc088673c0 error:0 in crashy[13b8,55bbb1e09000+1000]").unwrap();
        assert_eq!(
            (bp.kind, bp.sp),
            (EventKind::Breakpoint, Some(Address(0x7ffc_0886_73c0)))
        );
        // crashy bus (EFLAGS.AC, then a misaligned load) on the development VM's 6.18 kernel.
        let bus = parse_trap("traps: crashy[12689] trap alignment check ip:401999 sp:7ffc2a4a8be8 error:0 in crashy[1999,401000+8a000]").unwrap();
        assert_eq!(
            (bus.kind, bus.pid, bus.module_offset),
            (EventKind::Segfault, Some(12689), Some(Address(0x1999)))
        );
        let old = parse_trap("a.out[2345] general protection ip:4004f4 sp:7fff5e0a4f50 error:0 in a.out[400000+1000]").unwrap();
        assert_eq!(
            (old.kind, old.comm.as_deref()),
            (EventKind::GeneralProtection, Some("a.out"))
        );
        assert!(parse_trap("traps: x[1] trap something new ip:1 sp:2 error:0").is_none());
    }

    #[test]
    fn arm64_faults() {
        let old = parse_arm64_fault("crashy[1234]: unhandled level 1 translation fault (11) at 0x00000100, esr 0x92000005, in crashy[400000+1000]").unwrap();
        assert_eq!(old.kind, EventKind::Segfault);
        assert_eq!(old.fault_address, Some(Address(0x100)));
        assert_eq!(old.error_code, Some(0x9200_0005));
        assert_eq!(old.error_bits, ["user", "read", "not-present"]);
        assert_eq!(old.module.as_deref(), Some("crashy"));
        let new = parse_arm64_fault("crashy[77]: unhandled exception: DABT (lower EL), ESR 0x0000000092000046, level 2 translation fault in crashy[aaaab8a30000+1000]").unwrap();
        assert_eq!(new.error_bits, ["user", "write", "not-present"]);
        assert_eq!(new.vma_start, Some(Address(0xaaaa_b8a3_0000)));
        let mut with_regs = new.clone();
        assert!(arm64_register(&mut with_regs, "pc : 0000aaaab8a30714"));
        assert!(arm64_register(&mut with_regs, "lr : 0000aaaab8a30700"));
        assert!(arm64_register(&mut with_regs, "sp : 0000ffffd8ebd5a0"));
        assert!(arm64_register(
            &mut with_regs,
            "x29: 0000ffffd8ebd5a0 x28: 0000000000000000"
        ));
        assert!(!arm64_register(&mut with_regs, "Code: bad"));
        assert!(arm64_register(
            &mut with_regs,
            "pstate: 80001000 (Nzcv daif -PAN -UAO -TCO -DIT +SSBS BTYPE=--)"
        ));
        assert!(!arm64_register(&mut with_regs, "pstate: on"));
        assert_eq!(with_regs.ip, Some(Address(0xaaaa_b8a3_0714)));
        assert_eq!(with_regs.sp, Some(Address(0xffff_d8eb_d5a0)));
    }

    #[test]
    fn null_pointers_before_4_15() {
        // %p printed a NULL pointer as "(null)", right-aligned in the pointer's width.
        let e = seg(
            "init[1]: segfault at 0 ip           (null) sp 00007ffd484cf5f0 error 14 in init[400000+1000]",
        );
        assert_eq!(e.ip, Some(Address(0)));
        assert_eq!(e.sp, Some(Address(0x7ffd_484c_f5f0)));
        assert_eq!(e.error_code, Some(0x14));
        assert_eq!(e.module.as_deref(), Some("init"));
        let e = seg("mlock[7097]: segfault at 0 ip   (null) sp ff8a00d4 error 14");
        assert_eq!((e.ip, e.sp), (Some(Address(0)), Some(Address(0xff8a_00d4))));
    }

    #[test]
    fn lines_cut_short_keep_what_was_printed() {
        let e = seg(
            "a[1]: segfault at 7 ip 0000000000401271 sp 00007fff2ce4d210 error 4 in libc.so.6[7f12",
        );
        assert_eq!(e.module.as_deref(), Some("libc.so.6"));
        assert_eq!((e.vma_start, e.error_code), (None, Some(4)));
        let e = seg("a[1]: segfault at 7 ip 0000000000401271 sp 00007fff2ce4d210 err");
        assert_eq!(
            (e.sp, e.error_code),
            (Some(Address(0x7fff_2ce4_d210)), None)
        );
        let e = seg("a[1]: segfault at 7 ip 0000000000401271");
        assert_eq!((e.ip, e.sp), (Some(Address(0x40_1271)), None));
        let e = seg(
            "a[1]: segfault at 7 ip 0000000000401271 sp 00007fff2ce4d210 error 6 in a[1271,400000+1000] likely on CPU 3 (co",
        );
        assert_eq!((e.module_offset, e.cpu), (Some(Address(0x1271)), None));
        // A title that kept only the fault: no task, and the file with no mapping.
        let e =
            seg("segfault at 2000 ip 00007fe490fb8a39 sp 00007fe46f7d1c40 error 4 in parser.so");
        assert_eq!((e.comm, e.pid), (None, None));
        assert_eq!(e.module.as_deref(), Some("parser.so"));
        assert_eq!(e.fault_address, Some(Address(0x2000)));
    }

    #[test]
    fn text_pasted_before_the_task_name_is_not_part_of_it() {
        let e = seg(
            "root@gw:~# [  197.236518] pigz[2908]: segfault at 0 ip 0000000000000000 sp 00007f347bffed00 error 14",
        );
        assert_eq!((e.comm.as_deref(), e.pid), (Some("pigz"), Some(2908)));
        let e = seg(
            "kern.log:1412:Mar 27 10:37:41 h kernel: a b[1]: segfault at 0 ip 0000000000000000 sp 0000000000000001 error 14",
        );
        assert_eq!(e.comm.as_deref(), Some("a b"));
    }

    #[test]
    fn a_trap_that_lost_its_task() {
        let e =
            parse_trap("trap divide error ip:400523 sp:7fffe4e2c3b0 error:0 in a.out[400000+1000]")
                .unwrap();
        assert_eq!(
            (e.kind, e.comm, e.pid),
            (EventKind::DivideError, None, None)
        );
        assert_eq!(e.ip, Some(Address(0x40_0523)));
        assert!(parse_trap("trap divide error").is_none());
    }

    #[test]
    fn hex_reads_as_from_str_radix_does_on_bare_digits() {
        for text in [
            "0",
            "00",
            "ff",
            "FF",
            "dEaDbEeF",
            "ffffffffffffffff",
            "0000000000000000",
            "123456789abcdef0",
            "",
            "+f",
            "-1",
            "0x10",
            "g",
            "1 2",
            "fffffffffffffffff",
            "é",
        ] {
            let reference = (!text.is_empty()
                && text.len() <= 16
                && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(text, 16).ok())
            .flatten();
            assert_eq!(hex(text), reference, "{text:?}");
        }
    }

    #[test]
    fn every_byte_is_a_hex_digit_as_from_str_radix_reads_it() {
        for b in 0..=u8::MAX {
            let reference = (b as char)
                .is_ascii_hexdigit()
                .then(|| u64::from((b as char).to_digit(16).unwrap()));
            assert_eq!(hex_digit(b), reference, "{b}");
        }
    }

    #[test]
    fn a_hex_word_reads_as_hex_of_the_text_up_to_a_space() {
        for text in [
            "",
            " ",
            "0",
            "ff rest",
            "ffffffffffffffff",
            "ffffffffffffffff x",
            "fffffffffffffffff",
            "fffffffffffffffff x",
            "12g4 x",
            "+1 x",
            "(null) x",
            "é",
            "1é",
        ] {
            let end = text.find(' ').unwrap_or(text.len());
            let reference = hex(&text[..end]).map(|value| (value, &text[end..]));
            assert_eq!(hex_word(text), reference, "{text:?}");
        }
    }

    #[test]
    fn the_last_cpu_marker_is_found_as_a_reverse_search_finds_it() {
        let rev = |t: &str| memchr::memmem::rfind(t.as_bytes(), b" likely on CPU ");
        for text in [
            "",
            " likely on CPU ",
            "a likely on CPU 1 (core 1, socket 0)",
            "x likely on CPU likely on CPU 3 (core 3, socket 0)",
            " likely on CPU  likely on CPU ",
            "no marker here",
        ] {
            assert_eq!(last_cpu_marker(text), rev(text), "{text:?}");
        }
    }

    #[test]
    fn near_misses_are_rejected() {
        for line in [
            "crashy[1]: segfault at zz ip 0 sp 0 error 4",
            "crashy[]: segfault at 0 ip 0 sp 0 error 4",
            "crashy[1]: segfault at 0 ip 0 sp 0 error 4 in [1+2]",
            "crashy[1]: segfault at 0 ip 0 sp 0 error 4 in x[1+2] garbage",
            "crashy[1]: segfault at 0 ip 0 sp 0 error 4 in x[1+2] likely on GPU",
            "crashy[1]: segfault at 0 ip 0 sp 0 error 4 in two words",
            "crashy[1]: segfault at 0 ip (nul) sp 0 error 4",
            "crashy[1]: segfault at 0 ip 0 sp 0 error 4in x[1+2]",
            "segfault at 0 sp 0 error 4",
            "crashy[1]: segfault at 0 ip 0 sp 0 error 4 garbage",
            "crashy[1]: segfault at 0 pc 0 sp 0 error 4",
            "crashy[1]: segfault at 11112222333344445 ip 0 sp 0 error 4",
        ] {
            assert!(parse_segfault(line).is_none(), "{line}");
        }
    }
}
