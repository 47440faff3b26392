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
