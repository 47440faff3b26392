//! Decoding the faulting instruction from the kernel's `Code:` bytes (pure, x86-64).
//!
//! The kernel prints 64 bytes around `ip`: 42 before it, the byte at `ip` in `<…>`, and 21
//! after. Decoding from the marked byte gives the faulting instruction without any binary.

use iced_x86::{
    Decoder, DecoderOptions, Formatter, Instruction, InstructionInfoFactory, IntelFormatter,
    MemorySize, OpAccess, Register, UsedMemory,
};
use thiserror::Error;

/// The bytes of a `Code:` record and where the faulting instruction starts in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeBytes {
    /// Every byte printed.
    pub bytes: Vec<u8>,
    /// The index of the byte at `ip` (the one printed in `<…>`).
    pub fault_index: usize,
}

/// Why a `Code:` record could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodeError {
    /// A word is not a two-digit hex byte.
    #[error("Code: word {0:?} is not a hex byte")]
    BadByte(String),
    /// No byte is marked as the one at `ip`.
    #[error("Code: has no <marked> byte at ip")]
    NoMarker,
}

/// Parses `ff e8 … <48> 8b 87 …` (the `(…)` marker of some architectures is accepted too).
pub fn parse_code(code: &str) -> Result<CodeBytes, CodeError> {
    let mut bytes = Vec::with_capacity(64);
    let mut fault_index = None;
    for word in code.split_whitespace() {
        let (digits, marked) = match word.strip_prefix('<').and_then(|w| w.strip_suffix('>')) {
            Some(inner) => (inner, true),
            None => match word.strip_prefix('(').and_then(|w| w.strip_suffix(')')) {
                Some(inner) => (inner, true),
                None => (word, false),
            },
        };
        if digits.len() != 2 {
            return Err(CodeError::BadByte(word.to_owned()));
        }
        let byte =
            u8::from_str_radix(digits, 16).map_err(|_| CodeError::BadByte(word.to_owned()))?;
        if marked {
            fault_index = Some(bytes.len());
        }
        bytes.push(byte);
    }
    Ok(CodeBytes {
        fault_index: fault_index.ok_or(CodeError::NoMarker)?,
        bytes,
    })
}

/// How the faulting instruction touched memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryAccess {
    /// The base register, for example `rdi` (None for absolute addresses).
    pub base: Option<String>,
    /// The index register and its scale, if any.
    pub index: Option<(String, u32)>,
    /// The displacement added to base and index.
    pub displacement: i64,
    /// Whether the access writes (else it reads).
    pub write: bool,
    /// The access size in bytes, when known.
    pub size: Option<usize>,
}

/// The faulting instruction, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultingInstruction {
    /// Intel syntax, for example `mov rax,[rdi+0x100]`.
    pub text: String,
    /// The instruction's length in bytes.
    pub length: usize,
    /// The memory operand it accessed, if exactly one.
    pub memory: Option<MemoryAccess>,
}

/// Decodes the instruction at the marked byte, as if it were at address `ip`.
pub fn decode_faulting_instruction(code: &CodeBytes, ip: u64) -> Option<FaultingInstruction> {
    decode_at(code.bytes.get(code.fault_index..)?, ip)
}

/// Decodes the instruction that starts `bytes`, as if it were at address `ip`.
pub fn decode_at(bytes: &[u8], ip: u64) -> Option<FaultingInstruction> {
    let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() {
        return None;
    }
    let mut formatter = IntelFormatter::new();
    formatter.options_mut().set_hex_prefix("0x");
    formatter.options_mut().set_hex_suffix("");
    formatter.options_mut().set_uppercase_hex(false);
    formatter
        .options_mut()
        .set_space_after_operand_separator(true);
    let mut text = String::new();
    formatter.format(&instruction, &mut text);
    Some(FaultingInstruction {
        text,
        length: instruction.len(),
        memory: memory_access(&instruction),
    })
}

/// The one memory operand `instruction` accesses, leaving out the stack slot of a push,
/// pop, call or return. None when it accesses none, or several (`movs`: no single culprit).
pub fn single_memory_operand(instruction: &Instruction) -> Option<UsedMemory> {
    let mut factory = InstructionInfoFactory::new();
    let info = factory.info(instruction);
    let mut used = info
        .used_memory()
        .iter()
        .filter(|m| m.base() != Register::RSP || m.displacement() != 0);
    let memory = *used.next()?;
    used.next().is_none().then_some(memory)
}

/// Whether an operand access writes (possibly also reading, possibly conditionally).
pub fn is_write(access: OpAccess) -> bool {
    matches!(
        access,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}

fn memory_access(instruction: &Instruction) -> Option<MemoryAccess> {
    let memory = single_memory_operand(instruction)?;
    let register = |r: Register| (r != Register::None).then(|| format!("{r:?}").to_lowercase());
    let write = is_write(memory.access());
    let size = match memory.memory_size() {
        MemorySize::Unknown => None,
        other => Some(other.size()),
    };
    Some(MemoryAccess {
        base: register(memory.base()),
        index: register(memory.index()).map(|r| (r, memory.scale())),
        displacement: memory.displacement() as i64,
        write,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Code: records copied from real crashes in the kernel fault lab.
    const NULL_READ: &str = "ff e8 64 ff ff ff c6 05 f5 2b 00 00 01 5d c3 0f 1f 00 c3 0f 1f 80 00 00 00 00 f3 0f 1e fa e9 77 ff ff ff 0f 1f 80 00 00 00 00 <48> 8b 87 00 01 00 00 c3 0f 1f 84 00 00 00 00 00 53 48 89 fb e8 d7";
    /// An access through `rdi`.
    fn rdi(displacement: i64, write: bool, size: Option<usize>) -> MemoryAccess {
        MemoryAccess {
            base: Some("rdi".into()),
            index: None,
            displacement,
            write,
            size,
        }
    }

    const RO_WRITE: &str = "ff ff e8 23 fb ff ff 48 8d 3d e9 0a 00 00 89 c6 31 c0 e8 53 fb ff ff 48 8b 3d 6c 2b 00 00 e8 87 fb ff ff 48 89 df 5b eb b1 90 <c6> 07 52 c3 66 66 2e 0f 1f 84 00 00 00 00 00 90 ff e7 66 66 2e 0f";

    #[test]
    fn decodes_the_null_read() {
        let code = parse_code(NULL_READ).unwrap();
        assert_eq!((code.bytes.len(), code.fault_index), (64, 42));
        let insn = decode_faulting_instruction(&code, 0x564b_c141_94f0).unwrap();
        // objdump -D -b binary -mi386:x86-64 on these bytes: "mov 0x100(%rdi),%rax".
        assert_eq!(insn.text, "mov rax, [rdi+0x100]");
        assert_eq!(insn.length, 7);
        assert_eq!(insn.memory, Some(rdi(0x100, false, Some(8))));
    }

    #[test]
    fn decodes_the_read_only_write() {
        let insn =
            decode_faulting_instruction(&parse_code(RO_WRITE).unwrap(), 0x55f3_8132_6540).unwrap();
        assert_eq!(insn.text, "mov byte ptr [rdi], 0x52");
        assert_eq!(insn.memory, Some(rdi(0, true, Some(1))));
    }

    #[test]
    fn bad_code_records_are_errors() {
        assert_eq!(parse_code("48 8b 87"), Err(CodeError::NoMarker));
        assert_eq!(
            parse_code("48 <zz>"),
            Err(CodeError::BadByte("<zz>".into()))
        );
        assert_eq!(
            parse_code("480 <8b>"),
            Err(CodeError::BadByte("480".into()))
        );
        // A marker at the very end: nothing to decode, but no panic.
        assert!(decode_faulting_instruction(&parse_code("90 <0f>").unwrap(), 0).is_none());
    }
}
