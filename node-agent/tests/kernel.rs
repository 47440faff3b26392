//! The agent against the real kernel: crashes caused here, read back from `/dev/kmsg`.
//!
//! Needs root. Run serially (the kernel log and sysctls are shared); each test takes the
//! kernel lock and restores every sysctl it changes.

mod support;

use std::time::Duration;

use crds::{Address, CrashEvent, EventKind};
use support::{
    Agent, KernelTest, crash, crashy, start_at_the_end_of_the_log, symbol_range, write_kmsg,
};

const WAIT: Duration = Duration::from_secs(10);

fn by_id(id: u32) -> impl Fn(&CrashEvent) -> bool {
    move |e| e.pid == Some(id) && e.kind != EventKind::HungTask
}

fn offset_in(event: &CrashEvent, symbol: &str) {
    let (start, end) = symbol_range(crashy(), symbol);
    let offset = event.module_offset.expect("moduleOffset").0;
    // crashy is PIE: its text segment has p_offset == p_vaddr, so a file offset is an address.
    assert!(
        (start..end).contains(&offset),
        "offset {offset:#x} not in {symbol} [{start:#x}, {end:#x}): {event:?}"
    );
    let (vma_start, vma_size) = (event.vma_start.unwrap().0, event.vma_size.unwrap().0);
    let ip = event.ip.unwrap().0;
    assert!(
        (vma_start..vma_start + vma_size).contains(&ip),
        "ip outside its mapping: {event:?}"
    );
}

#[test]
fn every_kind_of_real_crash_yields_exactly_one_event() {
    let Some(test) = KernelTest::begin() else {
        return;
    };
    let state = &test.state;
    let binary = crashy().to_str().unwrap().to_owned();
    // Only the crashes below: the counts must be exact, not inflated by older records.
    start_at_the_end_of_the_log(state.path());
    let mut agent = Agent::start(state.path(), &["--binary", &binary]);

    let modes = [
        "null", "rodata", "execnull", "libc", "thread", "gpf", "div", "ud2", "int3",
    ];
    let crashes: Vec<_> = modes.iter().map(|m| (*m, crash(m))).collect();
    for (mode, crash) in &crashes {
        let e = agent.wait_for(&format!("for crashy {mode}"), WAIT, by_id(crash.logged_id));
        let comm = if *mode == "thread" {
            "worker-7"
        } else {
            "crashy"
        };
        assert_eq!(e.comm.as_deref(), Some(comm), "{mode}: {e:?}");
        assert!(e.ip.is_some() && e.sp.is_some(), "{mode}: {e:?}");
        assert!(e.explanation.is_some(), "{mode}: {e:?}");
        match *mode {
            "null" | "thread" => {
                assert_eq!(e.kind, EventKind::Segfault);
                assert_eq!(
                    e.fault_address,
                    Some(Address(0x100)),
                    "struct node puts next at 0x100"
                );
                assert_eq!(e.error_bits, ["user", "read", "not-present"]);
                assert_eq!(e.module.as_deref(), Some("crashy"));
                assert!(
                    e.code.as_deref().is_some_and(|c| c.contains('<')),
                    "{mode}: Code: record paired: {e:?}"
                );
                offset_in(&e, "read_null_offset");
                assert!(
                    e.explanation
                        .as_deref()
                        .unwrap()
                        .starts_with("NULL pointer dereference"),
                    "{e:?}"
                );
                // Symbolized in the daemon too: the function, and the Code: bytes checked.
                assert_eq!(
                    e.frames.first().and_then(|f| f.function.as_deref()),
                    Some("read_null_offset"),
                    "{e:?}"
                );
                assert_eq!(e.binary_matches, Some(true), "{e:?}");
                assert_eq!(
                    e.instruction.as_deref(),
                    Some("mov rax, [rdi+0x100]"),
                    "{e:?}"
                );
            }
            "rodata" => {
                assert_eq!(e.kind, EventKind::Segfault);
                // The kernel's offset is ip - vma_start + pgoff: that gives the mapping's file
                // offset, hence the load base of this PIE (file offset == address), hence the
                // link-time address of what was written to, which must be ro_msg.
                let (ip, vma_start) = (e.ip.unwrap().0, e.vma_start.unwrap().0);
                let mapping_file_offset = e.module_offset.unwrap().0 - (ip - vma_start);
                let load_base = vma_start - mapping_file_offset;
                let (ro_start, _) = symbol_range(crashy(), "ro_msg");
                assert_eq!(
                    e.fault_address,
                    Some(Address(load_base + ro_start)),
                    "the write hit ro_msg: {e:?}"
                );
                assert_eq!(e.error_bits, ["user", "write", "protection-violation"]);
                offset_in(&e, "write_ro");
            }
            "execnull" => {
                assert_eq!(e.kind, EventKind::Segfault);
                assert_eq!(
                    (e.ip, e.fault_address),
                    (Some(Address(0)), Some(Address(0)))
                );
                assert_eq!(e.error_bits, ["user", "instruction-fetch", "not-present"]);
                assert_eq!(e.module, None, "no file maps address 0");
                assert!(
                    e.explanation
                        .as_deref()
                        .unwrap()
                        .starts_with("Jump to NULL"),
                    "{e:?}"
                );
            }
            "libc" => {
                assert_eq!(e.kind, EventKind::Segfault);
                assert_eq!(e.fault_address, Some(Address(0)));
                assert_eq!(e.module.as_deref(), Some("libc.so.6"));
                assert!(e.module_offset.is_some());
            }
            "gpf" => {
                assert_eq!(e.kind, EventKind::GeneralProtection);
                assert_eq!(e.fault_address, None, "a #GP has no fault address");
                offset_in(&e, "gpf");
            }
            "div" => {
                assert_eq!(e.kind, EventKind::DivideError);
                offset_in(&e, "divide");
            }
            "ud2" => {
                assert_eq!(e.kind, EventKind::InvalidOpcode);
                offset_in(&e, "ud2");
            }
            "int3" => {
                assert_eq!(e.kind, EventKind::Breakpoint);
                offset_in(&e, "int3");
            }
            _ => unreachable!(),
        }
    }
    // Nothing arrives twice.
    agent.drain_for(Duration::from_secs(1));
    for (mode, crash) in &crashes {
        let count = agent
            .seen
            .iter()
            .filter(|e| by_id(crash.logged_id)(e))
            .count();
        assert_eq!(count, 1, "crashy {mode} reported {count} times");
    }
    // Every mode but "thread" (whose thread is named worker-7) crashed as crashy.
    assert_eq!(
        agent.process_counter("crashwatch_crashes_total", "crashy"),
        8.0
    );
    assert_eq!(
        agent.process_counter("crashwatch_crashes_total", "worker-7"),
        1.0
    );
}

#[test]
fn lines_user_space_writes_into_the_kernel_log_are_not_reported() {
    let Some(test) = KernelTest::begin() else {
        return;
    };
    let state = &test.state;
    let mut agent = Agent::start(state.path(), &[]);
    let untrusted_before = agent.counter("crashwatch_kmsg_records_untrusted_total");
    let forged = format!("forged-{}", std::process::id() % 100_000);
    write_kmsg(&format!(
        "<6>{forged}[4242]: segfault at 100 ip 0000561c8817d1c7 sp 00007fc8f1ce9c00 error 4 in qemu-nbd[561c88107000+155000]\n"
    ));
    write_kmsg(&format!(
        "<3>INFO: task {forged}:4243 blocked for more than 120 seconds.\n"
    ));
    // A real crash after the forged lines: once it is reported, the forged lines were read.
    let barrier = crash("null");
    agent.wait_for("for the barrier crash", WAIT, by_id(barrier.logged_id));
    assert!(
        !agent
            .seen
            .iter()
            .any(|e| e.comm.as_deref() == Some(forged.as_str())),
        "a forged line was reported: {:?}",
        agent.seen
    );
    let untrusted = agent.counter("crashwatch_kmsg_records_untrusted_total") - untrusted_before;
    assert_eq!(
        untrusted, 2.0,
        "both forged records are counted as untrusted"
    );
}

#[test]
fn a_restart_repeats_nothing_and_loses_nothing() {
    let Some(test) = KernelTest::begin() else {
        return;
    };
    let state = &test.state;
    let mut first = Agent::start(state.path(), &[]);
    let before = crash("null");
    let reported = first.wait_for("before the restart", WAIT, by_id(before.logged_id));
    let last_seq_reported = first.seen.iter().filter_map(|e| e.kmsg_seq).max().unwrap();
    let took = first.stop();
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");

    let while_down = [crash("div"), crash("rodata")];

    let mut second = Agent::start(state.path(), &[]);
    for crash in &while_down {
        second.wait_for(
            "for a crash while the agent was down",
            WAIT,
            by_id(crash.logged_id),
        );
    }
    second.drain_for(Duration::from_millis(500));
    assert!(
        second
            .seen
            .iter()
            .all(|e| e.kmsg_seq.is_none_or(|seq| seq > last_seq_reported)),
        "the restarted agent repeated records up to {last_seq_reported}: {:?}",
        second
            .seen
            .iter()
            .map(|e| (e.kmsg_seq, e.pid))
            .collect::<Vec<_>>()
    );
    assert!(
        !second
            .seen
            .iter()
            .any(|e| e.pid == reported.pid && e.kmsg_seq == reported.kmsg_seq)
    );
    assert_eq!(second.counter("crashwatch_kmsg_records_lost_total"), 0.0);
}

#[test]
fn a_ring_overrun_while_the_agent_is_stopped_is_counted_exactly() {
    let Some(test) = KernelTest::begin() else {
        return;
    };
    let state = &test.state;
    let mut first = Agent::start(state.path(), &[]);
    let barrier = crash("null");
    first.wait_for("before the overrun", WAIT, by_id(barrier.logged_id));
    first.stop();
    let cursor: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(state.path().join("kmsg-cursor.json")).unwrap(),
    )
    .unwrap();
    let cursor_seq = cursor["lastSeq"].as_u64().unwrap();

    // Fill the ring (128 KiB here) several times over while nobody reads.
    let filler = "x".repeat(900);
    for i in 0..600 {
        write_kmsg(&format!("crashwatch-overrun-test {i} {filler}\n"));
    }
    let after = crash("div");
    let oldest = support::oldest_kmsg_seq();
    assert!(
        oldest > cursor_seq + 1,
        "the flood did not overrun the ring (oldest {oldest}, cursor {cursor_seq})"
    );
    let expected_lost = oldest - cursor_seq - 1;

    let mut second = Agent::start(state.path(), &[]);
    second.wait_for(
        "for the crash after the overrun",
        WAIT,
        by_id(after.logged_id),
    );
    assert_eq!(
        second.counter("crashwatch_kmsg_records_lost_total") as u64,
        expected_lost
    );
    assert!(
        second.log().contains("overwritten"),
        "the loss is logged:\n{}",
        second.log()
    );
}

#[test]
fn a_binary_replaced_after_the_crash_is_flagged() {
    let Some(test) = KernelTest::begin() else {
        return;
    };
    let state = &test.state;
    let mut agent = Agent::start(state.path(), &[]);
    let real = crash("null");
    let event = agent.wait_for("for the crash", WAIT, by_id(real.logged_id));
    let lines = event.raw.join("\n");
    let explain = |binary: &std::path::Path| -> CrashEvent {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_crashwatch-agent"))
            .args(["explain", "--json", "--binary"])
            .arg(binary)
            .arg(&lines)
            .output()
            .unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(explain(crashy()).binary_matches, Some(true));
    // "Upgrade" the binary: same name, different code.
    let dir = tempfile::tempdir().unwrap();
    let upgraded = dir.path().join("crashy");
    support::compile_crashy(&upgraded, &["-O0"]);
    let flagged = explain(&upgraded);
    assert_eq!(flagged.binary_matches, Some(false), "{flagged:?}");
    assert_eq!(flagged.binary_path.as_deref(), upgraded.to_str());
}

/// The source line of the `crash:MODE` marker in the member test program.
fn marker_line(source: &str, mode: &str) -> u32 {
    let marker = format!("/* crash:{mode} */");
    source
        .lines()
        .position(|l| l.contains(&marker))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("no {marker} in the source"))
}

#[test]
fn a_stripped_optimised_binary_names_the_member_and_the_null_pointer() {
    let Some(test) = KernelTest::begin() else {
        return;
    };
    // The seed crash rebuilt: a stripped -O2 -fomit-frame-pointer `qemu-nbd` whose DWARF
    // lives only in a separate file, found by build-id.
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let binary = bin.join("qemu-nbd");
    let source_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/nullmember.c");
    support::run(
        "gcc",
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-g",
            "-o",
            binary.to_str().unwrap(),
            source_path.to_str().unwrap(),
        ],
    );
    let debug_file = dir.path().join("qemu-nbd.debug");
    support::split_debug(&binary, &debug_file);
    let debug_dir = dir.path().join("debug");
    support::install_by_build_id(&binary, &debug_file, &debug_dir);
    let source = std::fs::read_to_string(&source_path).unwrap();

    let mut agent = Agent::start(
        test.state.path(),
        &[
            "--search-path",
            bin.to_str().unwrap(),
            "--debug-dir",
            debug_dir.to_str().unwrap(),
        ],
    );
    // (mode, the function, the pointer expression and the member, as in the source)
    let cases = [
        ("chain", "bdrv_co_flush", "bs->drv", "bdrv_co_flush", false),
        ("direct", "bdrv_flushes", "bs", "stats.flushes", false),
        ("nested", "job_count_write", "job->bs", "stats.writes", true),
    ];
    for (mode, function, pointer, member, write) in cases {
        let output = support::run_to_crash(&binary, mode);
        let pid: u32 = support::printed(&output, "pid").unwrap().parse().unwrap();
        // The compiler's offsetof, printed by the program.
        let offset = support::printed(&output, "offset").unwrap().to_owned();
        let e = agent.wait_for(&format!("qemu-nbd {mode}"), WAIT, by_id(pid));
        assert_eq!(e.binary_matches, Some(true), "{mode}: {e:?}");
        let innermost = e.frames.first().unwrap_or_else(|| panic!("{mode}: {e:?}"));
        assert_eq!(innermost.function.as_deref(), Some(function), "{mode}");
        let line = marker_line(&source, mode);
        assert_eq!(innermost.line, Some(line), "{mode}: {e:?}");
        let access = e.access.clone().unwrap_or_else(|| panic!("{mode}: {e:?}"));
        assert_eq!(access.pointer.as_deref(), Some(pointer), "{mode}: {e:?}");
        assert_eq!(access.member.as_deref(), Some(member), "{mode}: {e:?}");
        assert_eq!(access.offset.to_string(), offset, "{mode}");
        assert_eq!(access.write, write, "{mode}");
        let verb = if write { "write" } else { "read" };
        let expected = format!(
            "NULL pointer dereference: {verb} of member `{member}` (offset {offset}) through `{pointer}`, which was NULL, in {function}() at {}:{line}",
            innermost.file.as_deref().unwrap()
        );
        let explanation = e.explanation.as_deref().unwrap();
        assert!(
            explanation.starts_with(&expected),
            "{mode}:\n  got      {explanation}\n  expected {expected}…"
        );
        assert!(
            innermost.file.as_deref().unwrap().ends_with("nullmember.c"),
            "{e:?}"
        );
    }
}
