//! Decoding the faulting instruction of an arm64 `Code:` record (pure).

use crds::CrashEvent;
use yaxpeax_arch::{Decoder, U8Reader};
use yaxpeax_arm::armv8::a64::InstDecoder;

/// Decodes the marked word of an arm64 event's `Code:` record, for example
/// `str x30, [sp, #-0x10]!` from `… d61f01e0 (f81f0ffe)`. None for other architectures.
pub fn faulting_instruction(event: &CrashEvent) -> Option<String> {
    if !is_arm64(event) {
        return None;
    }
    decode_word(marked_word(event.code.as_deref()?)?)
}

/// Decodes one A64 instruction word.
pub fn decode_word(word: u32) -> Option<String> {
    let bytes = word.to_le_bytes();
    let mut reader = U8Reader::new(&bytes);
    let instruction = InstDecoder::default().decode(&mut reader).ok()?;
    Some(instruction.to_string())
}

/// The value of general-purpose register `x{number}` in the register dump that follows an
/// arm64 user fault (`x29: 0000ffffd8ebd5a0 x28: …`, `x1 : 0000000000000000 x0 : …`).
pub fn dumped_register(event: &CrashEvent, number: u16) -> Option<u64> {
    let name = format!("x{number}");
    event.raw.iter().skip(1).find_map(|line| {
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            let value = match word.strip_suffix(':') {
                Some(register) if register == name => words.next(),
                // `x%-2d:` pads one-digit numbers: `x1 : …`.
                None if word == name => words.next().filter(|w| *w == ":").and(words.next()),
                _ => continue,
            };
            return value
                .filter(|v| v.len() == 16)
                .and_then(|v| u64::from_str_radix(v, 16).ok());
        }
        None
    })
}

/// The address a faulting A64 load or store accessed, from its base register's value in
/// the register dump and its offset, for a data abort whose report printed no address (the
/// `unhandled exception` form). None when the event is no arm64 data abort or the dump
/// lacks the register.
pub fn fault_address_from_registers(
    event: &CrashEvent,
    operand: &super::arm64_access::MemoryOperand,
) -> Option<crds::Address> {
    let data_abort = event.esr.is_some_and(|esr| (esr >> 26) & 0x3f == 0x24);
    if !data_abort || event.fault_address.is_some() {
        return None;
    }
    let base = dumped_register(event, operand.base)?;
    Some(crds::Address(base.wrapping_add_signed(operand.offset)))
}

/// The `(xxxxxxxx)` word of a `Code:` record made of 8-digit words only.
fn marked_word(code: &str) -> Option<u32> {
    let mut marked = None;
    for word in code.split_whitespace() {
        let (digits, is_marked) = match word.strip_prefix('(').and_then(|w| w.strip_suffix(')')) {
            Some(inner) => (inner, true),
            None => (word, false),
        };
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        if is_marked {
            if marked.is_some() {
                return None;
            }
            marked = Some(u32::from_str_radix(digits, 16).ok()?);
        }
    }
    marked
}

/// Whether the event is arm64's: it carries an ESR, or its first line is the arm64
/// `undefined instruction: pc=` line with a 64-bit (16-digit) pc (arm32 prints 8 digits).
fn is_arm64(event: &CrashEvent) -> bool {
    if event.esr.is_some() {
        return true;
    }
    let Some(line) = event.raw.first() else {
        return false;
    };
    let Some((_, after)) = line.split_once("undefined instruction: pc=") else {
        return false;
    };
    let digits = after.trim_end();
    digits.len() == 16 && digits.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::EventKind;

    fn event(raw: &str, code: &str) -> CrashEvent {
        let mut event = CrashEvent::new(EventKind::InvalidOpcode);
        event.raw = vec![raw.to_owned()];
        event.code = Some(code.to_owned());
        event
    }

    // https://github.com/balena-os/meta-balena/issues/1182 (aarch64): 0xf81f0ffe is
    // STR (immediate, pre-index), size 64, imm9 = -16, Rn = sp, Rt = x30.
    #[test]
    fn decodes_the_marked_word_of_an_arm64_undefined_instruction() {
        let e = event(
            "os-config[959]: undefined instruction: pc=00000000003ed2e4",
            "aa1e03e2 b90013e3 910043e3 d61f01e0 (f81f0ffe)",
        );
        assert_eq!(
            faulting_instruction(&e).as_deref(),
            Some("str x30, [sp, #-0x10]!")
        );
    }

    #[test]
    fn the_explanation_names_the_decoded_instruction() {
        let mut e = event(
            "os-config[959]: undefined instruction: pc=00000000003ed2e4",
            "aa1e03e2 b90013e3 910043e3 d61f01e0 (f81f0ffe)",
        );
        e.comm = Some("os-config".into());
        e.pid = Some(959);
        let text = crate::explain::explanation(&e);
        assert!(
            text.contains("in os-config (pid 959) at `str x30, [sp, #-0x10]!`"),
            "{text}"
        );
    }

    /// A 6.x arm64 user fault report with its register dump, in the kernel's layout
    /// (`x%-2d: %016llx`, three registers a line).
    fn dumped_fault(esr: &str) -> CrashEvent {
        let mut e = CrashEvent::new(EventKind::Segfault);
        e.esr = u64::from_str_radix(esr, 16).ok();
        e.raw = vec![
            format!(
                "qemu-nbd[77]: unhandled exception: DABT (lower EL), ESR 0x{esr}, level 0 translation fault in qemu-nbd[5500000000+2000]"
            ),
            "pc : 0000005500000dec".into(),
            "x29: 0000005502821690 x28: 0000000000000000 x27: 0000005500011d78".into(),
            "[  12.000001] x2 : 0000000000000002 x1 : 0000000000000000 x0 : 0000005500012010"
                .into(),
        ];
        e
    }

    #[test]
    fn registers_are_read_from_the_dump() {
        let e = dumped_fault("0000000092000004");
        assert_eq!(dumped_register(&e, 29), Some(0x55_0282_1690));
        assert_eq!(dumped_register(&e, 1), Some(0));
        assert_eq!(dumped_register(&e, 0), Some(0x55_0001_2010));
        assert_eq!(dumped_register(&e, 2), Some(2));
        // x3 is not in this dump; x2's digits are not read as x20's.
        assert_eq!(dumped_register(&e, 3), None);
        assert_eq!(dumped_register(&e, 20), None);
    }

    #[test]
    fn the_fault_address_of_a_data_abort_is_base_plus_offset() {
        use crate::explain::arm64_access::MemoryOperand;
        let operand = MemoryOperand {
            base: 1,
            offset: 0x260,
            write: false,
        };
        let e = dumped_fault("0000000092000004");
        assert_eq!(
            fault_address_from_registers(&e, &operand),
            Some(crds::Address(0x260))
        );
        // An instruction abort (class 0x20) is no load: nothing is derived.
        let fetch = dumped_fault("0000000082000004");
        assert_eq!(fault_address_from_registers(&fetch, &operand), None);
        // An address the kernel printed is never replaced.
        let mut printed = dumped_fault("0000000092000004");
        printed.fault_address = Some(crds::Address(0x1000));
        assert_eq!(fault_address_from_registers(&printed, &operand), None);
    }

    #[test]
    fn decodes_branch_with_link_to_register() {
        // 0xd63f0020: BLR x1 (opc 0b0001 of the unconditional branch (register) class, Rn = 1).
        assert_eq!(decode_word(0xd63f0020).as_deref(), Some("blr x1"));
    }

    #[test]
    fn no_decoding_for_arm32_x86_or_unmarked_code() {
        // An arm32 pc has 8 digits: the words are A32, not A64.
        let arm32 = event(
            "a.out[77]: undefined instruction: pc=00010434",
            "e52db004 e28db000 (e7f001f0)",
        );
        assert_eq!(faulting_instruction(&arm32), None);
        // x86 byte code, even on an event that looks like arm64.
        let bytes = event(
            "os-config[959]: undefined instruction: pc=00000000003ed2e4",
            "48 8b 87 <0f> 0b",
        );
        assert_eq!(faulting_instruction(&bytes), None);
        let unmarked = event(
            "os-config[959]: undefined instruction: pc=00000000003ed2e4",
            "aa1e03e2 b90013e3 910043e3 d61f01e0 f81f0ffe",
        );
        assert_eq!(faulting_instruction(&unmarked), None);
    }
}
