//! User faults of the other architectures: powerpc, riscv, s390, MIPS (as OpenWrt and
//! upstream print it) and the old arm64 `undefined instruction` line (pure).
//!
//! Each parser anchors on the fixed text of the kernel's format string and accepts a line only
//! when everything after the anchor has that format's grammar:
//! - powerpc `show_signal_msg` (4.19 on): `%s[%d]: %s (%d) at %lx nip %lx lr %lx code %x`, then
//!   ` in FILE[…]`; before that `%s[%d]: unhandled signal %d at %0Nlx nip %0Nlx lr %0Nlx code %x`;
//! - riscv `do_trap`: `%s[%d]: unhandled signal %d code 0x%x at 0x%0Nlx`, then ` in FILE[…]`;
//! - s390 `report_user_fault`: `User process fault: interruption code %04x ilc:%d `, then
//!   `in FILE[…]` (before 3.x: `interruption code 0x%X `);
//! - MIPS `do_page_fault`: `do_page_fault(): sending SIGSEGV to %s for invalid %s %0*lx`, then
//!   `epc = %0*lx in FILE[…]` and `ra  = %0*lx in FILE[…]`;
//! - arm64 and arm before 4.19: `%s[%d]: undefined instruction: pc=%p`, then `Code: …`.

use crds::{Address, CrashEvent, EventKind};

use super::misc;
use super::prefilter::{Candidates, Start};
use super::user_fault::{apply_location, comm_and_pid, hex, with_task};

/// Which architecture's report an open event is, so its continuation lines can be told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// powerpc `show_signal_msg`, followed by `NAME[PID]: code: …` instruction lines.
    PowerPc,
    /// riscv `do_trap`, followed by `CPU:`, `Hardware name:` and register lines.
    RiscV,
    /// s390 `report_user_fault`, followed by `Failing address:`, `CPU:`, `User PSW` and more.
    S390,
    /// MIPS `do_page_fault`, followed by its `epc =` and `ra  =` lines.
    Mips,
    /// arm64 (or arm) `undefined instruction: pc=`, followed by its `Code:` line.
    ArmUndefined,
}

/// What a continuation line did to an open report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuation {
    /// The line belongs to the report.
    Taken,
    /// The line belongs to the report and is its last.
    TakenAndComplete,
    /// The line does not belong to the report.
    NotMine,
}

/// Recognises the first line of another architecture's user fault report.
pub fn parse(message: &str) -> Option<(Arch, CrashEvent)> {
    parse_among(message, Candidates::ALL)
}

/// [`parse`], trying only the architectures whose required text the line contains.
pub fn parse_among(message: &str, may: Candidates) -> Option<(Arch, CrashEvent)> {
    if let Some(event) = may.run(Start::PowerPc, || parse_powerpc(message)) {
        return Some((Arch::PowerPc, event));
    }
    if let Some(event) = may.run(Start::RiscV, || parse_riscv(message)) {
        return Some((Arch::RiscV, event));
    }
    if let Some(event) = may.run(Start::S390, || parse_s390(message)) {
        return Some((Arch::S390, event));
    }
    if let Some(event) = may.run(Start::Mips, || parse_mips(message)) {
        return Some((Arch::Mips, event));
    }
    may.run(Start::ArmUndefined, || parse_arm_undefined(message))
        .map(|event| (Arch::ArmUndefined, event))
}

/// The event kind of a signal number (`SIGILL` 4, `SIGTRAP` 5, `SIGBUS` 7, `SIGFPE` 8,
/// `SIGSEGV` 11); None for signals that are no crash of ours.
fn kind_of_signal(signal: u32) -> Option<EventKind> {
    Some(match signal {
        4 => EventKind::InvalidOpcode,
        5 => EventKind::Breakpoint,
        7 | 11 => EventKind::Segfault,
        8 => EventKind::DivideError,
        _ => return None,
    })
}

/// Parses powerpc's `NAME[PID]: segfault (11) at ADDR nip NIP lr LR code N[ in FILE[…]]` (and
/// the other signal names), or the older `NAME[PID]: unhandled signal 11 at ADDR nip … code N`.
pub fn parse_powerpc(message: &str) -> Option<CrashEvent> {
    // Every powerpc line has " nip "; most records have "]: " and are not powerpc lines.
    anchor!(" nip ").find(message.as_bytes())?;
    for at in anchor!("]: ").find_iter(message.as_bytes()) {
        let Some((comm, pid)) = comm_and_pid(&message[..at]) else {
            continue;
        };
        let tail = &message[at + 3..];
        let signal_and_rest = match tail.strip_prefix("unhandled signal ") {
            Some(rest) => rest.split_once(" at "),
            None => tail.split_once(" (").and_then(|(name, rest)| {
                let known = name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b' ' || b == b'-');
                (known && !name.is_empty())
                    .then(|| rest.split_once(") at "))
                    .flatten()
            }),
        };
        let Some((signal, rest)) = signal_and_rest else {
            continue;
        };
        let Some(event) = signal
            .parse()
            .ok()
            .and_then(kind_of_signal)
            .and_then(|kind| powerpc_tail(kind, rest))
        else {
            continue;
        };
        return Some(with_task(event, comm, pid));
    }
    None
}

/// `ADDR nip NIP lr LR code CODE[ in FILE[…]]`; a line a console wrapped or a paste cut keeps
/// the fields printed before the cut (at least `nip`).
fn powerpc_tail(kind: EventKind, tail: &str) -> Option<CrashEvent> {
    let mut words = tail.trim_end().splitn(8, ' ');
    let mut event = CrashEvent::new(kind);
    event.fault_address = Some(Address(hex(words.next()?)?));
    (words.next()? == "nip").then_some(())?;
    let nip = hex(words.next()?)?;
    event.ip = Some(Address(nip));
    event.nip = Some(Address(nip));
    let Some(word) = words.next() else {
        return Some(event);
    };
    (word == "lr").then_some(())?;
    event.lr = Some(Address(hex(words.next()?)?));
    let Some(word) = words.next() else {
        return Some(event);
    };
    (word == "code").then_some(())?;
    event.si_code = Some(hex(words.next()?)?);
    if let Some(rest) = words.next() {
        apply_location(&mut event, &format!(" {rest}"))?;
    }
    Some(event)
}

/// Parses riscv's `NAME[PID]: unhandled signal 11 code 0x1 at 0xADDR[ in FILE[…]]`.
pub fn parse_riscv(message: &str) -> Option<CrashEvent> {
    const ANCHOR: &str = "]: unhandled signal ";
    for at in anchor!("]: unhandled signal ").find_iter(message.as_bytes()) {
        let Some((comm, pid)) = comm_and_pid(&message[..at]) else {
            continue;
        };
        let Some(event) = riscv_tail(&message[at + ANCHOR.len()..]) else {
            continue;
        };
        return Some(with_task(event, comm, pid));
    }
    None
}

/// `11 code 0x1 at 0x0000000000000008[ in FILE[…]]`
fn riscv_tail(tail: &str) -> Option<CrashEvent> {
    let (signal, rest) = tail.split_once(" code 0x")?;
    let kind = kind_of_signal(signal.parse().ok()?)?;
    let (code, rest) = rest.split_once(" at 0x")?;
    let (address, location) = match rest.split_once(' ') {
        Some((address, location)) => (address, location),
        None => (rest, ""),
    };
    let mut event = CrashEvent::new(kind);
    event.si_code = Some(hex(code)?);
    event.fault_address = Some(Address(hex(address)?));
    if !location.is_empty() {
        apply_location(&mut event, &format!(" {location}"))?;
    }
    Some(event)
}

/// Parses s390's `User process fault: interruption code 0038 ilc:3 in FILE[…]` (the location
/// is absent when the address has no mapping; kernels before 3.x print `code 0x11` and no ilc).
pub fn parse_s390(message: &str) -> Option<CrashEvent> {
    const ANCHOR: &str = "User process fault: interruption code ";
    let at = anchor!("User process fault: interruption code ").find(message.as_bytes())?;
    let rest = &message[at + ANCHOR.len()..];
    let (code, ilc, location) = if let Some(old) = rest.strip_prefix("0x") {
        let (code, location) = old.split_once(' ').unwrap_or((old, ""));
        (hex(code)?, None, location)
    } else {
        let (code, rest) = rest.split_once(" ilc:")?;
        let (ilc, location) = rest.split_once(' ').unwrap_or((rest, ""));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        (code.len() == 4).then_some(())?;
        digits(ilc).then_some(())?;
        (hex(code)?, Some(ilc.parse().ok()?), location)
    };
    let mut event = CrashEvent::new(s390_kind(code));
    event.interruption_code = Some(code);
    event.ilc = ilc;
    let location = location.trim();
    if !location.is_empty() {
        apply_location(&mut event, location)?;
    }
    Some(event)
}

/// The kind of an s390 program interruption (Principles of Operation, "Program-Interruption
/// Conditions"): operation, privileged-operation, execute and specification exceptions are
/// SIGILL, arithmetic ones SIGFPE (`DivideError`), the rest are faults on memory. The PER
/// (0x80) and transaction (0x200) flags are ignored.
fn s390_kind(code: u64) -> EventKind {
    match code & 0x7f {
        0x01..=0x03 | 0x06 => EventKind::InvalidOpcode,
        // Data, fixed-point and decimal, and floating-point exceptions: SIGFPE.
        0x07..=0x0f => EventKind::DivideError,
        _ => EventKind::Segfault,
    }
}

/// Parses MIPS's `do_page_fault(): sending SIGSEGV to NAME for invalid read access from ADDR`
/// (or `write access to`); kernels before 3.x print `do_page_fault() #2: …` and the address on
/// the next line, which [`continuation`] reads.
pub fn parse_mips(message: &str) -> Option<CrashEvent> {
    let at = anchor!("do_page_fault").find(message.as_bytes())?;
    let rest = &message[at + "do_page_fault".len()..];
    let rest = rest
        .strip_prefix("(): sending SIGSEGV to ")
        .or_else(|| rest.strip_prefix("() #2: sending SIGSEGV to "))?;
    let split = rest.rfind(" for invalid ")?;
    let comm = &rest[..split];
    let access = &rest[split + " for invalid ".len()..];
    let (write, address) = if let Some(address) = access.strip_prefix("read access from") {
        (false, address)
    } else if let Some(address) = access.strip_prefix("write access to") {
        (true, address)
    } else {
        return None;
    };
    let mut event = CrashEvent::new(EventKind::Segfault);
    if !address.trim().is_empty() {
        event.fault_address = Some(Address(hex(address.strip_prefix(' ')?)?));
    }
    let access = if write { "write" } else { "read" };
    event.error_bits = vec!["user".into(), access.into()];
    (!comm.is_empty()).then_some(())?;
    event.comm = Some(comm.to_owned());
    Some(event)
}

/// Parses `NAME[PID]: undefined instruction: pc=PC` (arm64 and arm before 4.19). The same line
/// is printed for faults in kernel mode: a kernel address is not a user crash.
pub fn parse_arm_undefined(message: &str) -> Option<CrashEvent> {
    const ANCHOR: &str = "]: undefined instruction: pc=";
    for at in anchor!("]: undefined instruction: pc=").find_iter(message.as_bytes()) {
        let Some((comm, pid)) = comm_and_pid(&message[..at]) else {
            continue;
        };
        let digits = message[at + ANCHOR.len()..].trim_end();
        let digits = digits.strip_prefix("0x").unwrap_or(digits);
        let Some(pc) = hex(digits) else {
            continue;
        };
        let kernel = pc >= 0xffff_0000_0000_0000 || (digits.len() <= 8 && pc >= 0xbf00_0000);
        if kernel || pid == 0 {
            return None;
        }
        let mut event = CrashEvent::new(EventKind::InvalidOpcode);
        event.ip = Some(Address(pc));
        return Some(with_task(event, comm, pid));
    }
    None
}

/// Adds a line that follows the first line of `arch`'s report to its event.
pub fn continuation(arch: Arch, event: &mut CrashEvent, message: &str) -> Continuation {
    let taken = match arch {
        Arch::PowerPc => return powerpc_code(event, message),
        Arch::ArmUndefined => {
            return match message.strip_prefix("Code: ") {
                Some(code) => {
                    event.code = Some(code.trim().to_owned());
                    Continuation::TakenAndComplete
                }
                None => Continuation::NotMine,
            };
        }
        Arch::Mips => return mips_line(event, message),
        Arch::RiscV => riscv_line(event, message),
        Arch::S390 => s390_line(event, message),
    };
    if taken {
        Continuation::Taken
    } else {
        Continuation::NotMine
    }
}

/// `NAME[PID]: code: 7c0802a6 f8010010 … <e9290000> …` (powerpc `show_user_instructions`).
fn powerpc_code(event: &mut CrashEvent, message: &str) -> Continuation {
    let (Some(comm), Some(pid)) = (event.comm.as_deref(), event.pid) else {
        return Continuation::NotMine;
    };
    let prefix = format!("{comm}[{pid}]: code: ");
    let Some(words) = message.strip_prefix(&prefix) else {
        return Continuation::NotMine;
    };
    let words = words.trim();
    event.code = Some(match event.code.take() {
        Some(code) => format!("{code} {words}"),
        None => words.to_owned(),
    });
    Continuation::Taken
}

/// `epc = 77e1f034 in libc.so[77d98000+b2000]`, `ra  = 0043b69b in busybox[400000+55000]`, or
/// the old `0000000c (epc == 77e1f034, ra == 0043b69b)`.
fn mips_line(event: &mut CrashEvent, message: &str) -> Continuation {
    if let Some(rest) = message.strip_prefix("epc = ") {
        let (address, location) = rest.split_once(" in").unwrap_or((rest, ""));
        let Some(epc) = hex(address.trim()) else {
            return Continuation::NotMine;
        };
        event.ip = Some(Address(epc));
        if !location.trim().is_empty() {
            let location = location.trim();
            let mut located = event.clone();
            if apply_location(&mut located, &format!("in {location}")).is_some() {
                *event = located;
            }
        }
        return Continuation::Taken;
    }
    if let Some(rest) = message.strip_prefix("ra  = ") {
        let address = rest.split_once(" in").map_or(rest, |(a, _)| a);
        return match hex(address.trim()) {
            Some(_) => Continuation::TakenAndComplete,
            None => Continuation::NotMine,
        };
    }
    // do_page_fault() #2 (before 3.x): "ADDR (epc == EPC, ra == RA)"
    if event.fault_address.is_none()
        && let Some((address, rest)) = message.split_once(" (epc == ")
        && let Some((epc, _)) = rest.split_once(", ra == ")
        && let (Some(address), Some(epc)) = (hex(address.trim()), hex(epc))
    {
        event.fault_address = Some(Address(address));
        event.ip = Some(Address(epc));
        return Continuation::TakenAndComplete;
    }
    Continuation::NotMine
}

/// riscv's `CPU:`, `Hardware name:`, `task:` and register lines (`epc : … ra : … sp : …`).
fn riscv_line(event: &mut CrashEvent, message: &str) -> bool {
    if let Some((cpu, _, _)) = misc::parse_oops_task(message) {
        event.cpu.get_or_insert(cpu);
        return true;
    }
    if message.starts_with("Hardware name: ") || message.starts_with("task: ") {
        return true;
    }
    let Some(registers) = register_line(message) else {
        return false;
    };
    for (name, value) in registers {
        match name {
            "epc" | "sepc" => event.ip = Some(Address(value)),
            "sp" => event.sp = Some(Address(value)),
            _ => {}
        }
    }
    true
}

/// A line of `NAME : HEX` pairs as the riscv and arm64 register dumps print them
/// (`epc : 0000003faee8d1aa ra : 0000003faf093baa sp : 0000003faae67fc0`, `s10: 0000…`).
pub fn register_line(message: &str) -> Option<Vec<(&str, u64)>> {
    let mut pairs = Vec::with_capacity(3);
    let mut rest = message.trim_start();
    while !rest.is_empty() {
        // Names and values are short: byte loops find their ends.
        let name_end = rest
            .bytes()
            .position(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit()))
            .unwrap_or(rest.len());
        let name = &rest[..name_end];
        let after = rest[name_end..].trim_start_matches(' ');
        let after = after.strip_prefix(':')?.trim_start_matches(' ');
        let value_end = after.bytes().position(|b| b == b' ').unwrap_or(after.len());
        if name.is_empty() || name.len() > 8 {
            return None;
        }
        pairs.push((name, hex(&after[..value_end])?));
        rest = after[value_end..].trim_start_matches(' ');
    }
    (!pairs.is_empty()).then_some(pairs)
}

/// s390's lines after `User process fault`: the failing address, the task, the PSW, the
/// general registers, the code and the breaking-event address.
fn s390_line(event: &mut CrashEvent, message: &str) -> bool {
    if let Some((cpu, pid, comm)) = misc::parse_oops_task(message) {
        event.cpu.get_or_insert(cpu);
        event.pid.get_or_insert(pid);
        event.comm.get_or_insert(comm);
        return true;
    }
    let failing = message
        .strip_prefix("Failing address: ")
        .or_else(|| message.strip_prefix("failing address: "));
    if let Some(rest) = failing {
        let address = rest.split_whitespace().next().and_then(hex);
        if event.fault_address.is_none() {
            event.fault_address = address.map(Address);
        }
        return true;
    }
    if let Some(rest) = message.strip_prefix("User PSW : ") {
        if let Some(address) = rest.split_whitespace().nth(1).and_then(hex) {
            event.ip = Some(Address(address));
        }
        return true;
    }
    const OTHERS: [&str; 9] = [
        "task: ",
        "Fault in ",
        "AS:",
        "Hardware name: ",
        "User GPRS: ",
        "User Code: ",
        "Last Breaking-Event-Address:",
        "Process ",
        "Krnl Code: ",
    ];
    message.starts_with(' ') || OTHERS.iter().any(|p| message.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powerpc_both_eras() {
        // Format strings of arch/powerpc/kernel/traps.c show_signal_msg (4.19 on) and
        // _exception_pkey (before); the values are made up.
        let e = parse_powerpc(
            "a.out[42]: segfault (11) at 8 nip 1000042c lr 10000418 code 1 in a.out[10000000+10000]",
        )
        .unwrap();
        assert_eq!(e.kind, EventKind::Segfault);
        assert_eq!((e.comm.as_deref(), e.pid), (Some("a.out"), Some(42)));
        assert_eq!(e.fault_address, Some(Address(8)));
        assert_eq!(
            (e.nip, e.ip),
            (Some(Address(0x1000_042c)), Some(Address(0x1000_042c)))
        );
        assert_eq!(e.lr, Some(Address(0x1000_0418)));
        assert_eq!(e.si_code, Some(1));
        assert_eq!(e.vma_start, Some(Address(0x1000_0000)));
        let old = parse_powerpc(
            "init[1]: unhandled signal 4 at 00007fffa13c60fc nip 00007fffa13c60fc lr 00007fffa13928f8 code 1",
        )
        .unwrap();
        assert_eq!(old.kind, EventKind::InvalidOpcode);
        assert_eq!(old.module, None);
        let bus = parse_powerpc("x[7]: bus error (7) at 3 nip 4 lr 5 code 2").unwrap();
        assert_eq!((bus.kind, bus.si_code), (EventKind::Segfault, Some(2)));
        for near_miss in [
            "x[7]: segfault (11) at 8 nip 1 lr 2 cod",
            "x[7]: segfault (11) at 8 nip 1 lr 2 code zz",
            "x[7]: segfault (11) at 8 nip",
            "x[7]: segfault (99) at 8 nip 1 lr 2 code 1",
            "x[7]: Segfault (11) at 8 nip 1 lr 2 code 1",
            "x[7]: segfault (11) at 8 nip 1 lr 2 code 1 garbage",
        ] {
            assert!(parse_powerpc(near_miss).is_none(), "{near_miss}");
        }
    }

    #[test]
    fn riscv_line_and_registers() {
        let e = parse_riscv(
            "a[5]: unhandled signal 11 code 0x2 at 0x0000000000010000 in a[10000+1000]",
        )
        .unwrap();
        assert_eq!((e.kind, e.si_code), (EventKind::Segfault, Some(2)));
        assert_eq!(e.fault_address, Some(Address(0x10000)));
        assert_eq!(e.module.as_deref(), Some("a"));
        let mut e = e;
        assert_eq!(
            continuation(
                Arch::RiscV,
                &mut e,
                "epc : 0000000000010100 ra : 0000000000010200 sp : 0000003ffffff000"
            ),
            Continuation::Taken
        );
        assert_eq!(e.ip, Some(Address(0x10100)));
        assert_eq!(e.sp, Some(Address(0x3f_ffff_f000)));
        assert_eq!(
            continuation(
                Arch::RiscV,
                &mut e,
                " s11: 0000000000001000 t3 : 0000003faae6c0ab"
            ),
            Continuation::Taken
        );
        assert_eq!(
            continuation(
                Arch::RiscV,
                &mut e,
                "b[6]: unhandled signal 11 code 0x1 at 0x0"
            ),
            Continuation::NotMine
        );
        assert!(parse_riscv("a[5]: unhandled signal 11 code 0x2 at 0x10 garbage").is_none());
        assert!(parse_riscv("a[5]: unhandled signal 11 at 0x10").is_none());
    }

    #[test]
    fn s390_line_and_its_lines() {
        let mut e = parse_s390(
            "User process fault: interruption code 0011 ilc:3 in libc.so.6[3ff8a680000+1c1000]",
        )
        .unwrap();
        assert_eq!(e.kind, EventKind::Segfault);
        assert_eq!((e.interruption_code, e.ilc), (Some(0x11), Some(3)));
        assert_eq!(e.module.as_deref(), Some("libc.so.6"));
        for line in [
            "Failing address: 0000000000000000 TEID: 0000000000000800",
            "CPU: 2 PID: 1234 Comm: a.out Not tainted 6.1.0 #1",
            "User PSW : 0705000180000000 000003ff8a7024e6",
            "           R:0 T:1 IO:1 EX:1 Key:0 M:1 W:0 P:1 AS:0 CC:0 PM:0 RI:0 EA:3",
        ] {
            assert_eq!(
                continuation(Arch::S390, &mut e, line),
                Continuation::Taken,
                "{line}"
            );
        }
        assert_eq!(
            (e.comm.as_deref(), e.pid, e.cpu),
            (Some("a.out"), Some(1234), Some(2))
        );
        assert_eq!(e.fault_address, Some(Address(0)));
        assert_eq!(e.ip, Some(Address(0x3ff_8a70_24e6)));
        let ill = parse_s390("User process fault: interruption code 0001 ilc:2 ").unwrap();
        assert_eq!((ill.kind, ill.module), (EventKind::InvalidOpcode, None));
        assert!(parse_s390("User process fault: interruption code 11 ilc:3").is_none());
        assert!(parse_s390("User process fault: interruption code 0011 ilc:x").is_none());
    }

    #[test]
    fn mips_report() {
        let mut e = parse_mips(
            "do_page_fault(): sending SIGSEGV to my app for invalid write access to 00000004",
        )
        .unwrap();
        assert_eq!(e.comm.as_deref(), Some("my app"));
        assert_eq!(e.pid, None);
        assert_eq!(e.fault_address, Some(Address(4)));
        assert_eq!(e.error_bits, ["user", "write"]);
        assert_eq!(
            continuation(Arch::Mips, &mut e, "epc = 00401234 in app[400000+2000]"),
            Continuation::Taken
        );
        assert_eq!(e.ip, Some(Address(0x40_1234)));
        assert_eq!(e.module.as_deref(), Some("app"));
        assert_eq!(
            continuation(Arch::Mips, &mut e, "ra  = 00401200 in app[400000+2000]"),
            Continuation::TakenAndComplete
        );
        assert!(parse_mips("do_page_fault(): sending SIGSEGV to x for invalid poke 0").is_none());
    }

    #[test]
    fn arm_undefined_instruction_in_user_mode_only() {
        let e = parse_arm_undefined("a[9]: undefined instruction: pc=0000000000400544").unwrap();
        assert_eq!(
            (e.kind, e.ip),
            (EventKind::InvalidOpcode, Some(Address(0x40_0544)))
        );
        assert!(
            parse_arm_undefined("swapper/2[0]: undefined instruction: pc=ffffffc0006e77e4")
                .is_none(),
            "a kernel-mode fault"
        );
        assert!(parse_arm_undefined("a[9]: undefined instruction: pc=(null)").is_none());
    }
}
