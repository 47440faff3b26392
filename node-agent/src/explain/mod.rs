//! Stage 4 of the pipeline: saying in plain words what went wrong (pure).

pub mod access;
pub mod arm64;
pub mod arm64_access;
pub mod disasm;

use std::fmt::Write as _;

use crds::{CrashEvent, EventKind};

/// Addresses below this are offsets from a NULL pointer: Linux refuses to map them
/// (`vm.mmap_min_addr` defaults to 64 KiB).
pub const NULL_PAGE_LIMIT: u64 = 0x10000;

/// How close to the stack pointer a fault must be to count as a stack overflow.
const STACK_SLACK: u64 = 64 * 1024;

/// The class of a user-space fault, from the error bits and the addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// A call or jump to address 0 (or a small address): a NULL function pointer.
    JumpToNull,
    /// A read or write at a small address: a NULL pointer plus an offset.
    NullDereference,
    /// The fault is at the stack pointer: the stack ran into its guard gap.
    StackOverflow,
    /// A write to a page mapped read-only (string literals, `const` data, code).
    WriteToReadOnly,
    /// An instruction fetch from a page that is mapped but not executable.
    ExecuteNonExecutable,
    /// An access to an unmapped address that is not near NULL: a wild or freed pointer.
    WildPointer,
    /// A general protection fault: a non-canonical address or a privileged instruction.
    GeneralProtection,
    /// Integer division by zero, or `INT_MIN / -1`.
    DivideError,
    /// An undefined instruction: `ud2`/`__builtin_trap()`, or a jump into data.
    InvalidOpcode,
    /// An `int3` breakpoint with no debugger attached.
    Breakpoint,
}

impl FaultClass {
    /// A short title for the class.
    pub fn title(self) -> &'static str {
        match self {
            FaultClass::JumpToNull => "jump to NULL",
            FaultClass::NullDereference => "NULL pointer dereference",
            FaultClass::StackOverflow => "stack overflow",
            FaultClass::WriteToReadOnly => "write to read-only memory",
            FaultClass::ExecuteNonExecutable => "execution of non-executable memory",
            FaultClass::WildPointer => "access to unmapped memory",
            FaultClass::GeneralProtection => "general protection fault",
            FaultClass::DivideError => "divide error",
            FaultClass::InvalidOpcode => "invalid opcode",
            FaultClass::Breakpoint => "breakpoint trap",
        }
    }
}

/// Classifies a user-space crash event; None for hangs and other kinds.
pub fn classify(event: &CrashEvent) -> Option<FaultClass> {
    Some(match event.kind {
        EventKind::GeneralProtection => FaultClass::GeneralProtection,
        EventKind::DivideError => FaultClass::DivideError,
        EventKind::InvalidOpcode => FaultClass::InvalidOpcode,
        EventKind::Breakpoint => FaultClass::Breakpoint,
        EventKind::Segfault => {
            let bits = &event.error_bits;
            let has = |name: &str| bits.iter().any(|b| b == name);
            let fetch = has("instruction-fetch");
            let address = event.fault_address.map(|a| a.0);
            let ip = event.ip.map(|a| a.0);
            let sp = event.sp.map(|a| a.0);
            if fetch
                && (ip.is_some_and(|ip| ip < NULL_PAGE_LIMIT)
                    || address.is_some_and(|a| a < NULL_PAGE_LIMIT))
            {
                FaultClass::JumpToNull
            } else if fetch && has("protection-violation") {
                FaultClass::ExecuteNonExecutable
            } else if has("write") && has("protection-violation") {
                FaultClass::WriteToReadOnly
            } else if address.is_some_and(|a| a < NULL_PAGE_LIMIT) {
                FaultClass::NullDereference
            } else if let (Some(a), Some(sp)) = (address, sp)
                && a.abs_diff(sp) <= STACK_SLACK
            {
                FaultClass::StackOverflow
            } else {
                FaultClass::WildPointer
            }
        }
        _ => return None,
    })
}

/// Decodes the faulting instruction from the event's `Code:` bytes (x86-64 only).
pub fn faulting_instruction(event: &CrashEvent) -> Option<disasm::FaultingInstruction> {
    let code = disasm::parse_code(event.code.as_deref()?).ok()?;
    disasm::decode_faulting_instruction(&code, event.ip?.0)
}

/// What the memory operand says about the pointer: "the pointer in rdi, which was NULL".
fn pointer_clause(event: &CrashEvent, instruction: &disasm::FaultingInstruction) -> Option<String> {
    let memory = instruction.memory.as_ref()?;
    let base = memory.base.as_deref().filter(|b| *b != "rip")?;
    if memory.index.is_some() {
        return None;
    }
    let fault = event.fault_address?.0;
    let pointer = fault.wrapping_sub(memory.displacement as u64);
    let offset = memory.displacement;
    let what = match (memory.write, memory.size) {
        (false, Some(1)) => "reads 1 byte".to_owned(),
        (false, Some(n)) => format!("reads {n} bytes"),
        (false, None) => "reads".to_owned(),
        (true, Some(1)) => "writes 1 byte".to_owned(),
        (true, Some(n)) => format!("writes {n} bytes"),
        (true, None) => "writes".to_owned(),
    };
    let held = if pointer == 0 {
        "which was NULL".to_owned()
    } else {
        format!("which held {pointer:#x}")
    };
    Some(format!(
        "{what} at offset {offset:#x} from the pointer in {base}, {held}"
    ))
}

/// One or two plain sentences about the event, from what it carries.
pub fn explanation(event: &CrashEvent) -> String {
    if let Some(class) = classify(event) {
        return fault_explanation(event, class);
    }
    let who = task(event);
    match event.kind {
        EventKind::HungTask => {
            let mut text = format!("{who} has been stuck in uninterruptible sleep");
            if let Some(seconds) = event.blocked_seconds {
                let _ = write!(text, " for {seconds} s or more");
            }
            if let Some(wchan) = event.wchan.as_deref().or_else(|| {
                event
                    .kernel_stack
                    .iter()
                    .map(|f| f.split('+').next().unwrap_or(f))
                    .find(|f| !f.contains("schedule"))
            }) {
                let _ = write!(text, ", waiting in {wchan}()");
            }
            text.push_str("; it cannot be killed until the I/O it waits for completes.");
            if let Some(blocker) = &event.explanation {
                let _ = write!(text, " It is {blocker}.");
            }
            text
        }
        EventKind::NbdError => event
            .explanation
            .clone()
            .unwrap_or_else(|| "nbd driver error.".into()),
        EventKind::OomKill => format!(
            "The kernel ran out of memory and killed {} (pid {}){}.",
            event.victim_comm.as_deref().unwrap_or("a process"),
            event.victim_pid.map_or("?".into(), |p| p.to_string()),
            event
                .comm
                .as_deref()
                .filter(|c| Some(*c) != event.victim_comm.as_deref())
                .map(|c| format!(" while {c} was allocating"))
                .unwrap_or_default(),
        ),
        EventKind::Abort => format!(
            "{who} aborted itself with SIGABRT: abort() was called, typically by a failed assert() or an uncaught C++ exception."
        ),
        EventKind::BusError => format!(
            "{who} was killed by a bus error (SIGBUS){}: an access beyond the end of a mapped file, or one the hardware cannot do.",
            event
                .fault_address
                .map(|a| format!(" at {a}"))
                .unwrap_or_default(),
        ),
        EventKind::KernelOops => format!(
            "The kernel itself faulted{}{}; this is a kernel bug, not a crash of {}.",
            event
                .kernel_stack
                .first()
                .map(|l| format!(" in {l}"))
                .unwrap_or_default(),
            event
                .comm
                .as_deref()
                .map(|c| format!(" while running {c}"))
                .unwrap_or_default(),
            event.comm.as_deref().unwrap_or("a user process"),
        ),
        _ => String::new(),
    }
}

fn task(event: &CrashEvent) -> String {
    match (&event.comm, event.pid) {
        (Some(comm), Some(pid)) => format!("{comm} (pid {pid})"),
        (Some(comm), None) => comm.clone(),
        _ => "the task".into(),
    }
}

/// ` at 0x…`, or nothing when the kernel printed no fault address (s390's first line, arm64's
/// `unhandled exception` line): an absent fact is not faked.
fn at_address(address: Option<u64>) -> String {
    address.map_or_else(String::new, |a| format!(" at {a:#x}"))
}

fn fault_explanation(event: &CrashEvent, class: FaultClass) -> String {
    let address = event.fault_address.map(|a| a.0);
    let access = if event.error_bits.iter().any(|b| b == "write") {
        "write"
    } else {
        "read"
    };
    let mut text = match class {
        FaultClass::NullDereference => format!(
            "NULL pointer dereference: {access} at address {:#x}, i.e. offset {:#x} from a NULL pointer",
            address.unwrap_or(0),
            address.unwrap_or(0)
        ),
        FaultClass::JumpToNull => "Jump to NULL: the program called or jumped through a NULL function pointer".to_owned(),
        FaultClass::StackOverflow => format!(
            "Stack overflow: the {access} at {:#x} hit the guard gap right next to the stack pointer",
            address.unwrap_or(0)
        ),
        FaultClass::WriteToReadOnly => format!(
            "Write to read-only memory{} (a string literal, const data or code)",
            at_address(address)
        ),
        FaultClass::ExecuteNonExecutable => format!(
            "Execution of non-executable memory at {:#x} (data, heap or stack)",
            address.or(event.ip.map(|a| a.0)).unwrap_or(0)
        ),
        FaultClass::WildPointer => format!(
            "Access to unmapped memory: {access}{}, a wild, freed or corrupted pointer",
            at_address(address)
        ),
        FaultClass::GeneralProtection => {
            "General protection fault: a non-canonical address (often a corrupted pointer) or a privileged instruction".to_owned()
        }
        FaultClass::DivideError => "Divide error: integer division by zero (or INT_MIN / -1)".to_owned(),
        FaultClass::InvalidOpcode => {
            "Invalid opcode: an undefined instruction (on x86 usually ud2 from __builtin_trap() or an assertion), or a jump into data".to_owned()
        }
        FaultClass::Breakpoint => "Breakpoint trap: an int3 instruction ran with no debugger attached".to_owned(),
    };
    if let Some(traced) = traced_access(event, class) {
        text = traced;
        if let Some(innermost) = event.frames.first() {
            write_frames(&mut text, event, innermost);
        }
        let _ = write!(text, ". It happened in {}", task(event));
        if let Some(instruction) = &event.instruction {
            let _ = write!(text, " at `{instruction}`");
        }
        text.push('.');
        return text;
    }
    let _ = write!(text, " in {}", task(event));
    if let Some(instruction) = faulting_instruction(event) {
        match pointer_clause(event, &instruction) {
            Some(clause) => {
                let _ = write!(text, ": `{}` {clause}", instruction.text);
            }
            None => {
                let _ = write!(text, " at `{}`", instruction.text);
            }
        }
    } else if let Some(instruction) = arm64::faulting_instruction(event) {
        let _ = write!(text, " at `{instruction}`");
    }
    if let Some(innermost) = event.frames.first() {
        write_frames(&mut text, event, innermost);
    } else if let Some(module) = &event.module {
        let _ = write!(text, ", in {module}");
        match (event.module_offset, event.ip, event.vma_start) {
            (Some(offset), _, _) => {
                let _ = write!(text, " at file offset {offset}");
            }
            (None, Some(ip), Some(start)) => {
                let _ = write!(
                    text,
                    " at {:#x} into its mapping",
                    ip.0.wrapping_sub(start.0)
                );
            }
            _ => {}
        }
    }
    text.push('.');
    text
}

/// ", in f() at file.c:12, inlined into g(), called from h() ← main()": the frames of
/// the faulting address up to its real function, then the callers of a whole stack.
fn write_frames(text: &mut String, event: &CrashEvent, innermost: &crds::Frame) {
    let _ = write!(
        text,
        ", in {}()",
        innermost.function.as_deref().unwrap_or("??")
    );
    if let (Some(file), Some(line)) = (&innermost.file, innermost.line) {
        let _ = write!(text, " at {file}:{line}");
    }
    let names = |frames: &[crds::Frame]| {
        frames
            .iter()
            .map(|f| format!("{}()", f.function.as_deref().unwrap_or("??")))
            .collect::<Vec<_>>()
            .join(" ← ")
    };
    // The faulting function is the first frame not inlined into the next.
    let function = event
        .frames
        .iter()
        .position(|f| !f.inlined)
        .unwrap_or(event.frames.len() - 1);
    if function > 0 {
        let _ = write!(
            text,
            ", inlined into {}",
            names(&event.frames[1..=function])
        );
    }
    if function + 1 < event.frames.len() {
        let _ = write!(
            text,
            ", called from {}",
            names(&event.frames[function + 1..])
        );
    }
}

/// "NULL pointer dereference: read of member `x` (offset 0x10) through `a->b`, which was
/// NULL", when the member analysis traced the pointer or the member.
fn traced_access(event: &CrashEvent, class: FaultClass) -> Option<String> {
    let access = event.access.as_ref()?;
    if access.pointer.is_none() && access.member.is_none() {
        return None;
    }
    let pointer_value = event.fault_address?.0.wrapping_sub(access.offset.0);
    let verb = if access.write { "write" } else { "read" };
    let what = match &access.member {
        Some(member) => format!("{verb} of member `{member}` (offset {})", access.offset),
        None => format!("{verb} at offset {}", access.offset),
    };
    let held = if pointer_value == 0 {
        "which was NULL".to_owned()
    } else {
        format!("which held {pointer_value:#x}")
    };
    let through = match &access.pointer {
        Some(pointer) => format!("through `{pointer}`, {held}"),
        None if pointer_value == 0 => "through a NULL pointer".to_owned(),
        None => format!("through a pointer {held}"),
    };
    match class {
        FaultClass::NullDereference => Some(format!("NULL pointer dereference: {what} {through}")),
        FaultClass::WildPointer => Some(format!(
            "Access to unmapped memory: {what} {through}, a wild, freed or corrupted pointer"
        )),
        _ => None,
    }
}

/// The human-readable report `crashwatch-agent explain` prints for one event.
pub fn render_text(event: &CrashEvent) -> String {
    let mut out = String::new();
    let title = classify(event).map_or(event.kind.as_str().to_owned(), |c| {
        format!("{} ({})", event.kind, c.title())
    });
    let _ = writeln!(out, "{title}: {}", task(event));
    let field = |out: &mut String, name: &str, value: String| {
        let _ = writeln!(out, "  {name:<13}{value}");
    };
    if let Some(explanation) = &event.explanation {
        field(&mut out, "what:", explanation.clone());
    }
    if let Some(a) = event.fault_address {
        field(&mut out, "fault addr:", a.to_string());
    }
    if let Some(code) = event.error_code {
        field(
            &mut out,
            "error:",
            format!("{code:#x} ({})", event.error_bits.join(", ")),
        );
    }
    if let Some(ip) = event.ip {
        field(&mut out, "ip:", ip.to_string());
    }
    if let Some(sp) = event.sp {
        field(&mut out, "sp:", sp.to_string());
    }
    if let Some(module) = &event.module {
        let mut text = module.clone();
        if let Some(offset) = event.module_offset {
            let _ = write!(text, " + file offset {offset}");
        }
        if let (Some(start), Some(size)) = (event.vma_start, event.vma_size) {
            let _ = write!(text, " (mapped at {start}, {size} bytes)");
        }
        field(&mut out, "module:", text);
    }
    for (i, frame) in event.frames.iter().enumerate() {
        let location = match (&frame.file, frame.line) {
            (Some(file), Some(line)) => format!(" at {file}:{line}"),
            (Some(file), None) => format!(" in {file}"),
            _ => String::new(),
        };
        let inlined = if frame.inlined { " (inlined)" } else { "" };
        let module = frame
            .module
            .as_deref()
            .map(|m| format!(" [{m}]"))
            .unwrap_or_default();
        let name = if i == 0 { "frames:" } else { "" };
        field(
            &mut out,
            name,
            format!(
                "{}{location}{inlined}{module}",
                frame.function.as_deref().unwrap_or("??")
            ),
        );
    }
    if let Some(instruction) = &event.instruction {
        field(&mut out, "instruction:", instruction.clone());
    }
    if let Some(path) = &event.binary_path {
        let mut text = path.clone();
        if let Some(id) = &event.build_id {
            let _ = write!(text, " (build-id {id})");
        }
        match event.binary_matches {
            Some(true) => text.push_str(", matches the Code: bytes"),
            Some(false) => {
                text.push_str(", DOES NOT match the Code: bytes: replaced since the crash?")
            }
            None => {}
        }
        field(&mut out, "binary:", text);
    }
    if let Some(code) = &event.code {
        field(&mut out, "code:", code.clone());
    }
    if let Some(device) = &event.device {
        field(&mut out, "device:", device.clone());
    }
    if let Some(wchan) = &event.wchan {
        field(&mut out, "wchan:", wchan.clone());
    }
    for (i, frame) in event.kernel_stack.iter().enumerate() {
        field(
            &mut out,
            if i == 0 { "kernel stack:" } else { "" },
            frame.clone(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recognise::user_fault::{parse_segfault, parse_trap};

    fn class_of(line: &str) -> FaultClass {
        let event = parse_segfault(line).or_else(|| parse_trap(line)).unwrap();
        classify(&event).unwrap()
    }

    #[test]
    fn classes_of_the_fault_lab_crashes() {
        // Each line is a real crash whose cause is known from the program that caused it.
        assert_eq!(
            class_of(
                "crashy[10504]: segfault at 100 ip 0000564bc14194f0 sp 00007ffc75ee83d8 error 4 in crashy[14f0,564bc1419000+1000]"
            ),
            FaultClass::NullDereference
        );
        assert_eq!(
            class_of(
                "crashy[10506]: segfault at 55f3813270a0 ip 000055f381326540 sp 00007ffc1a6820a8 error 7 in crashy[1540,55f381326000+1000]"
            ),
            FaultClass::WriteToReadOnly
        );
        assert_eq!(
            class_of(
                "crashy[10508]: segfault at 0 ip 0000000000000000 sp 00007ffdd7237068 error 14"
            ),
            FaultClass::JumpToNull
        );
        assert_eq!(
            class_of(
                "nx[11115]: segfault at 7ffbc1ef5000 ip 00007ffbc1ef5000 sp 00007ffc35200d58 error 15"
            ),
            FaultClass::ExecuteNonExecutable
        );
        assert_eq!(
            class_of(
                "crashy[10881]: segfault at 7fff72343d40 ip 000055f4b588f5a7 sp 00007fff72343d40 error 6 in crashy[15a7,55f4b588f000+1000]"
            ),
            FaultClass::StackOverflow
        );
        assert_eq!(
            class_of(
                "libcbad[18773]: segfault at ff8 ip 00007f5e2c9eaf0a sp 00007ffe1f871c10 error 4 in libc.so.6[98f0a,7f5e2c978000+156000]"
            ),
            FaultClass::NullDereference
        );
        assert_eq!(
            class_of(
                "x[1]: segfault at 7f0000001000 ip 000055f4b588f5a7 sp 00007fff72343d40 error 4"
            ),
            FaultClass::WildPointer
        );
        assert_eq!(
            class_of(
                "traps: crashy[10517] trap divide error ip:563e83462593 sp:7ffffb2f89a8 error:0 in crashy[1593,563e83462000+1000]"
            ),
            FaultClass::DivideError
        );
    }

    #[test]
    fn the_code_bytes_name_the_null_pointer() {
        let mut event = parse_segfault("crashy[10504]: segfault at 100 ip 0000564bc14194f0 sp 00007ffc75ee83d8 error 4 in crashy[14f0,564bc1419000+1000] likely on CPU 0 (core 0, socket 0)").unwrap();
        event.code = Some("ff e8 64 ff ff ff c6 05 f5 2b 00 00 01 5d c3 0f 1f 00 c3 0f 1f 80 00 00 00 00 f3 0f 1e fa e9 77 ff ff ff 0f 1f 80 00 00 00 00 <48> 8b 87 00 01 00 00 c3 0f 1f 84 00 00 00 00 00 53 48 89 fb e8 d7".into());
        let text = explanation(&event);
        assert!(
            text.contains("`mov rax, [rdi+0x100]` reads 8 bytes at offset 0x100 from the pointer in rdi, which was NULL"),
            "{text}"
        );
    }

    #[test]
    fn the_seed_line_explained() {
        let event = parse_segfault("qemu-nbd[13647]: segfault at 100 ip 0000561c8817d1c7 sp 00007fc8f1ce9c00 error 4 in qemu-nbd[561c88107000+155000]").unwrap();
        let text = explanation(&event);
        assert!(text.starts_with("NULL pointer dereference: read at address 0x100, i.e. offset 0x100 from a NULL pointer"), "{text}");
        // 0x561c8817d1c7 - 0x561c88107000 = 0x761c7
        assert!(
            text.contains("in qemu-nbd (pid 13647), in qemu-nbd at 0x761c7 into its mapping"),
            "{text}"
        );
    }

    #[test]
    fn no_fault_address_is_made_up_when_the_kernel_printed_none() {
        // s390's first line and arm64's `unhandled exception` line carry no fault address.
        let event = crate::recognise::arch::parse_s390(
            "User process fault: interruption code 0038 ilc:3 in libstdc++.so.6.0.23[3ff9d000000+1b9000]",
        )
        .unwrap();
        let text = fault_explanation(&event, classify(&event).unwrap());
        assert!(!text.contains("0x0"), "{text}");
        assert!(
            text.starts_with("Access to unmapped memory: read, "),
            "{text}"
        );
    }
}
