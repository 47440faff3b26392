//! The core handler on this machine's real kernel: the agent (`run --standalone
//! --core-handler`) installs itself as `core_pattern`, real programs crash, and each crash
//! becomes one event with its whole stack, unwound by CFI through libc and equal to gdb's
//! `bt` on the dump the previous handler received; crashes the kernel log does not show
//! (SIGABRT, `kill -SEGV`, rate-limited lines) are counted too; stopping the agent restores
//! the previous handler, and a killed agent's handler still chains without hanging.
//!
//! Needs root, the kernel, gcc and gdb; under `CI=true` they must be there.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crds::{CrashEvent, EventKind};
use support::{Agent, KernelTest, PreviousHandler, Sysctl, core_pattern, have, require};

/// Root, the kernel, gcc and gdb.
fn setup() -> Option<KernelTest> {
    let test = KernelTest::begin()?;
    (require("needs gcc", have("gcc")) && require("needs gdb", have("gdb"))).then_some(test)
}

fn program(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/programs")
        .join(name)
}

/// Builds `source` -O2 -g -fomit-frame-pointer into `dir`.
fn build(dir: &Path, source: &str) -> PathBuf {
    let out = dir.join(source.trim_end_matches(".c"));
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-fomit-frame-pointer", "-o"])
        .arg(&out)
        .arg(program(source))
        .status()
        .unwrap();
    assert!(status.success(), "gcc {source}");
    out
}

/// Runs `binary` until a signal kills it; returns its pid.
fn crash(binary: &Path) -> u32 {
    let started = Instant::now();
    let mut child = Command::new(binary)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    assert!(
        status.code().is_none(),
        "{} did not crash",
        binary.display()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the crash took {:?}: a handler held it",
        started.elapsed()
    );
    pid
}

/// The line of a source carrying `marker`.
fn line_of(source: &str, marker: &str) -> u64 {
    fs::read_to_string(program(source))
        .unwrap()
        .lines()
        .position(|l| l.contains(marker))
        .unwrap() as u64
        + 1
}

/// gdb's frames as (function, line, whether outside the test's program); the line is 0
/// outside it, where only the count is compared.
fn gdb_frames(binary: &Path, core: &Path) -> Vec<(String, u64, bool)> {
    support::gdb_backtrace(binary, core)
        .into_iter()
        .map(|f| {
            // Frames in the test's program name its source; the C library's do not.
            let in_library = !f.file.contains("tests/programs/");
            (f.function, if in_library { 0 } else { f.line }, in_library)
        })
        .collect()
}

fn wait_event(agent: &mut Agent, pid: u32) -> CrashEvent {
    agent.wait_for("of the crash", Duration::from_secs(30), |e| {
        e.pid == Some(pid)
    })
}

#[test]
fn a_crash_through_libc_is_unwound_by_cfi_like_gdb_and_the_previous_handler_gets_its_dump() {
    let Some(test) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let previous = PreviousHandler::install(dir.path());
    let binary = build(dir.path(), "sortcrash.c");
    let mut agent = Agent::start(test.state.path(), &["--core-handler"]);
    assert!(core_pattern().contains(" coredump "), "{}", core_pattern());

    let pid = crash(&binary);
    let event = wait_event(&mut agent, pid);
    assert_eq!(event.kind, EventKind::Segfault);
    assert!(
        event.kmsg_seq.is_some(),
        "merged with its kernel line: {event:?}"
    );
    let frames: Vec<(String, u64, bool)> = event
        .frames
        .iter()
        .map(|f| {
            let in_library = f.module.as_deref() != Some("sortcrash");
            let line = if in_library {
                0
            } else {
                u64::from(f.line.unwrap_or(0))
            };
            (f.function.clone().unwrap_or_default(), line, in_library)
        })
        .collect();
    // Innermost the comparator, outermost main, libc's own frames between.
    assert_eq!(
        frames[0],
        (
            "by_next_key".into(),
            line_of("sortcrash.c", "crash:compare"),
            false
        )
    );
    assert_eq!(
        frames.last().unwrap(),
        &("main".into(), line_of("sortcrash.c", "call:qsort"), false)
    );
    assert!(
        frames[1..frames.len() - 1].iter().all(|f| f.2),
        "{frames:?}"
    );
    assert!(frames.len() >= 3, "{frames:?}");
    assert!(
        event.frames[1]
            .module
            .as_deref()
            .is_some_and(|m| m.starts_with("libc.so"))
    );
    let explanation = event.explanation.clone().unwrap_or_default();
    assert!(explanation.contains("NULL"), "{explanation}");

    // gdb on the dump the previous handler kept: the same frames in the program, and both
    // reach main through the C library. (Inside libc the tools differ: gdb also shows
    // `qsort`, which tail-calls `__qsort_r` with a `jmp` and so has no frame of its own.)
    let core = previous.wait_core(u64::from(pid));
    let gdb = gdb_frames(&binary, &core);
    let program = |frames: &[(String, u64, bool)]| -> Vec<(String, u64, bool)> {
        frames.iter().filter(|f| !f.2).cloned().collect()
    };
    assert_eq!(
        program(&gdb),
        program(&frames),
        "gdb {gdb:?}\nours {frames:?}"
    );
    assert!(gdb.iter().any(|f| f.2), "gdb {gdb:?}");
    agent.stop();
    assert_eq!(core_pattern(), previous.pattern, "restored on stop");
}

#[test]
fn crashes_the_kernel_log_does_not_show_are_counted_from_their_dumps() {
    let Some(test) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let _previous = PreviousHandler::install(dir.path());
    let binary = build(dir.path(), "checkout.c");
    // One segfault line per 5 s: of five crashes, the kernel prints one.
    let _interval = Sysctl::set("kernel/printk_ratelimit", "5");
    let _burst = Sysctl::set("kernel/printk_ratelimit_burst", "1");
    let mut agent = Agent::start(test.state.path(), &["--core-handler"]);
    let pids: Vec<u32> = (0..5).map(|_| crash(&binary)).collect();
    for &pid in &pids {
        let event = wait_event(&mut agent, pid);
        assert_eq!(event.kind, EventKind::Segfault);
        assert_eq!(event.frames[0].function.as_deref(), Some("payment_total"));
    }
    let with_line = agent
        .seen
        .iter()
        .filter(|e| e.pid.is_some_and(|p| pids.contains(&p)) && e.kmsg_seq.is_some())
        .count();
    assert!(with_line < 5, "the rate limit let every line through");
    // SIGABRT, which the kernel never logs.
    let abort = dir.path().join("abort.c");
    fs::write(&abort, "#include <stdlib.h>\nint main(void) { abort(); }\n").unwrap();
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-o"])
        .arg(dir.path().join("abort"))
        .arg(&abort)
        .status()
        .unwrap();
    assert!(status.success());
    let pid = crash(&dir.path().join("abort"));
    let event = wait_event(&mut agent, pid);
    assert_eq!(event.kind, EventKind::Abort);
    assert_eq!(
        event.frames.last().and_then(|f| f.function.as_deref()),
        Some("main")
    );
    agent.drain_for(Duration::from_secs(3));
    let ours = |p: u32| agent.seen.iter().filter(|e| e.pid == Some(p)).count();
    for pid in pids.iter().chain([&pid]) {
        assert_eq!(ours(*pid), 1, "one event per crash, pid {pid}");
    }
    agent.stop();
}

#[test]
fn a_killed_agent_leaves_a_handler_that_still_chains_and_a_restart_keeps_the_previous_one() {
    let Some(test) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let previous = PreviousHandler::install(dir.path());
    let binary = build(dir.path(), "checkout.c");
    let agent = Agent::start(test.state.path(), &["--core-handler"]);
    let ours = core_pattern();
    agent.kill();
    assert_eq!(core_pattern(), ours, "a SIGKILL cannot restore anything");
    // Without the agent: the crash neither hangs nor loses the previous handler's dump.
    let pid = crash(&binary);
    previous.wait_core(u64::from(pid));
    // The handler spooled it; a restarted agent reports it, and still knows the pattern
    // it replaced first (not its own).
    let mut agent = Agent::start(test.state.path(), &["--core-handler"]);
    let event = wait_event(&mut agent, pid);
    assert_eq!(event.frames[0].function.as_deref(), Some("payment_total"));
    agent.stop();
    assert_eq!(core_pattern(), previous.pattern);
}

#[test]
fn a_hostile_core_stream_is_passed_on_and_spools_nothing() {
    let Some(_test) = setup() else { return };
    let dir = tempfile::tempdir().unwrap();
    // The handler finds its state dir from where it lies, as when the kernel runs it.
    let state = dir.path().join("state");
    fs::create_dir_all(state.join("bin")).unwrap();
    let handler = state.join("bin/crashwatch-agent");
    fs::copy(env!("CARGO_BIN_EXE_crashwatch-agent"), &handler).unwrap();
    let kept = dir.path().join("kept");
    fs::write(
        state.join("coredump-previous.sh"),
        format!("#!/bin/sh\ncat > {}\n", kept.display()),
    )
    .unwrap();
    fs::set_permissions(
        state.join("coredump-previous.sh"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::create_dir_all(state.join("coredump")).unwrap();
    fs::write(
        state.join("coredump/handler.json"),
        serde_json::json!({
            "previous": {"pattern": format!("|{}", state.join("coredump-previous.sh").display()), "pipeLimit": 0},
            "debugDirs": [],
            "runtimeStateDir": "/nonexistent",
        })
        .to_string(),
    )
    .unwrap();
    for garbage in [
        b"\x7fELF\x02\x01".repeat(1000),
        vec![0xff; 300_000],
        b"\x7fELF".to_vec(),
    ] {
        let output = support::output_with_stdin(
            Command::new(&handler).args([
                "coredump", "999999", "999999", "1", "1", "11", "0", "0", "1", "0", "0", "h", "x",
            ]),
            &garbage,
        );
        assert!(output.status.success(), "{output:?}");
        assert_eq!(fs::read(&kept).unwrap(), garbage, "passed on unchanged");
        let spooled = fs::read_dir(state.join("coredump/spool"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(spooled, 0, "nothing spooled from garbage");
    }
}
