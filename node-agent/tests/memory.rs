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
    run_to_crash, start_at_the_end_of_the_log, wait_until,
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

/// The bytes of DWARF in `binary`: the sizes of its `.debug_*` sections.
fn dwarf_bytes(binary: &Path) -> u64 {
    use object::{Object, ObjectSection};
    let data = std::fs::read(binary).unwrap();
    let object = object::File::parse(&*data).unwrap();
    object
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with(".debug_")))
        .map(|s| s.size())
        .sum()
}

/// A cold `crashwatch-agent explain --json` of `line` inside `cgroup`, through the symbol
/// indexes in `indexes` when given: the event, and the peak RSS in KiB (GNU time).
fn explain_in_cgroup(
    cgroup: &MemoryCgroup,
    binary: &Path,
    line: &str,
    indexes: Option<&Path>,
) -> (serde_json::Value, u64) {
    let mut command = std::process::Command::new("/usr/bin/time");
    command.args([
        "-f",
        "maxrss_kib=%M",
        env!("CARGO_BIN_EXE_crashwatch-agent"),
    ]);
    command.args(["explain", "--json", "--binary"]).arg(binary);
    if let Some(indexes) = indexes {
        command.arg("--symbol-index-dir").arg(indexes);
    }
    command.arg(line);
    cgroup.enter_on_exec(&mut command);
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "explain failed: {stderr}");
    let event = serde_json::from_slice(&output.stdout).unwrap();
    let max_rss = stderr
        .lines()
        .find_map(|l| l.strip_prefix("maxrss_kib="))
        .expect("GNU time's figure")
        .trim()
        .parse()
        .unwrap();
    (event, max_rss)
}

#[test]
fn a_binary_with_more_than_500_mib_of_dwarf_is_symbolized_cold_inside_a_64_mib_cgroup() {
    if !require(
        "needs gcc, g++, python3, readelf and GNU time",
        ["gcc", "g++", "python3", "readelf"].iter().all(|t| have(t))
            && Path::new("/usr/bin/time").exists(),
    ) || !require_memory_cgroup()
    {
        return;
    }
    let Some(test) = KernelTest::begin() else {
        return;
    };
    // Built once and cached outside the repository (scripts/dwarf-subject.sh).
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/dwarf-subject.sh");
    let subject = PathBuf::from(run(script.to_str().unwrap(), &["520"]).trim());
    let dwarf = dwarf_bytes(&subject);
    assert!(dwarf > 500 * MIB, "{dwarf} bytes of DWARF");
    let binary = subject;

    // The agent, inside 64 MiB, symbolizes a real crash of it.
    let cgroup = MemoryCgroup::create("bigdwarf", 64 * MIB);
    start_at_the_end_of_the_log(test.state.path());
    let mut agent = Agent::start_in_cgroup(
        test.state.path(),
        &["--binary", binary.to_str().unwrap()],
        &cgroup,
    );
    let pid = crash_null(&binary);
    let event = agent.wait_for("the crash of the big binary", WAIT, by_pid(pid));
    assert_eq!(
        event.frames.first().and_then(|f| f.function.as_deref()),
        Some("read_null_offset"),
        "symbolized: {event:?}"
    );
    assert_eq!(event.instruction.as_deref(), Some("mov rax, [rdi+0x100]"));
    // After that first crash, the agent indexes the binary in the background, in the same
    // 64 MiB, for the crashes to come.
    let indexes = test.state.path().join("symbol-index");
    wait_until(
        "the agent's symbol index of the big binary",
        WAIT * 6,
        || {
            std::fs::read_dir(&indexes).is_ok_and(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.path().extension().is_some_and(|x| x == "index"))
            })
        },
    );
    assert!(agent.is_running(), "agent exited:\n{}", agent.log());
    agent.stop();
    assert_eq!(
        cgroup.oom_kills(),
        0,
        "nothing was OOM-killed in the cgroup"
    );

    // A cold `explain` of that crash's kernel line, in the same cgroup: one process that
    // starts, finds the unit, symbolizes, runs the member analysis and exits.
    let line = event.raw.first().expect("the kernel's line").clone();
    let (explained, max_rss) = explain_in_cgroup(&cgroup, &binary, &line, None);
    assert_eq!(
        explained["frames"][0]["function"], "read_null_offset",
        "{explained}"
    );
    assert!(
        explained["frames"][0]["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("crashy.c")),
        "{explained}"
    );
    assert_eq!(explained["access"]["member"], "next", "{explained}");
    assert!(max_rss * 1024 <= 64 * MIB, "peak RSS {max_rss} KiB");
    assert_eq!(
        cgroup.oom_kills(),
        0,
        "nothing was OOM-killed in the cgroup"
    );
    eprintln!(
        "{} MiB of DWARF in a {} MiB binary: cold explain peak RSS {} MiB, cgroup peak {} MiB",
        dwarf / MIB,
        std::fs::metadata(&binary).unwrap().len() / MIB,
        max_rss / 1024,
        cgroup.max_usage() / MIB
    );

    // The same cold explain through the index the agent built: the same answer.
    let (through_index, indexed_rss) = explain_in_cgroup(&cgroup, &binary, &line, Some(&indexes));
    assert_eq!(through_index, explained, "the same event through the index");
    assert!(indexed_rss * 1024 <= 64 * MIB, "peak RSS {indexed_rss} KiB");
    assert_eq!(
        cgroup.oom_kills(),
        0,
        "nothing was OOM-killed in the cgroup"
    );
    eprintln!(
        "through the agent's symbol index: cold explain peak RSS {} MiB",
        indexed_rss / 1024
    );
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
    // A binary whose one compilation unit has a line program of 4 million rows: the lookup
    // parses the line program of the unit covering the address, which here takes over
    // 100 MiB, more than the 64 MiB cgroup allows, so the kernel OOM-kills the agent in the
    // middle of symbolizing, every time it tries. (Sections are read a page at a time, so
    // a large file or a large string table no longer does this; one unit's parsed lines
    // and functions must still fit in memory.)
    let source = dir.path().join("hog.s");
    run(
        "gcc",
        &[
            "-O2",
            "-g",
            "-S",
            "-o",
            source.to_str().unwrap(),
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/programs/crashy.c")
                .to_str()
                .unwrap(),
        ],
    );
    let mut assembly = std::fs::read_to_string(&source).unwrap();
    assembly.push_str(
        "\t.text\n\t.globl hog_rows\n\t.type hog_rows, @function\nhog_rows:\n\
         \t.rept 2000000\n\t.loc 1 7 1\n\tnop\n\t.loc 1 8 1\n\tnop\n\t.endr\n\
         \tret\n\t.size hog_rows, .-hog_rows\n",
    );
    std::fs::write(&source, assembly).unwrap();
    let hog = dir.path().join("dwarfhog");
    run(
        "gcc",
        &[
            "-pthread",
            "-o",
            hog.to_str().unwrap(),
            source.to_str().unwrap(),
        ],
    );
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
