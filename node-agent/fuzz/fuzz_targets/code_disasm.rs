//! The `Code:` line's bytes: parse the hex with its `<..>` marker, decode the faulting
//! instruction, and pick its memory operand, as `explain` does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_agent::explain::disasm::{decode_at, decode_faulting_instruction, parse_code};

fuzz_target!(|data: &[u8]| {
    let ip = data
        .get(..8)
        .map_or(0x401000, |b| u64::from_le_bytes(b.try_into().unwrap()));
    if let Ok(code) = parse_code(&String::from_utf8_lossy(data)) {
        let _ = decode_faulting_instruction(&code, ip);
    }
    let _ = decode_at(data, ip);
});
