//! ELF and DWARF loading and symbolization on mutated binaries, in memory: parse the file,
//! load its DWARF and symbol tables, symbolize addresses in every loadable segment, and run
//! the NULL-member analysis there: the whole analysis from the function's code, and each
//! query it makes of the DWARF (the variable in every register, what its type points to,
//! the member at a spread of offsets, nested).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use node_agent::explain::access::{DebugFacts, Typed};
use node_agent::symbolize::dwarf::DebugInfo;
use node_agent::symbolize::elf::ElfFile;
use node_agent::symbolize::trace_access;
use node_agent::symbolize::variables::UnitFacts;

fuzz_target!(|data: &[u8]| {
    let Ok(elf) = ElfFile::parse(Path::new("fuzzed"), data.into()) else {
        return;
    };
    let Ok(debug) = DebugInfo::load(&elf, None) else {
        return;
    };
    for segment in elf.segments.iter().take(8) {
        for step in [0, 1, 0x10, 0x40, 0x100] {
            let vaddr = segment.vaddr.wrapping_add(step);
            let _ = debug.frames(vaddr);
            let _ = debug.symbol(vaddr);
            let _ = trace_access(&elf, &debug, vaddr);
            let Some((facts, range)) = UnitFacts::at(&debug, vaddr) else {
                continue;
            };
            let _ = facts.function_name(range.start);
            for register in 0..17 {
                let Some(Typed { ty: Some(ty), .. }) = facts.variable_in_register(vaddr, register)
                else {
                    continue;
                };
                let Some(pointee) = facts.pointee(ty) else {
                    continue;
                };
                for offset in [0, 1, 8, 0x10, 0x100, 0x268] {
                    if let Some(Typed { ty: Some(member), .. }) = facts.member_at(pointee, offset)
                        && let Some(inner) = facts.pointee(member)
                    {
                        let _ = facts.member_at(inner, 0);
                    }
                }
            }
        }
    }
});
