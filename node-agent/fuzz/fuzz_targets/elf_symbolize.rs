//! ELF and DWARF loading and symbolization on mutated binaries, in memory: parse the file,
//! load its DWARF and symbol tables, and symbolize addresses in every loadable segment,
//! with the variable and type facts the member analysis reads.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use node_agent::symbolize::dwarf::DebugInfo;
use node_agent::symbolize::elf::ElfFile;
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
            let _ = UnitFacts::at(&debug, vaddr);
        }
    }
});
