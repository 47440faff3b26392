//! Decoding fault error codes into named bits (pure).

/// Names the bits of an x86 page-fault error code (`arch/x86/include/asm/trap_pf.h`).
///
/// The result always says who faulted (`user`/`kernel`), the access (`read`, `write` or
/// `instruction-fetch`) and why (`not-present` or `protection-violation`), then any extra bits.
pub fn x86_page_fault_bits(code: u64) -> Vec<String> {
    let bit = |n: u32| code & (1 << n) != 0;
    let mut bits = Vec::with_capacity(3);
    bits.extend(
        [
            if bit(2) { "user" } else { "kernel" },
            if bit(4) {
                "instruction-fetch"
            } else if bit(1) {
                "write"
            } else {
                "read"
            },
            if bit(0) {
                "protection-violation"
            } else {
                "not-present"
            },
        ]
        .map(str::to_owned),
    );
    if bit(3) {
        bits.push("reserved-bit".to_owned());
    }
    if bit(5) {
        bits.push("protection-key".to_owned());
    }
    if bit(6) {
        bits.push("shadow-stack".to_owned());
    }
    if bit(15) {
        bits.push("sgx".to_owned());
    }
    bits
}

/// Names an arm64 ESR of a lower-EL data or instruction abort in the same vocabulary as
/// [`x86_page_fault_bits`]; other exception classes give only `user` and the class.
pub fn arm64_esr_bits(esr: u64) -> Vec<String> {
    let class = (esr >> 26) & 0x3f;
    let fault_status = esr & 0x3f;
    let access = match class {
        0x20 => "instruction-fetch",
        0x24 if esr & (1 << 6) != 0 => "write",
        0x24 => "read",
        0x00 => return vec!["user".into(), "unknown-instruction".into()],
        0x3c => return vec!["user".into(), "breakpoint".into()],
        _ => return vec!["user".into(), format!("exception-class-{class:#x}")],
    };
    let cause = match fault_status {
        0x04..=0x07 => "not-present",
        0x08..=0x0b => "access-flag",
        0x0c..=0x0f => "protection-violation",
        0x21 => "alignment",
        _ => "other-abort",
    };
    vec!["user".into(), access.into(), cause.into()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_codes_seen_on_real_kernels() {
        // Meanings from the Intel SDM, vol. 3A, "Page-Fault Error Code".
        assert_eq!(x86_page_fault_bits(0x4), ["user", "read", "not-present"]);
        assert_eq!(x86_page_fault_bits(0x6), ["user", "write", "not-present"]);
        assert_eq!(
            x86_page_fault_bits(0x7),
            ["user", "write", "protection-violation"]
        );
        assert_eq!(
            x86_page_fault_bits(0x14),
            ["user", "instruction-fetch", "not-present"]
        );
        assert_eq!(
            x86_page_fault_bits(0x15),
            ["user", "instruction-fetch", "protection-violation"]
        );
        assert_eq!(x86_page_fault_bits(0x0), ["kernel", "read", "not-present"]);
        assert_eq!(
            x86_page_fault_bits(0x2f),
            [
                "user",
                "write",
                "protection-violation",
                "reserved-bit",
                "protection-key"
            ]
        );
    }

    #[test]
    fn arm64_aborts() {
        // EC 0x24 = data abort from a lower EL, WnR = bit 6, DFSC 0b0001LL = translation fault.
        assert_eq!(arm64_esr_bits(0x9200_0005), ["user", "read", "not-present"]);
        assert_eq!(
            arm64_esr_bits(0x9200_0046),
            ["user", "write", "not-present"]
        );
        assert_eq!(
            arm64_esr_bits(0x9200_004f),
            ["user", "write", "protection-violation"]
        );
        assert_eq!(
            arm64_esr_bits(0x8200_0007),
            ["user", "instruction-fetch", "not-present"]
        );
        assert_eq!(arm64_esr_bits(0x0200_0000), ["user", "unknown-instruction"]);
    }
}
