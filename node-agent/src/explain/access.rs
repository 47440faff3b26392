//! Which struct member was accessed through which pointer (pure, x86-64).
//!
//! The faulting instruction names a base register and a displacement. What that register
//! held comes from two sources, tried in order at each step:
//!
//! 1. a variable that DWARF places in the register at that address (`bs` in `rdi`);
//! 2. otherwise the instruction that last wrote the register, found by decoding the
//!    function from its start. A load `mov rax, [rdi+0x38]` means the register held the
//!    member at offset 0x38 of what `rdi` pointed to, so the question repeats for `rdi`
//!    at the load. A register copy is followed; the value of a direct call is named by
//!    its callee.
//!
//! The chain of answers spells the pointer (`bs->drv`), and the pointer's DWARF type names
//! the member at the displacement (`bdrv_co_flush`). When control can enter between the
//! writer and the user (a branch target lies between them), the writer is not trusted
//! and the chain stops there: the analysis says what it knows and no more.

use crds::{Address, PointerAccess};
use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpKind,
    Register,
};

use super::disasm::{is_write, single_memory_operand};

/// How many loads deep a pointer expression is traced (`a->b->c->d`).
const MAX_CHAIN: usize = 4;

/// What the analysis needs to know from debug information.
pub trait DebugFacts {
    /// A handle on a type.
    type Type: Copy;
    /// The variable DWARF places in `dwarf_register` at `pc`, with its type when known.
    fn variable_in_register(&self, pc: u64, dwarf_register: u16) -> Option<Typed<Self::Type>>;
    /// The type a pointer (or reference) type points to.
    fn pointee(&self, pointer: Self::Type) -> Option<Self::Type>;
    /// The member of struct or union `aggregate` at exactly `offset` (a path such as
    /// `stats.writes` for nested structs), with its type.
    fn member_at(&self, aggregate: Self::Type, offset: u64) -> Option<Typed<Self::Type>>;
    /// The name of the function at `address`.
    fn function_name(&self, address: u64) -> Option<String>;
}

/// A name (of a variable, a member or an expression) and its type when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Typed<T> {
    /// The name.
    pub name: String,
    /// Its type.
    pub ty: Option<T>,
}

/// The x86-64 DWARF register number of a 64-bit general-purpose register.
pub fn dwarf_register(register: Register) -> Option<u16> {
    const ORDER: [Register; 16] = [
        Register::RAX,
        Register::RDX,
        Register::RCX,
        Register::RBX,
        Register::RSI,
        Register::RDI,
        Register::RBP,
        Register::RSP,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ];
    ORDER.iter().position(|r| *r == register).map(|i| i as u16)
}

/// Registers a call may change (System V AMD64).
fn call_clobbers(register: Register) -> bool {
    matches!(
        register,
        Register::RAX
            | Register::RCX
            | Register::RDX
            | Register::RSI
            | Register::RDI
            | Register::R8
            | Register::R9
            | Register::R10
            | Register::R11
    )
}

/// Traces the memory access of the instruction at `fault_pc` in the function whose bytes
/// start at `function_start`. None when the instruction has no single base-register
/// memory operand or cannot be found by decoding from the function's start.
pub fn trace_access<F: DebugFacts>(
    facts: &F,
    function: &[u8],
    function_start: u64,
    fault_pc: u64,
) -> Option<PointerAccess> {
    let code = FunctionCode::decode(function, function_start);
    let fault = code.index_of(fault_pc)?;
    let operand = memory_operand(&code.instructions[fault])?;
    let pointer = code.describe(facts, operand.base, fault, 0);
    let member = pointer
        .as_ref()
        .and_then(|p| p.ty)
        .and_then(|ty| facts.pointee(ty))
        .zip(u64::try_from(operand.displacement).ok())
        .and_then(|(aggregate, offset)| facts.member_at(aggregate, offset))
        .map(|m| m.name);
    Some(PointerAccess {
        pointer: pointer.map(|p| p.name),
        member,
        offset: Address(operand.displacement as u64),
        write: operand.write,
    })
}

/// A function's instructions, decoded from its start, and where branches land.
struct FunctionCode {
    instructions: Vec<Instruction>,
    branch_targets: Vec<u64>,
}

impl FunctionCode {
    fn decode(bytes: &[u8], start: u64) -> FunctionCode {
        let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
        let mut instructions = Vec::new();
        let mut branch_targets = Vec::new();
        while decoder.can_decode() {
            let instruction = decoder.decode();
            if instruction.is_invalid() {
                break;
            }
            if matches!(
                instruction.flow_control(),
                FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch
            ) && instruction.op0_kind() == OpKind::NearBranch64
            {
                branch_targets.push(instruction.near_branch_target());
            }
            instructions.push(instruction);
        }
        FunctionCode {
            instructions,
            branch_targets,
        }
    }

    fn index_of(&self, pc: u64) -> Option<usize> {
        self.instructions
            .binary_search_by_key(&pc, Instruction::ip)
            .ok()
    }

    /// What `register` held when instruction `user` ran.
    fn describe<F: DebugFacts>(
        &self,
        facts: &F,
        register: Register,
        user: usize,
        depth: usize,
    ) -> Option<Typed<F::Type>> {
        if depth > MAX_CHAIN {
            return None;
        }
        let pc = self.instructions[user].ip();
        if let Some(variable) = facts.variable_in_register(pc, dwarf_register(register)?) {
            return Some(variable);
        }
        let writer = (0..user)
            .rev()
            .find(|&i| writes(&self.instructions[i], register))?;
        let writer_pc = self.instructions[writer].ip();
        if self
            .branch_targets
            .iter()
            .any(|&t| writer_pc < t && t <= pc)
        {
            return None; // another path may reach the user without this writer
        }
        let instruction = &self.instructions[writer];
        if instruction.flow_control() == FlowControl::Call {
            if register != Register::RAX || instruction.op0_kind() != OpKind::NearBranch64 {
                return None;
            }
            let callee = facts.function_name(instruction.near_branch_target())?;
            return Some(Typed {
                name: format!("{callee}()"),
                ty: None,
            });
        }
        if instruction.mnemonic() != Mnemonic::Mov
            || instruction.op0_kind() != OpKind::Register
            || instruction.op0_register() != register
        {
            return None;
        }
        match instruction.op1_kind() {
            OpKind::Register if instruction.op1_register().full_register() == register => None,
            OpKind::Register if instruction.op1_register().size() == 8 => {
                self.describe(facts, instruction.op1_register(), writer, depth + 1)
            }
            OpKind::Memory => {
                let load = memory_operand(instruction)?;
                let offset = u64::try_from(load.displacement).ok()?;
                let base = self.describe(facts, load.base, writer, depth + 1)?;
                let aggregate = facts.pointee(base.ty?)?;
                let member = facts.member_at(aggregate, offset)?;
                Some(Typed {
                    name: format!("{}->{}", base.name, member.name),
                    ty: member.ty,
                })
            }
            _ => None,
        }
    }
}

/// Whether `instruction` changes any part of 64-bit `register`.
fn writes(instruction: &Instruction, register: Register) -> bool {
    if instruction.flow_control() == FlowControl::Call && call_clobbers(register) {
        return true;
    }
    let mut factory = InstructionInfoFactory::new();
    factory
        .info(instruction)
        .used_registers()
        .iter()
        .any(|used| used.register().full_register() == register && is_write(used.access()))
}

/// A `[base + displacement]` memory operand.
struct MemoryOperand {
    base: Register,
    displacement: i64,
    write: bool,
}

/// The instruction's single memory operand, if it is `[base + displacement]` with a
/// general-purpose 64-bit base and no index.
fn memory_operand(instruction: &Instruction) -> Option<MemoryOperand> {
    let memory = single_memory_operand(instruction)?;
    if memory.index() != Register::None || dwarf_register(memory.base()).is_none() {
        return None;
    }
    Some(MemoryOperand {
        base: memory.base(),
        displacement: memory.displacement() as i64,
        write: is_write(memory.access()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Types of the test program `tests/programs/nullmember.c`, as numbers.
    const BLOCK_DRIVER_STATE: u32 = 1;
    const BLOCK_DRIVER_STATE_PTR: u32 = 2;
    const BLOCK_DRIVER: u32 = 3;
    const BLOCK_DRIVER_PTR: u32 = 4;
    const FLUSH_FN: u32 = 5;
    const JOB_PTR: u32 = 6;
    const JOB: u32 = 7;

    /// The facts DWARF gives for that program, written down from its source.
    struct Program {
        /// (pc range, DWARF register, variable, type)
        variables: Vec<(std::ops::Range<u64>, u16, &'static str, u32)>,
    }

    impl DebugFacts for Program {
        type Type = u32;
        fn variable_in_register(&self, pc: u64, register: u16) -> Option<Typed<u32>> {
            self.variables
                .iter()
                .find(|(range, r, _, _)| range.contains(&pc) && *r == register)
                .map(|(_, _, name, ty)| Typed {
                    name: (*name).to_owned(),
                    ty: Some(*ty),
                })
        }
        fn pointee(&self, pointer: u32) -> Option<u32> {
            match pointer {
                BLOCK_DRIVER_STATE_PTR => Some(BLOCK_DRIVER_STATE),
                BLOCK_DRIVER_PTR => Some(BLOCK_DRIVER),
                JOB_PTR => Some(JOB),
                _ => None,
            }
        }
        fn member_at(&self, aggregate: u32, offset: u64) -> Option<Typed<u32>> {
            let (name, ty) = match (aggregate, offset) {
                (BLOCK_DRIVER_STATE, 0x38) => ("drv", Some(BLOCK_DRIVER_PTR)),
                (BLOCK_DRIVER_STATE, 0x48) => ("stats.writes", None),
                (BLOCK_DRIVER, 0x260) => ("bdrv_co_flush", Some(FLUSH_FN)),
                (JOB, 0x8) => ("bs", Some(BLOCK_DRIVER_STATE_PTR)),
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

    // gcc 12 -O2 -fomit-frame-pointer of bdrv_co_flush() at 0x12b0:
    //   test byte ptr [rdi], 0x40 ; jne 0x12c0 ; mov rax, [rdi+0x38] ;
    //   jmp qword ptr [rax+0x260] ; nop ; xor eax, eax ; ret
    const BDRV_CO_FLUSH: &[u8] = &[
        0xf6, 0x07, 0x40, 0x75, 0x0b, 0x48, 0x8b, 0x47, 0x38, 0xff, 0xa0, 0x60, 0x02, 0x00, 0x00,
        0x90, 0x31, 0xc0, 0xc3,
    ];

    fn program() -> Program {
        Program {
            variables: vec![
                (0x12b0..0x12be, 5, "bs", BLOCK_DRIVER_STATE_PTR),
                (0x12e0..0x12e4, 5, "job", JOB_PTR),
            ],
        }
    }

    #[test]
    fn a_member_read_through_a_loaded_pointer() {
        let access = trace_access(&program(), BDRV_CO_FLUSH, 0x12b0, 0x12b9).unwrap();
        assert_eq!(access.pointer.as_deref(), Some("bs->drv"));
        assert_eq!(access.member.as_deref(), Some("bdrv_co_flush"));
        assert_eq!(access.offset, Address(0x260));
        assert!(!access.write);
    }

    #[test]
    fn a_nested_member_written_through_a_loaded_pointer() {
        // job_count_write() at 0x12e0: mov rax, [rdi+0x8] ; add qword ptr [rax+0x48], 1 ; ret
        let code = [0x48, 0x8b, 0x47, 0x08, 0x48, 0x83, 0x40, 0x48, 0x01, 0xc3];
        let access = trace_access(&program(), &code, 0x12e0, 0x12e4).unwrap();
        assert_eq!(access.pointer.as_deref(), Some("job->bs"));
        assert_eq!(access.member.as_deref(), Some("stats.writes"));
        assert!(access.write);
    }

    #[test]
    fn a_branch_target_between_writer_and_user_stops_the_trace() {
        // mov rax, [rdi+0x38] ; test esi, esi ; je +3 (to the jmp) ; mov rax, rdx ;
        // jmp qword ptr [rax+0x260]: rax may come from either path.
        let code = [
            0x48, 0x8b, 0x47, 0x38, 0x85, 0xf6, 0x74, 0x03, 0x48, 0x89, 0xd0, 0xff, 0xa0, 0x60,
            0x02, 0x00, 0x00,
        ];
        let facts = Program {
            variables: vec![(0x2000..0x2011, 5, "bs", BLOCK_DRIVER_STATE_PTR)],
        };
        let access = trace_access(&facts, &code, 0x2000, 0x200b).unwrap();
        assert_eq!(access.pointer, None);
        assert_eq!(access.member, None);
        assert_eq!(access.offset, Address(0x260));
    }

    #[test]
    fn the_value_returned_by_a_call() {
        // call 0x1000 ; mov rax, [rax+0x8] at 0x3000
        let code = [0xe8, 0xfb, 0xdf, 0xff, 0xff, 0x48, 0x8b, 0x40, 0x08];
        let access = trace_access(&program(), &code, 0x3000, 0x3005).unwrap();
        assert_eq!(access.pointer.as_deref(), Some("lookup()"));
        assert_eq!(access.member, None, "the callee's return type is not known");
    }

    #[test]
    fn an_address_that_is_not_an_instruction_start_gives_nothing() {
        assert_eq!(
            trace_access(&program(), BDRV_CO_FLUSH, 0x12b0, 0x12ba),
            None
        );
        assert_eq!(trace_access(&program(), &[], 0x12b0, 0x12b0), None);
        // xor eax, eax touches no memory
        assert_eq!(
            trace_access(&program(), BDRV_CO_FLUSH, 0x12b0, 0x12c0),
            None
        );
    }
}
