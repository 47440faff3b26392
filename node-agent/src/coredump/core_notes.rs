//! The start of an x86-64 ELF core as the kernel streams it into a `core_pattern` pipe: the
//! ELF header, the first program header (the notes, always first) and the notes, which hold
//! the registers of the thread that crashed (`NT_PRSTATUS`, first) and its signal
//! (`NT_SIGINFO`). Pure parsing of bytes; the caller reads them.

use thiserror::Error;

/// `NT_PRSTATUS`: a thread's `struct elf_prstatus`.
const NT_PRSTATUS: u32 = 1;
/// `NT_SIGINFO`: the `siginfo_t` of the signal that caused the dump.
const NT_SIGINFO: u32 = 0x5349_4749;
/// `PT_NOTE`.
const PT_NOTE: u32 = 4;
/// `ET_CORE`.
const ET_CORE: u16 = 4;
/// `EM_X86_64`.
const EM_X86_64: u16 = 62;
/// Where `pr_reg` starts in x86-64's `struct elf_prstatus`.
const PR_REG_OFFSET: usize = 112;
/// `elf_gregset_t` on x86-64: 27 registers.
const PR_REG_COUNT: usize = 27;
/// The most note bytes read: the crashing thread's notes come first, and are small.
pub const MAX_NOTES: u64 = 1 << 20;

/// Why the start of a core stream could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CoreError {
    /// The stream does not start like an ELF core.
    #[error("not an ELF core: {0}")]
    NotACore(&'static str),
    /// An x86-64 core is the only kind whose registers are read.
    #[error("the core is for machine {0}, not x86-64")]
    Machine(u16),
    /// The first program header is not the notes.
    #[error("the core's first program header is not PT_NOTE")]
    NoNotes,
    /// The stream ended before what it announced.
    #[error("the core stream ends at {have} bytes, before {need}")]
    Truncated {
        /// Bytes read.
        have: usize,
        /// Bytes the headers announce.
        need: u64,
    },
    /// No `NT_PRSTATUS` note.
    #[error("the core has no NT_PRSTATUS note")]
    NoRegisters,
}

/// The x86-64 registers of a thread, indexed by their DWARF register number (0 rax, 1 rdx,
/// 2 rcx, 3 rbx, 4 rsi, 5 rdi, 6 rbp, 7 rsp, 8–15 r8–r15, 16 the return address column, rip).
pub type Registers = [u64; 17];

/// The DWARF register number of rsp.
pub const RSP: usize = 7;
/// The DWARF register number of rip (the return address column).
pub const RIP: usize = 16;

/// What the notes tell about the crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreFacts {
    /// The crashing thread's registers.
    pub registers: Registers,
    /// Its thread id, as the kernel's pid namespace of the dump sees it.
    pub tid: u32,
    /// The signal and its `si_code` and `si_addr`, from `NT_SIGINFO`.
    pub signal: Option<SignalInfo>,
}

/// The part of `siginfo_t` that describes a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalInfo {
    /// The signal number.
    pub signo: i32,
    /// `si_code`: how it was raised (`SI_KERNEL` 0x80 for a general protection fault).
    pub code: i32,
    /// `si_addr`: the faulting address, for SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGTRAP.
    pub addr: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The file range of the notes, from the first 64 + 56 bytes of the stream (the ELF header
/// and the first program header, which `e_phoff` places right after it).
pub fn notes_range(start: &[u8]) -> Result<std::ops::Range<u64>, CoreError> {
    let short = CoreError::Truncated {
        have: start.len(),
        need: 64,
    };
    if start.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(CoreError::NotACore("no ELF magic"));
    }
    if start.get(4) != Some(&2) || start.get(5) != Some(&1) {
        return Err(CoreError::NotACore("not 64-bit little-endian"));
    }
    if u16_at(start, 16).ok_or(short)? != ET_CORE {
        return Err(CoreError::NotACore("e_type is not ET_CORE"));
    }
    let machine = u16_at(start, 18).ok_or(CoreError::NotACore("short header"))?;
    if machine != EM_X86_64 {
        return Err(CoreError::Machine(machine));
    }
    let phoff = u64_at(start, 32).ok_or(CoreError::NotACore("short header"))?;
    let phentsize = u64::from(u16_at(start, 54).ok_or(CoreError::NotACore("short header"))?);
    if phentsize < 56 {
        return Err(CoreError::NotACore("program headers too small"));
    }
    let header = usize::try_from(phoff)
        .ok()
        .filter(|at| at.checked_add(56).is_some_and(|end| end <= start.len()))
        .ok_or(CoreError::Truncated {
            have: start.len(),
            need: phoff.saturating_add(56),
        })?;
    if u32_at(start, header) != Some(PT_NOTE) {
        return Err(CoreError::NoNotes);
    }
    let offset = u64_at(start, header + 8).ok_or(CoreError::NoNotes)?;
    let size = u64_at(start, header + 32)
        .ok_or(CoreError::NoNotes)?
        .min(MAX_NOTES);
    Ok(offset..offset.saturating_add(size))
}

/// The facts in `notes`, the bytes of the notes segment (or a prefix of it: a note cut off
/// at the end is ignored).
pub fn parse_notes(notes: &[u8]) -> Result<CoreFacts, CoreError> {
    let mut at = 0usize;
    let mut facts: Option<CoreFacts> = None;
    let mut signal = None;
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while let (Some(namesz), Some(descsz), Some(kind)) = (
        u32_at(notes, at),
        u32_at(notes, at + 4),
        u32_at(notes, at + 8),
    ) {
        let Some(desc_at) = align4(namesz as usize).and_then(|n| n.checked_add(at + 12)) else {
            break;
        };
        let Some(next) = align4(descsz as usize).and_then(|n| n.checked_add(desc_at)) else {
            break;
        };
        let Some(desc) = notes.get(desc_at..desc_at + descsz as usize) else {
            break;
        };
        match kind {
            // Only the first: the thread that caused the dump.
            NT_PRSTATUS if facts.is_none() => facts = prstatus(desc),
            NT_SIGINFO if signal.is_none() => {
                signal = match (u32_at(desc, 0), u32_at(desc, 8), u64_at(desc, 16)) {
                    (Some(signo), Some(code), Some(addr)) => Some(SignalInfo {
                        signo: signo as i32,
                        code: code as i32,
                        addr,
                    }),
                    _ => None,
                }
            }
            _ => {}
        }
        if facts.is_some() && signal.is_some() {
            break;
        }
        at = next;
    }
    let mut facts = facts.ok_or(CoreError::NoRegisters)?;
    facts.signal = signal;
    Ok(facts)
}

/// The registers and thread id of one `struct elf_prstatus`.
fn prstatus(desc: &[u8]) -> Option<CoreFacts> {
    let tid = u32_at(desc, 32)?;
    let reg = |i: usize| u64_at(desc, PR_REG_OFFSET + 8 * i);
    if desc.len() < PR_REG_OFFSET + 8 * PR_REG_COUNT {
        return None;
    }
    // user_regs_struct order: r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi
    // orig_rax rip cs eflags rsp ss fs_base gs_base ds es fs gs.
    let (r15, r14, r13, r12, rbp, rbx) = (reg(0)?, reg(1)?, reg(2)?, reg(3)?, reg(4)?, reg(5)?);
    let (r11, r10, r9, r8, rax, rcx) = (reg(6)?, reg(7)?, reg(8)?, reg(9)?, reg(10)?, reg(11)?);
    let (rdx, rsi, rdi, rip, rsp) = (reg(12)?, reg(13)?, reg(14)?, reg(16)?, reg(19)?);
    Some(CoreFacts {
        registers: [
            rax, rdx, rcx, rbx, rsi, rdi, rbp, rsp, r8, r9, r10, r11, r12, r13, r14, r15, rip,
        ],
        tid,
        signal: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(5u32.to_le_bytes());
        out.extend((desc.len() as u32).to_le_bytes());
        out.extend(kind.to_le_bytes());
        out.extend(b"CORE\0\0\0\0");
        out.extend(desc);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn prstatus_desc(tid: u32, regs: [u64; 27]) -> Vec<u8> {
        let mut desc = vec![0u8; 336];
        desc[32..36].copy_from_slice(&tid.to_le_bytes());
        for (i, r) in regs.iter().enumerate() {
            desc[112 + 8 * i..120 + 8 * i].copy_from_slice(&r.to_le_bytes());
        }
        desc
    }

    #[test]
    fn the_first_prstatus_gives_the_crashing_threads_registers_in_dwarf_order() {
        let mut regs = [0u64; 27];
        for (i, r) in regs.iter_mut().enumerate() {
            *r = 0x1000 + i as u64;
        }
        let mut siginfo = vec![0u8; 128];
        siginfo[0..4].copy_from_slice(&11u32.to_le_bytes());
        siginfo[8..12].copy_from_slice(&1u32.to_le_bytes());
        siginfo[16..24].copy_from_slice(&0x100u64.to_le_bytes());
        let mut notes = note(NT_PRSTATUS, &prstatus_desc(42, regs));
        notes.extend(note(NT_SIGINFO, &siginfo));
        notes.extend(note(NT_PRSTATUS, &prstatus_desc(43, [7; 27])));
        let facts = parse_notes(&notes).unwrap();
        assert_eq!(facts.tid, 42);
        // user_regs_struct index: rip 16, rsp 19, rbp 4, rax 10, r15 0.
        assert_eq!(facts.registers[RIP], 0x1000 + 16);
        assert_eq!(facts.registers[RSP], 0x1000 + 19);
        assert_eq!(facts.registers[6], 0x1000 + 4);
        assert_eq!(facts.registers[0], 0x1000 + 10);
        assert_eq!(facts.registers[15], 0x1000);
        assert_eq!(
            facts.signal,
            Some(SignalInfo {
                signo: 11,
                code: 1,
                addr: 0x100
            })
        );
    }

    #[test]
    fn hostile_notes_give_errors_not_panics() {
        assert_eq!(parse_notes(&[]), Err(CoreError::NoRegisters));
        // A note whose sizes overflow, and one cut off half-way.
        let mut bad = Vec::new();
        bad.extend(u32::MAX.to_le_bytes());
        bad.extend(u32::MAX.to_le_bytes());
        bad.extend(NT_PRSTATUS.to_le_bytes());
        assert_eq!(parse_notes(&bad), Err(CoreError::NoRegisters));
        let cut = note(NT_PRSTATUS, &prstatus_desc(1, [1; 27]));
        assert_eq!(parse_notes(&cut[..100]), Err(CoreError::NoRegisters));
        // A prstatus too short for its registers.
        assert_eq!(
            parse_notes(&note(NT_PRSTATUS, &[0; 64])),
            Err(CoreError::NoRegisters)
        );
        assert!(matches!(
            notes_range(b"\x7fELF"),
            Err(CoreError::NotACore(_))
        ));
        assert!(matches!(notes_range(b"MZ"), Err(CoreError::NotACore(_))));
    }
}
