//! Walking a crashed thread's stack with the call frame information (CFI) of its modules
//! (`.eh_frame`, found through `.eh_frame_hdr`'s sorted table when there is one), as a
//! debugger does: it needs no frame pointers, so `-fomit-frame-pointer` code unwinds, and it
//! crosses shared libraries. Pure logic over two traits: where code is, and what memory holds.

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, LittleEndian, Register, RegisterRule,
    UnwindContext, UnwindSection,
};

use std::rc::Rc;

use super::core_notes::{RIP, RSP, Registers};

/// The most frames unwound: deeper stacks are cut (a runaway recursion).
pub const MAX_FRAMES: usize = 64;

/// One module's call frame information, as its file lays it out.
#[derive(Debug, Clone)]
pub struct Cfi {
    /// The bytes of `.eh_frame`.
    pub eh_frame: Vec<u8>,
    /// Its link-time address.
    pub eh_frame_address: u64,
    /// The bytes and link-time address of `.eh_frame_hdr`, when present.
    pub eh_frame_hdr: Option<(Vec<u8>, u64)>,
    /// The link-time address of `.text` (a base for `DW_EH_PE_textrel`).
    pub text_address: u64,
    /// The link-time address of `.got` (a base for `DW_EH_PE_datarel`).
    pub got_address: u64,
}

/// A module mapped in the process: its CFI, and how its link-time addresses map to runtime.
pub struct MappedCfi {
    /// The module's CFI.
    pub cfi: Rc<Cfi>,
    /// What to add to a link-time address to get the runtime address (the load bias).
    pub bias: u64,
}

/// The process's modules, found by runtime address.
pub trait Modules {
    /// The CFI of the module whose code holds runtime address `pc`.
    fn cfi_at(&self, pc: u64) -> Option<MappedCfi>;
}

/// The crashed process's memory.
pub trait Memory {
    /// The 8 bytes at `address`, if readable.
    fn read_u64(&self, address: u64) -> Option<u64>;
}

/// Why the walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkEnd {
    /// The outermost frame: its return address is undefined (`_start`, a thread's start).
    Outermost,
    /// A return address outside any module with CFI (or zero).
    NoModule,
    /// The module has no CFI for the address.
    NoUnwindInfo,
    /// A rule this unwinder does not evaluate (a DWARF expression), or memory it could not read.
    Unreadable,
    /// The stack pointer did not move up: a corrupt stack would loop.
    NotProgressing,
    /// [`MAX_FRAMES`] frames.
    TooDeep,
}

/// The runtime program counters of the stack, innermost first: the faulting instruction,
/// then each return address. And why the walk stopped.
pub fn walk(
    registers: &Registers,
    modules: &impl Modules,
    memory: &impl Memory,
) -> (Vec<u64>, WalkEnd) {
    let mut regs: [Option<u64>; 17] = registers.map(Some);
    let mut pcs = vec![registers[RIP]];
    let mut context = UnwindContext::new();
    loop {
        if pcs.len() >= MAX_FRAMES {
            return (pcs, WalkEnd::TooDeep);
        }
        let pc = *pcs.last().expect("one pc at least");
        // A return address is after the call: look up the call itself.
        let lookup = if pcs.len() == 1 {
            pc
        } else {
            pc.wrapping_sub(1)
        };
        let Some(mapped) = modules.cfi_at(lookup) else {
            return (pcs, WalkEnd::NoModule);
        };
        let next = match step(&mut context, &mapped, lookup, &regs, memory) {
            Ok(next) => next,
            Err(end) => return (pcs, end),
        };
        let (Some(new_sp), old_sp) = (next[RSP], regs[RSP]) else {
            return (pcs, WalkEnd::Unreadable);
        };
        if old_sp.is_some_and(|old| new_sp <= old) && pcs.len() > 1 {
            return (pcs, WalkEnd::NotProgressing);
        }
        match next[RIP] {
            None => return (pcs, WalkEnd::Outermost),
            Some(0) => return (pcs, WalkEnd::NoModule),
            Some(ra) => pcs.push(ra),
        }
        regs = next;
    }
}

/// The caller's registers, from the row of `lookup`'s FDE.
fn step(
    context: &mut UnwindContext<usize>,
    mapped: &MappedCfi,
    lookup: u64,
    regs: &[Option<u64>; 17],
    memory: &impl Memory,
) -> Result<[Option<u64>; 17], WalkEnd> {
    let cfi = &*mapped.cfi;
    let address = lookup.wrapping_sub(mapped.bias);
    let mut bases = BaseAddresses::default()
        .set_eh_frame(cfi.eh_frame_address)
        .set_text(cfi.text_address)
        .set_got(cfi.got_address);
    let eh_frame = EhFrame::new(&cfi.eh_frame, LittleEndian);
    let row = match &cfi.eh_frame_hdr {
        Some((hdr, hdr_address)) => {
            bases = bases.set_eh_frame_hdr(*hdr_address);
            let parsed = EhFrameHdr::new(hdr, LittleEndian)
                .parse(&bases, 8)
                .map_err(|_| WalkEnd::NoUnwindInfo)?;
            match parsed.table() {
                Some(table) => table.unwind_info_for_address(
                    &eh_frame,
                    &bases,
                    context,
                    address,
                    EhFrame::cie_from_offset,
                ),
                None => eh_frame.unwind_info_for_address(
                    &bases,
                    context,
                    address,
                    EhFrame::cie_from_offset,
                ),
            }
        }
        None => {
            eh_frame.unwind_info_for_address(&bases, context, address, EhFrame::cie_from_offset)
        }
    }
    .map_err(|_| WalkEnd::NoUnwindInfo)?;
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => regs
            .get(usize::from(register.0))
            .copied()
            .flatten()
            .ok_or(WalkEnd::Unreadable)?
            .wrapping_add_signed(*offset),
        CfaRule::Expression(_) => return Err(WalkEnd::Unreadable),
    };
    let mut next = [None; 17];
    for (number, slot) in next.iter_mut().enumerate() {
        let rule = row
            .register(Register(number as u16))
            .unwrap_or(RegisterRule::Undefined);
        *slot = match rule {
            RegisterRule::Undefined if number == RIP => None,
            // Callee-saved registers without a rule keep their value (the x86-64 ABI's
            // default); the others are unknown, which only matters if a rule uses them.
            RegisterRule::Undefined | RegisterRule::SameValue => regs[number],
            RegisterRule::Offset(n) => Some(
                memory
                    .read_u64(cfa.wrapping_add_signed(n))
                    .ok_or(WalkEnd::Unreadable)?,
            ),
            RegisterRule::ValOffset(n) => Some(cfa.wrapping_add_signed(n)),
            RegisterRule::Register(other) => regs.get(usize::from(other.0)).copied().flatten(),
            RegisterRule::Constant(value) => Some(value),
            _ => return Err(WalkEnd::Unreadable),
        };
    }
    // The caller's stack pointer is the CFA, by definition of x86-64's CFA.
    next[RSP] = Some(cfa);
    // A return-address rule the FDE leaves undefined ends the walk (`_start`); an FDE
    // without any rule for it is malformed for x86-64, whose CIEs always give one.
    if row.register(Register(RIP as u16)).is_none() {
        next[RIP] = None;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// `.eh_frame` for one function at 0x1000..0x1100 of the common -O2 shape: after its
    /// `push rbx` (1 byte) the CFA is rsp+16 and rbx is saved at CFA-16; the return address
    /// is at CFA-8. Written byte by byte from the DWARF CFI format, not by our code.
    fn eh_frame() -> Vec<u8> {
        let mut cie = vec![
            0, 0, 0, 0, // CIE id
            1, // version
            b'z', b'R', 0,    // augmentation
            1,    // code alignment
            0x78, // data alignment -8 (sleb)
            16,   // return address register: rip
            1,    // augmentation data length
            0x1b, // FDE pointer encoding: pcrel | sdata4
            0x0c, 7, 8, // DW_CFA_def_cfa rsp+8
            0x90, 1, // DW_CFA_offset rip at cfa-8
        ];
        while (cie.len() + 4) % 8 != 0 {
            cie.push(0); // DW_CFA_nop
        }
        let mut out = (cie.len() as u32).to_le_bytes().to_vec();
        out.extend(&cie);
        let fde_start = out.len();
        let mut fde = Vec::new();
        fde.extend(((fde_start + 4) as u32).to_le_bytes()); // CIE pointer
        // pc_begin pcrel: the field sits at eh_frame_address + fde_start + 8.
        let field = 0x2000u64 + fde_start as u64 + 8;
        fde.extend(((0x1000i64 - field as i64) as i32).to_le_bytes());
        fde.extend(0x100u32.to_le_bytes()); // pc_range
        fde.push(0); // augmentation data length
        fde.extend([0x41, 0x0e, 16, 0x83, 2]); // advance 1; def_cfa_offset 16; rbx at cfa-16
        while (fde.len() + 4) % 8 != 0 {
            fde.push(0);
        }
        out.extend((fde.len() as u32).to_le_bytes());
        out.extend(fde);
        out.extend(0u32.to_le_bytes()); // terminator
        out
    }

    struct One(Rc<Cfi>, u64);
    impl Modules for One {
        fn cfi_at(&self, pc: u64) -> Option<MappedCfi> {
            (0x1000..0x1100)
                .contains(&pc.wrapping_sub(self.1))
                .then(|| MappedCfi {
                    cfi: self.0.clone(),
                    bias: self.1,
                })
        }
    }

    struct Stack(HashMap<u64, u64>);
    impl Memory for Stack {
        fn read_u64(&self, address: u64) -> Option<u64> {
            self.0.get(&address).copied()
        }
    }

    #[test]
    fn a_frame_without_frame_pointer_unwinds_by_its_cfi_and_restores_saved_registers() {
        let bias = 0x5555_0000_0000;
        let cfi = Cfi {
            eh_frame: eh_frame(),
            eh_frame_address: 0x2000,
            eh_frame_hdr: None,
            text_address: 0x1000,
            got_address: 0,
        };
        let modules = One(Rc::new(cfi), bias);
        // Crashed at 0x1010 (after the push), rsp = 0x7000: rbx saved at 0x7000, the
        // return address into the same function (a recursion) at 0x7008; the outer frame
        // returns into an address outside any module.
        let mut regs = [0u64; 17];
        regs[RIP] = bias + 0x1010;
        regs[RSP] = 0x7000;
        regs[3] = 0xdead;
        let stack = Stack(HashMap::from([
            (0x7000, 0xbeef),
            (0x7008, bias + 0x1050),
            (0x7010, 0xcafe),
            (0x7018, 0x42),
        ]));
        let (pcs, end) = walk(&regs, &modules, &stack);
        assert_eq!(pcs, vec![bias + 0x1010, bias + 0x1050, 0x42]);
        assert_eq!(end, WalkEnd::NoModule);
    }

    #[test]
    fn unreadable_stack_memory_ends_the_walk_with_the_frames_so_far() {
        let bias = 0x1_0000;
        let modules = One(
            Rc::new(Cfi {
                eh_frame: eh_frame(),
                eh_frame_address: 0x2000,
                eh_frame_hdr: None,
                text_address: 0x1000,
                got_address: 0,
            }),
            bias,
        );
        let mut regs = [0u64; 17];
        regs[RIP] = bias + 0x1020;
        regs[RSP] = 0x9000;
        let (pcs, end) = walk(&regs, &modules, &Stack(HashMap::new()));
        assert_eq!(pcs, vec![bias + 0x1020]);
        assert_eq!(end, WalkEnd::Unreadable);
    }
}
