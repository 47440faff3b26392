//! A second real kernel (issue 16): Debian's 6.1 in the fault VM (scripts/fault-vm.sh, TCG),
//! whose segfault lines carry no file offset (`in crashy[401000+8a000]`) and which has the
//! real nbd driver. The VM boots once and runs `tests/fault-vm/faults.sh`: our release agent
//! follows the guest's live `/dev/kmsg` (`run --standalone`, JSON events into the 9p share)
//! while static programs built here crash in every way the x86 kernel reports, a reader of a
//! stopped `qemu-nbd` hangs, and nbd connections time out and lose their server.
//!
//! Every expected fact is read from the raw kernel records the VM streamed to
//! `OUT/kmsg.log` or from the programs' own output, never from the agent's; the symbolized
//! functions come from the program sources. The whole ring is read, boot log included: the
//! events are counted exactly, so no context line may become an event.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;

use crds::{Address, CrashEvent, DetectedBy, EventKind};
use support::{build_id, have, printed, release_binary, require, stage_release_agent};

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A kmsg record as the guest's `cat /dev/kmsg` wrote it: `PRI,SEQ,USEC,FLAGS;MESSAGE`.
#[derive(Debug, Clone)]
struct Record {
    seq: u64,
    message: String,
}

/// The records of a raw kmsg stream (continuation lines, ` SUBSYSTEM=…`, are skipped).
fn records(kmsg: &str) -> Vec<Record> {
    kmsg.lines()
        .filter_map(|line| {
            let (prefix, message) = line.split_once(';')?;
            let mut fields = prefix.split(',');
            let _priority: u32 = fields.next()?.parse().ok()?;
            let seq = fields.next()?.parse().ok()?;
            Some(Record {
                seq,
                message: message.to_owned(),
            })
        })
        .collect()
}

/// The record whose message starts with `start`, and its index; exactly one must.
fn the_record<'a>(records: &'a [Record], start: &str) -> (usize, &'a Record) {
    let found: Vec<_> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| r.message.starts_with(start))
        .collect();
    assert_eq!(found.len(), 1, "records starting with {start:?}: {found:?}");
    found[0]
}

fn hex(text: &str) -> u64 {
    u64::from_str_radix(text, 16).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// The words of a kernel line after `key` (`ip 0000…` or `ip:401983`), as hex.
fn field(line: &str, key: &str) -> u64 {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line}"));
    let value: String = line[at + key.len()..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    hex(&value)
}

/// `in FILE[START+SIZE]` as 6.1 prints it, with no file offset before the start.
fn location(line: &str, file: &str) -> (u64, u64) {
    let marker = format!(" in {file}[");
    let at = line
        .find(&marker)
        .unwrap_or_else(|| panic!("no {marker:?} in {line}"));
    let inside = line[at + marker.len()..].split(']').next().unwrap();
    assert!(
        !inside.contains(','),
        "6.1 prints no file offset, 6.7 on do: {line}"
    );
    let (start, size) = inside.split_once('+').unwrap();
    (hex(start), hex(size))
}

/// The file offset of the `PT_LOAD` segment of `binary` that starts at `vaddr`, from
/// binutils' readelf.
fn segment_offset(binary: &Path, vaddr: u64) -> u64 {
    let headers = support::run("readelf", &["-lW", binary.to_str().unwrap()]);
    headers
        .lines()
        .map(str::split_whitespace)
        .filter_map(|mut words| {
            (words.next()? == "LOAD").then_some(())?;
            let offset = hex(words.next()?.trim_start_matches("0x"));
            let address = hex(words.next()?.trim_start_matches("0x"));
            Some((address, offset))
        })
        .find(|(address, _)| *address == vaddr)
        .unwrap_or_else(|| panic!("no LOAD at {vaddr:#x} in {headers}"))
        .1
}

/// The source line of `marker` in a test program.
fn source_line(program: &str, marker: &str) -> u32 {
    let source = std::fs::read_to_string(manifest().join("tests/programs").join(program)).unwrap();
    source
        .lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker} in {program}")) as u32
        + 1
}

/// `gcc -static` of a test program into `out`.
fn compile_static(program: &str, flags: &[&str], out: &Path) {
    let status = Command::new("gcc")
        .arg("-static")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(manifest().join("tests/programs").join(program))
        .status()
        .expect("gcc");
    assert!(status.success(), "gcc -static {program}");
}

/// What a crash program in the guest printed, and how it ended.
struct Run {
    pid: u32,
    output: String,
}

fn guest_run(out: &Path, name: &str, status: i32) -> Run {
    let output = std::fs::read_to_string(out.join(format!("{name}.out")))
        .unwrap_or_else(|e| panic!("{name}.out: {e}"));
    assert_eq!(
        printed(&output, "status"),
        Some(status.to_string().as_str()),
        "{name}: {output}"
    );
    Run {
        pid: printed(&output, "pid").unwrap().parse().unwrap(),
        output,
    }
}

/// The one event of `kind` for `pid`.
fn the_event(events: &[CrashEvent], kind: EventKind, pid: u32) -> &CrashEvent {
    let found: Vec<_> = events
        .iter()
        .filter(|e| e.kind == kind && e.pid == Some(pid))
        .collect();
    assert_eq!(found.len(), 1, "{kind:?} events of pid {pid}: {found:#?}");
    found[0]
}

#[test]
fn the_agent_recognises_real_crashes_hangs_and_nbd_failures_on_debians_6_1_kernel() {
    // SAFETY: geteuid has no preconditions.
    let ok = require("needs root", unsafe { libc::geteuid() } == 0)
        && require(
            "needs qemu-system-x86_64 (scripts/install-test-deps.sh)",
            have("qemu-system-x86_64"),
        )
        && require(
            "needs busybox-static, qemu-nbd and gcc",
            have("busybox") && have("qemu-nbd") && have("gcc"),
        )
        && require(
            "needs the release agent (cargo build --release -p node-agent; scripts/images.sh does it)",
            release_binary("crashwatch-agent").exists(),
        );
    if !ok {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    let bin = share.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    stage_release_agent(&share);
    let crashy = bin.join("crashy");
    let nullmember = bin.join("nullmember");
    compile_static("crashy.c", &["-O2", "-g", "-pthread"], &crashy);
    compile_static(
        "nullmember.c",
        &["-O2", "-fomit-frame-pointer", "-g"],
        &nullmember,
    );
    std::fs::copy(
        manifest().join("tests/fault-vm/faults.sh"),
        share.join("faults.sh"),
    )
    .unwrap();
    std::fs::File::create(share.join("disk.img"))
        .unwrap()
        .set_len(32 << 20)
        .unwrap();

    // One boot, bounded: the scenario takes about 30 s after a boot of 3 to 11 s.
    let vm_out = dir.path().join("vm");
    let began = std::time::Instant::now();
    let status = Command::new(manifest().join("../scripts/fault-vm.sh"))
        .arg("run")
        .arg(&vm_out)
        .arg(&share)
        .arg("faults.sh")
        .env("TIMEOUT", "240")
        .env("NO_REBOOT", "1")
        .status()
        .expect("scripts/fault-vm.sh");
    let console = std::fs::read_to_string(vm_out.join("console.log")).unwrap_or_default();
    assert!(
        status.success() && console.contains("FAULTS: end"),
        "the VM ({status}) did not finish the scenario:\n{console}"
    );
    eprintln!("fault VM: boot and scenario took {:?}", began.elapsed());
    let out = share.join("out");
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    assert_eq!(read("agent-ready").trim(), "1", "{}", read("agent.log"));
    assert_eq!(
        read("hung_task_panic").trim(),
        "0",
        "the VM's kernel never panics on a hang"
    );
    assert_eq!(
        read("agent.exit").trim(),
        "status=0",
        "SIGTERM stops the agent cleanly: {}",
        read("agent.log")
    );
    let kmsg = records(&String::from_utf8_lossy(
        &std::fs::read(vm_out.join("kmsg.log")).unwrap(),
    ));
    assert!(
        kmsg.first().is_some_and(|r| r.seq == 0),
        "the VM's kmsg stream starts at the first record"
    );
    let events: Vec<CrashEvent> = read("events.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let seq_of = |event: &CrashEvent| event.kmsg_seq.expect("events from kmsg carry the seq");

    // The segfaults: `COMM[PID]: segfault at ADDR ip IP sp SP error E in FILE[START+SIZE]`,
    // then a `Code:` record. The agent derives the file offset from the binary's segments.
    let segfaults = [
        (
            "member",
            "nullmember",
            &nullmember,
            "bdrv_co_flush",
            "nullmember.c",
            "/* crash:chain */",
        ),
        (
            "null",
            "crashy",
            &crashy,
            "read_null_offset",
            "crashy.c",
            "long read_null_offset(",
        ),
    ];
    for (name, comm, binary, function, source, marker) in segfaults {
        let run = guest_run(&out, name, 128 + libc::SIGSEGV);
        let (at, line) = the_record(&kmsg, &format!("{comm}[{}]: segfault at ", run.pid));
        let line = &line.message;
        let event = the_event(&events, EventKind::Segfault, run.pid);
        assert_eq!(event.comm.as_deref(), Some(comm), "{event:?}");
        assert_eq!(event.kmsg_seq, Some(kmsg[at].seq));
        assert_eq!(
            event.fault_address,
            Some(Address(field(line, "segfault at ")))
        );
        let ip = field(line, " ip ");
        assert_eq!(event.ip, Some(Address(ip)), "{line}");
        assert_eq!(event.sp, Some(Address(field(line, " sp "))), "{line}");
        assert_eq!(event.error_code, Some(field(line, " error ")), "{line}");
        assert_eq!(event.module.as_deref(), Some(comm));
        let (start, size) = location(line, comm);
        assert_eq!(
            (event.vma_start, event.vma_size),
            (Some(Address(start)), Some(Address(size)))
        );
        assert_eq!(
            event.module_offset,
            Some(Address(ip - start + segment_offset(binary, start))),
            "the file offset 6.1 leaves out, from the binary's PT_LOAD: {event:?}"
        );
        let code = kmsg[at + 1].message.strip_prefix("Code: ").unwrap();
        assert_eq!(event.code.as_deref(), Some(code));
        assert_eq!(event.raw, [line.clone(), kmsg[at + 1].message.clone()]);
        // Symbolized from the binary in the share, checked against the Code: bytes.
        let guest_path = format!("/mnt/host/bin/{comm}");
        assert_eq!(event.binary_path.as_deref(), Some(guest_path.as_str()));
        assert_eq!(event.build_id.as_deref(), Some(build_id(binary).as_str()));
        assert_eq!(event.binary_matches, Some(true), "{event:?}");
        let frame = event.frames.first().unwrap_or_else(|| panic!("{event:?}"));
        assert_eq!(frame.function.as_deref(), Some(function), "{event:?}");
        assert_eq!(frame.line, Some(source_line(source, marker)), "{event:?}");
        assert!(
            frame.file.as_deref().unwrap().ends_with(source),
            "{event:?}"
        );
        let access = event.access.as_ref().unwrap_or_else(|| panic!("{event:?}"));
        if name == "member" {
            // The offset of the member, as the compiler laid it out (printed by the program).
            let offset = printed(&run.output, "offset").unwrap();
            assert_eq!(access.pointer.as_deref(), Some("bs->drv"));
            assert_eq!(access.member.as_deref(), Some("bdrv_co_flush"));
            assert_eq!(access.offset.to_string(), offset);
            assert!(
                event.explanation.as_deref().unwrap().starts_with(&format!(
                    "NULL pointer dereference: read of member `bdrv_co_flush` (offset {offset}) through `bs->drv`, which was NULL, in bdrv_co_flush()"
                )),
                "{event:?}"
            );
        } else {
            // struct node { char pad[0x100]; struct node *next; }, read through NULL `n`.
            assert_eq!(access.pointer.as_deref(), Some("n"));
            assert_eq!(access.member.as_deref(), Some("next"));
            assert_eq!(access.offset.to_string(), "0x100");
        }
    }

    // The traps: `traps: COMM[PID] LABEL ip:IP sp:SP error:E in FILE[START+SIZE]`, where the
    // label the kernel printed decides the kind, and the function comes from crashy.c.
    let traps = [
        (
            "gpf",
            libc::SIGSEGV,
            "general protection fault",
            EventKind::GeneralProtection,
            "gpf",
        ),
        (
            "div",
            libc::SIGFPE,
            "trap divide error",
            EventKind::DivideError,
            "divide",
        ),
        (
            "ud2",
            libc::SIGILL,
            "trap invalid opcode",
            EventKind::InvalidOpcode,
            "ud2",
        ),
        (
            "int3",
            libc::SIGTRAP,
            "trap int3",
            EventKind::Breakpoint,
            "int3",
        ),
    ];
    for (mode, signal, label, kind, function) in traps {
        let run = guest_run(&out, mode, 128 + signal);
        let (at, line) = the_record(&kmsg, &format!("traps: crashy[{}] ", run.pid));
        let line = &line.message;
        assert!(
            line.starts_with(&format!("traps: crashy[{}] {label} ip:", run.pid)),
            "{line}"
        );
        let event = the_event(&events, kind, run.pid);
        assert_eq!(event.comm.as_deref(), Some("crashy"));
        assert_eq!(event.kmsg_seq, Some(kmsg[at].seq));
        assert_eq!(event.raw, [line.as_str()], "no Code: record follows a trap");
        let ip = field(line, " ip:");
        assert_eq!(event.ip, Some(Address(ip)), "{line}");
        assert_eq!(event.sp, Some(Address(field(line, " sp:"))), "{line}");
        assert_eq!(event.error_code, Some(field(line, " error:")), "{line}");
        assert_eq!(event.fault_address, None, "{event:?}");
        let (start, size) = location(line, "crashy");
        assert_eq!(
            (event.vma_start, event.vma_size),
            (Some(Address(start)), Some(Address(size)))
        );
        assert_eq!(
            event.module_offset,
            Some(Address(ip - start + segment_offset(&crashy, start)))
        );
        assert_eq!(
            event.frames.first().and_then(|f| f.function.as_deref()),
            Some(function),
            "{event:?}"
        );
    }

    // The hung task: a dd killed while reading from the stopped server, stuck in its exit
    // path. `INFO: task dd:PID blocked for more than N seconds.`, then its stack.
    let hung: u32 = read("hung.pid").trim().parse().unwrap();
    let stat = read("hung.stat");
    assert!(
        stat.starts_with(&format!("{hung} (dd) D ")),
        "the reader was in D after kill -9: {stat}"
    );
    let header = format!("INFO: task dd:{hung} blocked for more than ");
    let reports = kmsg
        .iter()
        .filter(|r| r.message.starts_with(&header))
        .count();
    assert!(reports >= 1, "the kernel reported the hung dd");
    let at = kmsg
        .iter()
        .position(|r| r.message.starts_with(&header))
        .unwrap();
    let seconds: u64 = kmsg[at].message[header.len()..]
        .strip_suffix(" seconds.")
        .unwrap()
        .parse()
        .unwrap();
    let event = the_event(&events, EventKind::HungTask, hung);
    assert_eq!(event.comm.as_deref(), Some("dd"));
    assert_eq!(event.kmsg_seq, Some(kmsg[at].seq));
    assert_eq!(event.blocked_seconds, Some(seconds));
    assert_eq!(event.detected_by, Some(DetectedBy::KernelReport));
    // The stack between <TASK> and </TASK>: its frames, without the `? ` guesses and the
    // user registers (`RIP: 0033:…`) the kernel prints inside it.
    let task = kmsg[at..]
        .iter()
        .position(|r| r.message.trim() == "<TASK>")
        .unwrap()
        + at;
    let stack: Vec<String> = kmsg[task + 1..]
        .iter()
        .map(|r| r.message.trim())
        .take_while(|m| *m != "</TASK>")
        .filter(|m| !m.starts_with("? ") && m.contains("+0x") && !m.contains(": "))
        .map(str::to_owned)
        .collect();
    assert!(stack.len() > 5, "{stack:?}");
    assert_eq!(event.kernel_stack, stack);
    assert!(
        event
            .explanation
            .as_deref()
            .unwrap()
            .contains("folio_wait_bit_common()"),
        "the innermost frame that is not the scheduler: {event:?}"
    );

    // The nbd failures. nbd1 (nbd-client -t 3, server stopped): the timeout, the dead
    // connection and the failed read are one incident.
    assert_eq!(
        read("timeout.out").trim(),
        "status=1",
        "the direct read failed"
    );
    let (first, _) = the_record(&kmsg, "block nbd1: Connection timed out, retrying (");
    let (last, _) = the_record(&kmsg, "I/O error, dev nbd1, sector ");
    let incident: Vec<String> = kmsg[first..=last]
        .iter()
        .map(|r| r.message.clone())
        .collect();
    for expected in [
        "block nbd1: Dead connection, failed to find a fallback",
        "block nbd1: shutting down sockets",
    ] {
        assert!(incident.iter().any(|m| m == expected), "{incident:?}");
    }
    let nbd: BTreeMap<u64, &CrashEvent> = events
        .iter()
        .filter(|e| e.kind == EventKind::NbdError)
        .map(|e| (seq_of(e), e))
        .collect();
    let timeout = nbd[&kmsg[first].seq];
    assert_eq!(timeout.device.as_deref(), Some("nbd1"));
    assert_eq!(timeout.raw, incident);
    assert!(
        timeout
            .explanation
            .as_deref()
            .unwrap()
            .starts_with("nbd1: the NBD server stopped answering"),
        "{timeout:?}"
    );
    // nbd2 (server killed under a reader): the receive fails. The disconnect that frees the
    // reader prints `shutting down sockets` too: part of the disconnect, no second event.
    let (dead_at, dead) = the_record(&kmsg, "block nbd2: Receive control failed (result ");
    let dead_event = nbd[&dead.seq];
    assert_eq!(dead_event.device.as_deref(), Some("nbd2"));
    assert_eq!(dead_event.raw, [dead.message.as_str()]);
    let (disconnect, _) = the_record(&kmsg, "block nbd2: NBD_DISCONNECT");
    let (shutdown, _) = the_record(&kmsg, "block nbd2: shutting down sockets");
    assert!(dead_at < disconnect && disconnect < shutdown);
    // nbd0, disconnected by the user after its server continued: an orderly shutdown.
    let (user, _) = the_record(&kmsg, "block nbd0: Disconnected due to user request.");
    let (shutdown, _) = the_record(&kmsg, "block nbd0: shutting down sockets");
    assert!(user < shutdown);
    assert_eq!(nbd.len(), 2, "nbd events: {nbd:#?}");

    // Nothing else: the boot log, the `Code:` records, the hung task's registers and the
    // disconnects made no event, and nothing was reported twice.
    let seqs: HashSet<u64> = events.iter().map(seq_of).collect();
    assert_eq!(seqs.len(), events.len(), "an event repeated");
    assert_eq!(
        events.len(),
        segfaults.len() + traps.len() + 1 + nbd.len(),
        "events: {:#?}",
        events
            .iter()
            .map(|e| (e.kind, e.pid, e.raw.first()))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "fault VM: {} kernel records, {} events: {:?}",
        kmsg.len(),
        events.len(),
        events.iter().map(|e| e.kind).collect::<Vec<_>>()
    );
}
