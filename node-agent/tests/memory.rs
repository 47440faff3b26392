//! The agent's memory against the real kernel: inside a memory cgroup, as the chart's limit
//! puts it, large binaries are symbolized without the agent being OOM-killed, and an agent
//! killed while symbolizing does not die again on the same record when it restarts.
//!
//! Needs root, `/dev/kmsg` and the cgroup v1 memory controller. Run serially with the other
//! kernel tests (`flock /tmp/cw/kernel.lock`): each test takes the kernel lock, restores the
//! sysctls it changes and removes its cgroup.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crds::{CrashEvent, EventKind};
use support::{
    Agent, KernelTest, MemoryCgroup, compile_crashy, have, require, require_memory_cgroup, run,
    run_to_crash, start_at_the_end_of_the_log,
};

const WAIT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;

fn needs_tools() -> bool {
    require(
        "needs gcc and objcopy",
        ["gcc", "objcopy"].iter().all(|t| have(t)),
    )
}

/// Runs `binary null` (a NULL+0x100 read in `read_null_offset`); returns the pid it printed.
fn crash_null(binary: &Path) -> u32 {
    let output = run_to_crash(binary, "null");
    support::printed(&output, "pid").unwrap().parse().unwrap()
}

fn by_pid(pid: u32) -> impl Fn(&CrashEvent) -> bool {
    move |e| e.pid == Some(pid) && e.kind == EventKind::Segfault
}

/// A file of `size` zero bytes (sparse).
fn zeros(path: &Path, size: u64) -> PathBuf {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    path.to_owned()
}

#[test]
fn a_binary_padded_with_600_mib_is_symbolized_inside_a_128_mib_cgroup() {
    if !needs_tools() || !require_memory_cgroup() {
        return;
    }
    let Some(test) = KernelTest::begin() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    compile_crashy(&plain, &[]);
    // 600 MiB in a section that is never loaded: the program runs as before, and the file
    // is 600 MiB larger than anything symbolization needs.
    let pad = zeros(&dir.path().join("pad"), 600 * MIB);
    let binary = dir.path().join("padcrashy");
    run(
        "objcopy",
        &[
            &format!("--add-section=.pad={}", pad.display()),
            "--set-section-flags=.pad=noload,readonly",
            plain.to_str().unwrap(),
            binary.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&pad).unwrap();
    assert!(std::fs::metadata(&binary).unwrap().len() > 600 * MIB);

    let cgroup = MemoryCgroup::create("padded", 128 * MIB);
    start_at_the_end_of_the_log(test.state.path());
    let mut agent = Agent::start_in_cgroup(
        test.state.path(),
        &["--binary", binary.to_str().unwrap()],
        &cgroup,
    );
    let agent_pid = agent.pid();
    assert_eq!(cgroup.pids(), [agent_pid], "the agent runs in the cgroup");

    for round in 0..3 {
        let pid = crash_null(&binary);
        let event = agent.wait_for(&format!("padded crash {round}"), WAIT, by_pid(pid));
        assert_eq!(
            event.frames.first().and_then(|f| f.function.as_deref()),
            Some("read_null_offset"),
            "round {round}: symbolized: {event:?}"
        );
        assert!(
            event.frames[0]
                .file
                .as_deref()
                .is_some_and(|f| f.ends_with("crashy.c")),
            "{event:?}"
        );
        assert_eq!(event.binary_matches, Some(true), "{event:?}");
        assert_eq!(event.instruction.as_deref(), Some("mov rax, [rdi+0x100]"));
    }
    assert!(agent.is_running(), "agent exited:\n{}", agent.log());
    assert_eq!(agent.pid(), agent_pid);
    assert_eq!(
        cgroup.pids(),
        [agent_pid],
        "the same process, still in the cgroup"
    );
    assert_eq!(
        cgroup.oom_kills(),
        0,
        "nothing was OOM-killed in the cgroup"
    );
    assert_eq!(
        agent.counter("crashwatch_kmsg_records_lost_total"),
        0.0,
        "the agent never stopped reading"
    );
    eprintln!(
        "cgroup peak usage {} MiB for a {} MiB binary",
        cgroup.max_usage() / MIB,
        std::fs::metadata(&binary).unwrap().len() / MIB
    );
    agent.stop();
}

#[test]
fn an_agent_killed_while_symbolizing_publishes_that_crash_unsymbolized_after_its_restart() {
    if !needs_tools() || !require_memory_cgroup() {
        return;
    }
    let Some(test) = KernelTest::begin() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    compile_crashy(&plain, &[]);
    // A binary whose DWARF string table is 256 MiB: symbolizing it needs that section in
    // memory, which a 64 MiB cgroup does not allow, so the kernel OOM-kills the agent in
    // the middle of symbolizing, every time it tries.
    let strings = dir.path().join("debug_str");
    run(
        "objcopy",
        &[
            &format!("--dump-section=.debug_str={}", strings.display()),
            plain.to_str().unwrap(),
        ],
    );
    let grown = std::fs::metadata(&strings).unwrap().len() + 256 * MIB;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&strings)
        .unwrap()
        .set_len(grown)
        .unwrap();
    let hog = dir.path().join("dwarfhog");
    run(
        "objcopy",
        &[
            &format!("--update-section=.debug_str={}", strings.display()),
            plain.to_str().unwrap(),
            hog.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&strings).unwrap();
    // A second, ordinary binary: the agent must go on symbolizing after the bad record.
    let other = dir.path().join("crashy");
    compile_crashy(&other, &[]);

    let cgroup = MemoryCgroup::create("recrash", 64 * MIB);
    let state = test.state.path();
    start_at_the_end_of_the_log(state);
    let args = [
        "--binary",
        hog.to_str().unwrap(),
        "--binary",
        other.to_str().unwrap(),
    ];
    let mut first = Agent::start_in_cgroup(state, &args, &cgroup);
    let hog_pid = crash_null(&hog);
    let status = first
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("the agent survived symbolizing the hog:\n{}", first.log()));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "killed by the OOM killer: {status}"
    );
    assert_eq!(cgroup.oom_kills(), 1);
    assert!(
        !first.seen.iter().any(|e| e.pid == Some(hog_pid)),
        "the first agent published nothing for the hog"
    );
    drop(first);

    // The same agent, same state, same limit: it reads the record again, and this time
    // publishes the event without symbolizing it, and says why.
    let mut second = Agent::start_in_cgroup(state, &args, &cgroup);
    let event = second.wait_for("the hog's crash, after the restart", WAIT, by_pid(hog_pid));
    assert!(event.frames.is_empty(), "published unsymbolized: {event:?}");
    // Identified from its headers alone, so its report keeps the fingerprint of the crashes
    // of the same binary that were symbolized.
    assert_eq!(event.binary_path.as_deref(), hog.to_str(), "{event:?}");
    assert_eq!(event.build_id, Some(support::build_id(&hog)), "{event:?}");
    assert_eq!(event.module.as_deref(), Some("dwarfhog"));
    assert!(
        event.explanation.is_some(),
        "still explained from the kernel's lines"
    );
    assert_eq!(
        second.labelled(
            "crashwatch_symbolization_failures_total",
            "reason",
            "interrupted"
        ),
        1.0
    );
    assert!(
        second.log().contains("did not finish"),
        "the reason is logged:\n{}",
        second.log()
    );

    // The agent goes on: an ordinary crash is symbolized, by the same process.
    let pid = crash_null(&other);
    let event = second.wait_for("an ordinary crash after it", WAIT, by_pid(pid));
    assert_eq!(
        event.frames.first().and_then(|f| f.function.as_deref()),
        Some("read_null_offset"),
        "{event:?}"
    );
    assert!(second.is_running(), "{}", second.log());
    assert_eq!(cgroup.pids(), [second.pid()]);
    assert_eq!(cgroup.oom_kills(), 1, "no second OOM kill");
    assert_eq!(
        second
            .seen
            .iter()
            .filter(|e| e.pid == Some(hog_pid) && e.kind == EventKind::Segfault)
            .count(),
        1,
        "the hog's crash is published once"
    );
    second.stop();
}
