//! Which struct member was accessed through which pointer, for AArch64 code (pure).
//!
//! The same analysis as [`super::access`] for x86-64, on A64 instructions: the faulting load
//! or store names a base register and an immediate offset (`ldr x1, [x1, #0x260]`). What
//! the base register held comes from a variable DWARF places in it at that address, or else
//! from the instruction that last wrote it, found by decoding the function from its start:
//! a 64-bit load `ldr x1, [x0, #0x38]` (a member of what `x0` pointed to), a register copy
//! `mov x1, x0`, or the value a direct call `bl f` left in `x0`. A branch target between the
//! writer and the user stops the trace, as on x86.

use crds::{Address, PointerAccess};
use yaxpeax_arch::{Decoder, U8Reader};
use yaxpeax_arm::armv8::a64::{InstDecoder, Instruction, Opcode, Operand, ShiftStyle, SizeCode};

use super::access::{DebugFacts, Typed};

/// How many loads deep a pointer expression is traced (`a->b->c->d`).
const MAX_CHAIN: usize = 4;

/// The stack pointer's number in a base-register operand (and its DWARF number).
const SP: u16 = 31;

/// A `[xN, #imm]` memory operand of a load or store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryOperand {
    /// The base register's number, `x0`…`x30` (also its DWARF register number).
    pub base: u16,
    /// The offset from the base register's value to the address accessed.
    pub offset: i64,
    /// Whether the instruction stores (else it loads).
    pub write: bool,
}

/// A decoded A64 instruction at an address.
#[derive(Debug, Clone)]
struct Decoded {
    pc: u64,
    instruction: Instruction,
}

/// Decodes one A64 instruction from its 4 little-endian bytes.
pub fn decode(bytes: &[u8]) -> Option<Instruction> {
    let mut reader = U8Reader::new(bytes.get(..4)?);
    InstDecoder::default().decode(&mut reader).ok()
}

/// The memory operand of a general-purpose load or store with a base register and an
/// immediate offset; None for other instructions, register offsets, and `sp` as the base.
pub fn memory_operand(instruction: &Instruction) -> Option<MemoryOperand> {
    let write = is_store(instruction.opcode);
    if !write && !is_load(instruction.opcode) {
        return None;
    }
    instruction
        .operands
        .iter()
        .find_map(|operand| match *operand {
            // `[x1, #0x10]` and `[x1, #0x10]!` access base + offset…
            Operand::RegPreIndex(base, offset, _) => Some((base, i64::from(offset))),
            // …`[x1], #0x10` accesses base, then adds the offset.
            Operand::RegPostIndex(base, _) => Some((base, 0)),
            _ => None,
        })
        .filter(|(base, _)| *base != SP)
        .map(|(base, offset)| MemoryOperand {
            base,
            offset,
            write,
        })
}

fn is_load(opcode: Opcode) -> bool {
    use Opcode::*;
    matches!(
        opcode,
        LDR | LDRB
            | LDRH
            | LDRSB
            | LDRSH
            | LDRSW
            | LDUR
            | LDURB
            | LDURH
            | LDURSB
            | LDURSH
            | LDURSW
            | LDP
            | LDPSW
            | LDAR
            | LDARB
            | LDARH
            | LDAXR
            | LDAXRB
            | LDAXRH
            | LDAXP
            | LDXR
            | LDXRB
            | LDXRH
            | LDXP
            | LDTR
            | LDTRB
            | LDTRH
            | LDTRSB
            | LDTRSH
            | LDTRSW
            | LDLAR
            | LDLARB
            | LDLARH
    )
}

fn is_store(opcode: Opcode) -> bool {
    use Opcode::*;
    matches!(
        opcode,
        STR | STRB
            | STRH
            | STRW
            | STUR
            | STURB
            | STURH
            | STP
            | STLR
            | STLRB
            | STLRH
            | STLLR
            | STLLRB
            | STLLRH
            | STLXR
            | STLXRB
            | STLXRH
            | STLXP
            | STXR
            | STXRB
            | STXRH
            | STXP
            | STTR
            | STTRB
            | STTRH
    )
}

/// The general-purpose registers (`x0`…`x30`) `instruction` may change. Conservative where
/// it is not modelled: every register operand counts as written.
fn written_registers(instruction: &Instruction) -> Vec<u16> {
    use Opcode::*;
    let register = |operand: &Operand| match *operand {
        Operand::Register(_, n) | Operand::RegisterOrSP(_, n) if n < 31 => Some(n),
        _ => None,
    };
    let mut written: Vec<u16> = match instruction.opcode {
        // A call: the AAPCS64 caller-saved registers and the link register.
        BL | BLR => (0..=18).chain([30]).collect(),
        SVC => vec![0],
        // Branches, compares into xzr, barriers and hints write no general register.
        B | BR | RET | Bcc(_) | CBZ | CBNZ | TBZ | TBNZ | CCMP | CCMN | HINT | DMB(_) | DSB(_)
        | ISB | BRK | UDF | CLREX => Vec::new(),
        // Stores write no register, except the exclusive ones' status register (operand 0).
        STLXR | STLXRB | STLXRH | STLXP | STXR | STXRB | STXRH | STXP => {
            register(&instruction.operands[0]).into_iter().collect()
        }
        op if is_store(op) => Vec::new(),
        // Pair loads write two registers.
        LDP | LDPSW | LDXP | LDAXP => instruction.operands[..2]
            .iter()
            .filter_map(register)
            .collect(),
        // Loads and the arithmetic, logical, move and bit-field operations write operand 0.
        op if is_load(op) => register(&instruction.operands[0]).into_iter().collect(),
        ADD | ADDS | SUB | SUBS | ADC | ADCS | SBC | SBCS | AND | ANDS | ORR | ORN | EOR | EON
        | BIC | BICS | MOVZ | MOVN | MOVK | ADR | ADRP | UBFM | SBFM | BFM | EXTR | CSEL
        | CSINC | CSINV | CSNEG | MADD | MSUB | SMADDL | SMSUBL | UMADDL | UMSUBL | SMULH
        | UMULH | UDIV | SDIV | LSLV | LSRV | ASRV | RORV | CLZ | CLS | RBIT | REV | REV16
        | REV32 | MRS => register(&instruction.operands[0]).into_iter().collect(),
        _ => instruction.operands.iter().filter_map(register).collect(),
    };
    // A load or store with writeback also changes its base register.
    for operand in &instruction.operands {
        match *operand {
            Operand::RegPreIndex(base, _, true)
            | Operand::RegPostIndex(base, _)
            | Operand::RegPostIndexReg(base, _)
                if base < 31 =>
            {
                written.push(base)
            }
            _ => {}
        }
    }
    written
}

/// Where a branch goes, for direct branches within the function.
fn branch_target(decoded: &Decoded) -> Option<u64> {
    use Opcode::*;
    let instruction = &decoded.instruction;
    if !matches!(instruction.opcode, B | Bcc(_) | CBZ | CBNZ | TBZ | TBNZ) {
        return None;
    }
    instruction
        .operands
        .iter()
        .find_map(|operand| match *operand {
            Operand::PCOffset(offset) => Some(decoded.pc.wrapping_add_signed(offset)),
            _ => None,
        })
}

/// The source register of a 64-bit register copy `mov xD, xS` (`orr xD, xzr, xS`).
fn copied_from(instruction: &Instruction) -> Option<u16> {
    if instruction.opcode != Opcode::ORR {
        return None;
    }
    match instruction.operands {
        [
            Operand::Register(SizeCode::X, _),
            Operand::Register(SizeCode::X, 31),
            Operand::RegShift(ShiftStyle::LSL, 0, SizeCode::X, source),
            _,
        ]
        | [
            Operand::Register(SizeCode::X, _),
            Operand::Register(SizeCode::X, 31),
            Operand::Register(SizeCode::X, source),
            _,
        ] if source < 31 => Some(source),
        _ => None,
    }
}

/// Whether `instruction` is a 64-bit load of register `register` (not a pair, not signed).
fn loads_pointer_into(instruction: &Instruction, register: u16) -> bool {
    matches!(instruction.opcode, Opcode::LDR | Opcode::LDUR)
        && instruction.operands[0] == Operand::Register(SizeCode::X, register)
}

/// A function's instructions, decoded from its start, and where its branches land.
struct FunctionCode {
    instructions: Vec<Decoded>,
    branch_targets: Vec<u64>,
}

impl FunctionCode {
    fn decode(bytes: &[u8], start: u64) -> FunctionCode {
        let mut instructions = Vec::with_capacity(bytes.len() / 4);
        for (i, word) in bytes.chunks_exact(4).enumerate() {
            // Data in code (a literal pool) decodes as nothing: it is skipped, not an end.
            if let Some(instruction) = decode(word) {
                instructions.push(Decoded {
                    pc: start + 4 * i as u64,
                    instruction,
                });
            }
        }
        let branch_targets = instructions.iter().filter_map(branch_target).collect();
        FunctionCode {
            instructions,
            branch_targets,
        }
    }

    fn index_of(&self, pc: u64) -> Option<usize> {
        self.instructions.binary_search_by_key(&pc, |d| d.pc).ok()
    }

    /// What `register` held when instruction `user` ran.
    fn describe<F: DebugFacts>(
        &self,
        facts: &F,
        register: u16,
        user: usize,
        depth: usize,
    ) -> Option<Typed<F::Type>> {
        if depth > MAX_CHAIN {
            return None;
        }
        let pc = self.instructions[user].pc;
        if let Some(variable) = facts.variable_in_register(pc, register) {
            return Some(variable);
        }
        let writer = (0..user)
            .rev()
            .find(|&i| written_registers(&self.instructions[i].instruction).contains(&register))?;
        let writer_pc = self.instructions[writer].pc;
        if self
            .branch_targets
            .iter()
            .any(|&t| writer_pc < t && t <= pc)
        {
            return None; // another path may reach the user without this writer
        }
        let decoded = &self.instructions[writer];
        let instruction = &decoded.instruction;
        if instruction.opcode == Opcode::BL {
            if register != 0 {
                return None;
            }
            let Operand::PCOffset(offset) = instruction.operands[0] else {
                return None;
            };
            let callee = facts.function_name(decoded.pc.wrapping_add_signed(offset))?;
            return Some(Typed {
                name: format!("{callee}()"),
                ty: None,
            });
        }
        if let Some(source) = copied_from(instruction) {
            return self.describe(facts, source, writer, depth + 1);
        }
        if !loads_pointer_into(instruction, register) {
            return None;
        }
        let load = memory_operand(instruction)?;
        let offset = u64::try_from(load.offset).ok()?;
        let base = self.describe(facts, load.base, writer, depth + 1)?;
        let aggregate = facts.pointee(base.ty?)?;
        let member = facts.member_at(aggregate, offset)?;
        Some(Typed {
            name: format!("{}->{}", base.name, member.name),
            ty: member.ty,
        })
    }
}

/// Traces the memory access of the A64 instruction at `fault_pc` in the function whose
/// bytes start at `function_start`. None when the instruction is no load or store through
/// a base register with an immediate offset, or is not an instruction of the function.
pub fn trace_access<F: DebugFacts>(
    facts: &F,
    function: &[u8],
    function_start: u64,
    fault_pc: u64,
) -> Option<PointerAccess> {
    let code = FunctionCode::decode(function, function_start);
    let fault = code.index_of(fault_pc)?;
    let operand = memory_operand(&code.instructions[fault].instruction)?;
    let pointer = code.describe(facts, operand.base, fault, 0);
    let member = pointer
        .as_ref()
        .and_then(|p| p.ty)
        .and_then(|ty| facts.pointee(ty))
        .zip(u64::try_from(operand.offset).ok())
        .and_then(|(aggregate, offset)| facts.member_at(aggregate, offset))
        .map(|m| m.name);
    Some(PointerAccess {
        pointer: pointer.map(|p| p.name),
        member,
        offset: Address(operand.offset as u64),
        write: operand.write,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Types of `tests/programs/nullmember.c`, as numbers.
    const BLOCK_DRIVER_STATE: u32 = 1;
    const BLOCK_DRIVER_STATE_PTR: u32 = 2;
    const BLOCK_DRIVER: u32 = 3;
    const BLOCK_DRIVER_PTR: u32 = 4;
    const FLUSH_FN: u32 = 5;

    /// The facts DWARF gives for that program, written down from its source: `bs` is in
    /// x0 on entry to bdrv_co_flush() at 0xb20.
    struct Program;

    impl DebugFacts for Program {
        type Type = u32;
        fn variable_in_register(&self, pc: u64, register: u16) -> Option<Typed<u32>> {
            ((0xb20..0xb30).contains(&pc) && register == 0).then(|| Typed {
                name: "bs".to_owned(),
                ty: Some(BLOCK_DRIVER_STATE_PTR),
            })
        }
        fn pointee(&self, pointer: u32) -> Option<u32> {
            match pointer {
                BLOCK_DRIVER_STATE_PTR => Some(BLOCK_DRIVER_STATE),
                BLOCK_DRIVER_PTR => Some(BLOCK_DRIVER),
                _ => None,
            }
        }
        fn member_at(&self, aggregate: u32, offset: u64) -> Option<Typed<u32>> {
            let (name, ty) = match (aggregate, offset) {
                (BLOCK_DRIVER_STATE, 0x38) => ("drv", Some(BLOCK_DRIVER_PTR)),
                (BLOCK_DRIVER, 0x260) => ("bdrv_co_flush", Some(FLUSH_FN)),
                _ => return None,
            };
            Some(Typed {
                name: name.to_owned(),
                ty,
            })
        }
        fn function_name(&self, address: u64) -> Option<String> {
            (address == 0x1000).then(|| "lookup".to_owned())
        }
    }

    fn words(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    // aarch64-linux-gnu-gcc 12 -O2 -fomit-frame-pointer of bdrv_co_flush() at 0xb20, as
    // llvm-objdump prints it: ldr w2, [x0] ; tbnz w2, #6, 0xb38 ; ldr x1, [x0, #56] ;
    // ldr x1, [x1, #608] ; mov x16, x1 ; br x16 ; mov w0, #0 ; ret
    const BDRV_CO_FLUSH: [u32; 8] = [
        0xb940_0002,
        0x3730_00a2,
        0xf940_1c01,
        0xf941_3021,
        0xaa01_03f0,
        0xd61f_0200,
        0x5280_0000,
        0xd65f_03c0,
    ];

    #[test]
    fn decodes_the_loads_operands() {
        let load = decode(&words(&[BDRV_CO_FLUSH[3]])).unwrap();
        assert_eq!(load.to_string(), "ldr x1, [x1, #0x260]");
        assert_eq!(
            memory_operand(&load),
            Some(MemoryOperand {
                base: 1,
                offset: 0x260,
                write: false
            })
        );
        // str x30, [sp, #-0x10]!: through sp, never a NULL member.
        assert_eq!(
            memory_operand(&decode(&words(&[0xf81f_0ffe])).unwrap()),
            None
        );
        // mov x16, x1 is a copy of x1.
        assert_eq!(
            copied_from(&decode(&words(&[BDRV_CO_FLUSH[4]])).unwrap()),
            Some(1)
        );
    }

    #[test]
    fn a_member_read_through_a_loaded_pointer() {
        let access = trace_access(&Program, &words(&BDRV_CO_FLUSH), 0xb20, 0xb2c).unwrap();
        assert_eq!(access.pointer.as_deref(), Some("bs->drv"));
        assert_eq!(access.member.as_deref(), Some("bdrv_co_flush"));
        assert_eq!(access.offset, Address(0x260));
        assert!(!access.write);
    }

    #[test]
    fn a_store_through_a_variable() {
        // str x2, [x0, #0x38] at 0xb20: a write of bs->drv.
        let access = trace_access(&Program, &words(&[0xf900_1c02]), 0xb20, 0xb20).unwrap();
        assert_eq!(access.pointer.as_deref(), Some("bs"));
        assert_eq!(access.member.as_deref(), Some("drv"));
        assert!(access.write);
    }

    #[test]
    fn the_value_returned_by_a_call() {
        // bl 0x1000 (from 0x3000) ; ldr x0, [x0, #8]
        let code = words(&[0x97ff_f800, 0xf940_0400]);
        let access = trace_access(&Program, &code, 0x3000, 0x3004).unwrap();
        assert_eq!(access.pointer.as_deref(), Some("lookup()"));
        assert_eq!(access.member, None, "the callee's return type is not known");
    }

    #[test]
    fn a_branch_target_between_writer_and_user_stops_the_trace() {
        // At 0x2000: ldr x1, [x0, #56] ; cbz x2, 0x200c ; mov x1, x3 ; ldr x1, [x1, #608]:
        // x1 may come from either path.
        let code = words(&[0xf940_1c01, 0xb400_0042, 0xaa03_03e1, 0xf941_3021]);
        let access = trace_access(&Program, &code, 0x2000, 0x200c).unwrap();
        assert_eq!((access.pointer, access.member), (None, None));
        assert_eq!(access.offset, Address(0x260));
    }

    #[test]
    fn no_access_where_no_load_or_store_is() {
        let code = words(&BDRV_CO_FLUSH);
        // mov w0, #0 touches no memory; 0xb2e is no instruction start.
        assert_eq!(trace_access(&Program, &code, 0xb20, 0xb38), None);
        assert_eq!(trace_access(&Program, &code, 0xb20, 0xb2e), None);
        assert_eq!(trace_access(&Program, &[], 0xb20, 0xb20), None);
    }
}
