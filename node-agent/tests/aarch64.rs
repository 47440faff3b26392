//! The NULL-member analysis on AArch64: a stripped `-O2` aarch64 build of the member test
//! program crashes for real under qemu-user, and `crashwatch-agent explain` must name the
//! NULL pointer and its member from the separate debug file.
//!
//! No arm64 kernel runs here, so no kernel prints the report. The program's own SIGSEGV
//! handler (tests/programs/fault_report.c) prints the facts of the fault as qemu delivered
//! it: the fault address, pc, sp, x0…x30, and the mapping of pc from /proc/self/maps. The
//! test writes them in the arm64 kernel's report layouts (`unhandled exception` of 5.x on,
//! with the register dump; `unhandled level N translation fault … at ADDR` before). qemu
//! gives no ESR, so the ESR is composed by the test from the faulting instruction that
//! binutils' objdump reads from the binary: a data abort, level 0 translation fault, with
//! WnR set for a store.

mod support;

use std::path::Path;
use std::process::Command;

use support::{install_by_build_id, require, run};

const TOOLS: [&str; 4] = [
    "aarch64-linux-gnu-gcc",
    "aarch64-linux-gnu-objcopy",
    "aarch64-linux-gnu-objdump",
    "qemu-aarch64",
];

/// Where Debian's libc6-arm64-cross puts the aarch64 dynamic loader and libc.
const SYSROOT: &str = "/usr/aarch64-linux-gnu";

/// What the program printed about its fault.
struct Fault {
    pid: u32,
    /// The compiler's offsetof of the member, as the program printed it.
    offset: String,
    address: u64,
    pc: u64,
    sp: u64,
    registers: Vec<u64>,
    vma_start: u64,
    vma_end: u64,
}

fn hex(text: &str) -> u64 {
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// Runs the aarch64 program under qemu-user until its fault kills it.
fn crash(binary: &Path, mode: &str) -> Fault {
    let dir = binary.parent().unwrap();
    let output = Command::new("sh")
        // No core file from qemu in the test's directory.
        .args([
            "-c",
            "ulimit -c 0; exec \"$@\"",
            "sh",
            "qemu-aarch64",
            "-L",
            SYSROOT,
        ])
        .arg(binary)
        .arg(mode)
        .current_dir(dir)
        .output()
        .expect("qemu-aarch64");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.code().is_none_or(|c| c != 0),
        "{mode} did not crash: {stdout}"
    );
    let value = |key: &str| {
        support::printed(&stdout, key).unwrap_or_else(|| panic!("{mode}: no {key} in {stdout}"))
    };
    let vma = value("fault.vma");
    let (start, end) = vma
        .split_whitespace()
        .next()
        .unwrap()
        .split_once('-')
        .unwrap();
    Fault {
        pid: value("pid").parse().unwrap(),
        offset: value("offset").to_owned(),
        address: hex(value("fault.addr")),
        pc: hex(value("fault.pc")),
        sp: hex(value("fault.sp")),
        registers: (0..31)
            .map(|i| hex(value(&format!("fault.x{i}"))))
            .collect(),
        vma_start: hex(start),
        vma_end: hex(end),
    }
}

/// The mnemonic binutils' objdump reads at link-time address `vaddr` of `binary`.
fn mnemonic_at(binary: &Path, vaddr: u64) -> String {
    let listing = run(
        "aarch64-linux-gnu-objdump",
        &[
            "-d",
            &format!("--start-address={vaddr:#x}"),
            &format!("--stop-address={:#x}", vaddr + 4),
            binary.to_str().unwrap(),
        ],
    );
    let line = listing
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{vaddr:x}:")))
        .unwrap_or_else(|| panic!("no instruction at {vaddr:#x}:\n{listing}"));
    line.split('\t').nth(2).unwrap().trim().to_owned()
}

/// The register dump lines of `__show_regs`: `x%-2d: %016llx`, `per_line` registers a line
/// from x29 down (three a line since 4.16, two before).
fn register_dump(registers: &[u64], per_line: usize) -> Vec<String> {
    let names: Vec<usize> = (0..30).rev().collect();
    names
        .chunks(per_line)
        .map(|chunk| {
            chunk
                .iter()
                .map(|&i| format!("{:<3}: {:016x}", format!("x{i}"), registers[i]))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// The report of an arm64 kernel since 5.x: no fault address, a register dump.
fn report_since_5_x(fault: &Fault, esr: u64) -> String {
    let mut lines = vec![
        format!(
            "qemu-nbd[{}]: unhandled exception: DABT (lower EL), ESR 0x{esr:016x}, level 0 translation fault in qemu-nbd[{:x}+{:x}]",
            fault.pid,
            fault.vma_start,
            fault.vma_end - fault.vma_start
        ),
        format!(
            "CPU: 1 PID: {} Comm: qemu-nbd Not tainted 6.1.0-28-arm64 #1  Debian 6.1.119-1",
            fault.pid
        ),
        "Hardware name: QEMU KVM Virtual Machine, BIOS 0.0.0 02/06/2015".to_owned(),
        "pstate: 80001000 (Nzcv daif -PAN -UAO -TCO -DIT +SSBS BTYPE=--)".to_owned(),
        format!("pc : {:016x}", fault.pc),
        format!("lr : {:016x}", fault.registers[30]),
        format!("sp : {:016x}", fault.sp),
    ];
    lines.extend(register_dump(&fault.registers, 3));
    lines.join("\n") + "\n"
}

/// The report of a 4.x arm64 kernel (before the `unhandled exception` form): the fault address on the first line.
fn report_of_4_x(fault: &Fault, esr: u64) -> String {
    let mut lines = vec![
        format!(
            "qemu-nbd[{}]: unhandled level 0 translation fault (11) at 0x{:08x}, esr 0x{esr:08x}, in qemu-nbd[{:x}+{:x}]",
            fault.pid,
            fault.address,
            fault.vma_start,
            fault.vma_end - fault.vma_start
        ),
        format!(
            "CPU: 1 PID: {} Comm: qemu-nbd Not tainted 4.14.0 #1",
            fault.pid
        ),
        format!(
            "pc : [<{:016x}>] lr : [<{:016x}>] pstate: 80000000",
            fault.pc, fault.registers[30]
        ),
        format!("sp : {:016x}", fault.sp),
    ];
    lines.extend(register_dump(&fault.registers, 2));
    lines.join("\n") + "\n"
}

/// llvm-symbolizer's innermost function and line for `vaddr` of `debug_file`.
fn oracle(debug_file: &Path, vaddr: u64) -> (String, u64) {
    let output = run(
        "llvm-symbolizer",
        &[
            "--output-style=JSON",
            "--obj",
            debug_file.to_str().unwrap(),
            &format!("{vaddr:#x}"),
        ],
    );
    let json: serde_json::Value = serde_json::from_str(output.trim()).unwrap();
    let frame = &json[0]["Symbol"][0];
    (
        frame["FunctionName"].as_str().unwrap().to_owned(),
        frame["Line"].as_u64().unwrap(),
    )
}

#[test]
fn an_aarch64_o2_build_names_the_member_and_the_null_pointer() {
    if !require(
        "needs the aarch64 cross tools (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross), qemu-user and llvm-symbolizer",
        TOOLS.iter().all(|t| support::have(t))
            && support::have("llvm-symbolizer")
            && Path::new(SYSROOT).join("lib").is_dir(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let binary = bin.join("qemu-nbd");
    let programs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs");
    run(
        "aarch64-linux-gnu-gcc",
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-g",
            "-o",
            binary.to_str().unwrap(),
            programs.join("nullmember.c").to_str().unwrap(),
            programs.join("fault_report.c").to_str().unwrap(),
        ],
    );
    let debug_file = dir.path().join("qemu-nbd.debug");
    let b = binary.to_str().unwrap();
    run(
        "aarch64-linux-gnu-objcopy",
        &["--only-keep-debug", b, debug_file.to_str().unwrap()],
    );
    run("aarch64-linux-gnu-objcopy", &["--strip-all", b]);
    let debug_dir = dir.path().join("debug");
    let debug_file = install_by_build_id(&binary, &debug_file, &debug_dir);

    // (mode, function, pointer expression and member as in the source)
    let cases = [
        ("chain", "bdrv_co_flush", "bs->drv", "bdrv_co_flush"),
        ("direct", "bdrv_flushes", "bs", "stats.flushes"),
        ("nested", "job_count_write", "job->bs", "stats.writes"),
    ];
    let mut explained = 0;
    for (mode, function, pointer, member) in cases {
        let fault = crash(&binary, mode);
        // qemu delivered a fault at NULL + the member's offset, as the compiler laid it out.
        assert_eq!(format!("{:#x}", fault.address), fault.offset, "{mode}");
        // The kernel maps a PIE's text from file offset 0 (as /proc/self/maps said).
        let vaddr = fault.pc - fault.vma_start;
        let mnemonic = mnemonic_at(&binary, vaddr);
        // The function and line gcc's line table gives the load (`}` for bdrv_flushes).
        let (oracle_function, line) = oracle(&debug_file, vaddr);
        assert_eq!(oracle_function, function, "{mode}");
        let write = mnemonic.starts_with("st");
        assert!(
            write || mnemonic.starts_with("ld"),
            "{mode}: {mnemonic} is no load or store"
        );
        // DABT from a lower EL (EC 0x24), IL, WnR for a store, level 0 translation fault.
        let esr = (0x24 << 26) | (1 << 25) | if write { 1 << 6 } else { 0 } | 0x04;
        for (kernel, report) in [
            ("5.x+", report_since_5_x(&fault, esr)),
            ("4.x", report_of_4_x(&fault, esr)),
        ] {
            let output = support::output_with_stdin(
                Command::new(env!("CARGO_BIN_EXE_crashwatch-agent")).args([
                    "explain",
                    "--json",
                    "--search-path",
                    bin.to_str().unwrap(),
                    "--debug-dir",
                    debug_dir.to_str().unwrap(),
                    "-",
                ]),
                report.as_bytes(),
            );
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{mode} {kernel}: {stderr}");
            let events: Vec<serde_json::Value> = stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(
                events.len(),
                1,
                "{mode} {kernel}:\n{report}\n{stdout}{stderr}"
            );
            let event = &events[0];
            let context = format!("{mode} {kernel}:\n{report}\n{event:#}\n{stderr}");
            assert_eq!(event["kind"], "Segfault", "{context}");
            assert_eq!(event["faultAddress"], fault.offset, "{context}");
            let innermost = &event["frames"][0];
            assert_eq!(innermost["function"], function, "{context}");
            assert_eq!(innermost["line"], line, "{context}");
            let access = &event["access"];
            assert_eq!(access["pointer"], pointer, "{context}");
            assert_eq!(access["member"], member, "{context}");
            assert_eq!(access["offset"], fault.offset, "{context}");
            assert_eq!(access["write"], write, "{context}");
            let file = innermost["file"].as_str().unwrap();
            assert!(file.ends_with("nullmember.c"), "{context}");
            let verb = if write { "write" } else { "read" };
            let expected = format!(
                "NULL pointer dereference: {verb} of member `{member}` (offset {}) through `{pointer}`, which was NULL, in {function}() at {file}:{line}",
                fault.offset
            );
            let explanation = event["explanation"].as_str().unwrap();
            assert!(
                explanation.starts_with(&expected),
                "{context}\n  got      {explanation}\n  expected {expected}…"
            );
            assert!(
                explanation.contains(&format!("at `{mnemonic} ")),
                "the faulting instruction is named: {context}"
            );
            explained += 1;
        }
    }
    assert_eq!(explained, 6);
}
