//! Hostile files where binaries and debug files are looked for: each gives a clear error,
//! in bounded time and memory, and never a panic.

mod support;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crds::{Address, CrashEvent, EventKind};
use node_agent::symbolize::dwarf::DebugInfo;
use node_agent::symbolize::elf::{ElfError, ElfFile};
use node_agent::symbolize::{Symbolize, SymbolizeError};
use support::{
    compile_crashy, have, install_by_build_id, require, run, split_debug, symbol_range, symbolizer,
};

fn event_at(offset: u64) -> CrashEvent {
    let mut event = CrashEvent::new(EventKind::Segfault);
    event.module = Some("crashy".into());
    event.module_offset = Some(Address(offset));
    event
}

fn needs_tools() -> bool {
    require(
        "needs gcc, objcopy, strip, readelf and nm",
        ["gcc", "objcopy", "strip", "readelf", "nm"]
            .iter()
            .all(|t| have(t)),
    )
}

/// The ELF64 section header of `name` in `data`: its offset in the file.
fn section_header(data: &[u8], name: &str) -> usize {
    let u16_at = |at: usize| u16::from_le_bytes(data[at..at + 2].try_into().unwrap()) as usize;
    let u64_at = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap()) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let strtab = u64_at(shoff + shstrndx * shentsize + 24);
    (0..shnum)
        .map(|i| shoff + i * shentsize)
        .find(|header| {
            let start = strtab + u32_at(*header);
            data[start..].starts_with(name.as_bytes()) && data[start + name.len()] == 0
        })
        .unwrap_or_else(|| panic!("no section {name}"))
}

#[test]
fn wrong_classes_and_sections_declaring_huge_sizes_are_errors() {
    if !needs_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("crashy");
    compile_crashy(&binary, &[]);
    let data = std::fs::read(&binary).unwrap();

    // A 64-bit file that says it is 32-bit (EI_CLASS), and one of no class at all.
    for class in [1u8, 0, 7] {
        let mut wrong = data.clone();
        wrong[4] = class;
        let err = ElfFile::parse(Path::new("wrong-class"), wrong.into()).unwrap_err();
        assert!(
            matches!(err, ElfError::Parse { .. }),
            "class {class}: {err}"
        );
    }

    // .debug_info claiming 2^47 bytes: refused before anything that size is allocated.
    let mut huge = data.clone();
    let header = section_header(&huge, ".debug_info");
    huge[header + 32..header + 40].copy_from_slice(&(1u64 << 47).to_le_bytes());
    let file = ElfFile::parse(Path::new("huge"), huge.into()).unwrap();
    let err = DebugInfo::load(&file, None).err().expect("refused");
    assert!(
        err.to_string()
            .contains(".debug_info lies outside the file"),
        "{err}"
    );

    // A section that starts beyond the end of the file.
    let mut beyond = data.clone();
    let header = section_header(&beyond, ".debug_line");
    beyond[header + 24..header + 32].copy_from_slice(&u64::MAX.to_le_bytes());
    // Refused either when the headers are parsed or when the DWARF is loaded, with a
    // clear error either way.
    match ElfFile::parse(Path::new("beyond"), beyond.into()) {
        Ok(file) => {
            let err = DebugInfo::load(&file, None).err().expect("refused");
            assert!(
                err.to_string()
                    .contains(".debug_line lies outside the file"),
                "{err}"
            );
        }
        Err(err) => assert!(matches!(err, ElfError::Parse { .. }), "{err}"),
    }
}

#[test]
fn files_that_are_not_regular_are_refused_without_reading_them() {
    let dir = tempfile::tempdir().unwrap();
    // A FIFO would block a plain open() forever; /dev/zero would never end.
    let fifo = dir.path().join("fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c_path is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let zero = dir.path().join("zero");
    symlink("/dev/zero", &zero).unwrap();
    for path in [&fifo, &zero, &dir.path().to_owned()] {
        let err = ElfFile::read(path).unwrap_err();
        assert!(matches!(err, ElfError::NotRegular { .. }), "{err}");
    }
    // A sparse file larger than the limit is refused by its size, unread.
    let big = dir.path().join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(5 << 30)
        .unwrap();
    assert!(matches!(
        ElfFile::read(&big).unwrap_err(),
        ElfError::TooLarge { .. }
    ));
}

#[test]
fn build_id_and_debuglink_loops_end_in_a_clear_error() {
    if !needs_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let binary = path("crashy");
    compile_crashy(&binary, &[]);
    split_debug(&binary, &path("crashy.debug"));
    let debug_dir = path("debug");
    let place = install_by_build_id(&binary, &path("crashy.debug"), &debug_dir);
    let (start, _) = symbol_range(&place, "read_null_offset");
    // The build-id file becomes a symlink loop: a → b → a.
    let saved = path("saved.debug");
    std::fs::rename(&place, &saved).unwrap();
    let other = place.with_extension("other");
    symlink(&other, &place).unwrap();
    symlink(&place, &other).unwrap();
    // …and the debuglink names a file that then becomes a symlink to itself.
    std::fs::write(path("loop.debug"), b"placeholder for the CRC").unwrap();
    run(
        "objcopy",
        &[
            &format!("--add-gnu-debuglink={}", path("loop.debug").display()),
            binary.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(path("loop.debug")).unwrap();
    symlink(path("loop.debug"), path("loop.debug")).unwrap();
    let err = symbolizer(&binary, vec![debug_dir.clone()], None)
        .symbolize(&mut event_at(start))
        .unwrap_err();
    assert!(
        matches!(err, SymbolizeError::NoDebugInfo { .. }),
        "a clear error naming the build-id: {err}"
    );
    assert!(err.to_string().contains("build-id"), "{err}");

    // Undo the loop: the same symbolizer setup finds the DWARF again.
    std::fs::remove_file(&place).unwrap();
    std::fs::rename(&saved, &place).unwrap();
    let mut event = event_at(start);
    symbolizer(&binary, vec![debug_dir], None)
        .symbolize(&mut event)
        .unwrap();
    assert_eq!(
        event.frames.first().and_then(|f| f.function.as_deref()),
        Some("read_null_offset")
    );
}

#[test]
fn a_binary_rewritten_while_it_is_read_gives_answers_or_errors_never_a_crash() {
    if !needs_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("crashy");
    compile_crashy(&binary, &[]);
    let whole = std::fs::read(&binary).unwrap();
    let (start, _) = symbol_range(&binary, "read_null_offset");
    let mut reference = event_at(start);
    symbolizer(&binary, Vec::new(), None)
        .symbolize(&mut reference)
        .unwrap();
    assert!(!reference.frames.is_empty());

    // A writer truncates and rewrites the file in place, over and over, while the
    // symbolizer reads it (in place: the same inode, as a careless upgrade would).
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU32::new(0));
    let writer = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        let (binary, whole) = (binary.clone(), whole.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let round = rounds.load(Ordering::Relaxed) as usize;
                let cut = whole.len() * (round % 7) / 7;
                std::fs::write(&binary, &whole[..cut]).unwrap();
                std::fs::write(&binary, &whole).unwrap();
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let symbolizer = symbolizer(&binary, Vec::new(), None);
    let (mut answered, mut refused) = (0, 0);
    let mut wrong = Vec::new();
    while rounds.load(Ordering::Relaxed) < 200 || answered + refused < 200 {
        let mut event = event_at(start);
        match symbolizer.symbolize(&mut event) {
            // Every version of the file is a prefix of the same bytes: whatever parses
            // says what the whole file says, or it is a wrong answer.
            Ok(()) if event.frames == reference.frames => answered += 1,
            Ok(()) => wrong.push(event.frames),
            Err(_) => refused += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        wrong.is_empty(),
        "{} wrong answers (and {answered} right, {refused} refused), first {:?}",
        wrong.len(),
        wrong.first()
    );
    assert!(
        refused > 0,
        "{answered} answers and no refusal: the reads never saw a half-written file"
    );
    // Once the file is whole again, the answer is the reference one.
    std::fs::write(&binary, &whole).unwrap();
    let mut last = event_at(start);
    symbolizer.symbolize(&mut last).unwrap();
    assert_eq!(last.frames, reference.frames);
}

/// Found by `cargo fuzz` (elf_symbolize): a subprogram whose `DW_AT_low_pc` plus offset-form
/// `DW_AT_high_pc` overflows. gimli adds them unchecked (a panic with overflow checks on);
/// the member analysis reads single ranges itself, with a checked add.
#[test]
fn fuzz_regression_a_high_pc_offset_that_overflows_is_no_range() {
    let data = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz/elf-high-pc-overflow.bin"),
    )
    .unwrap();
    let elf = ElfFile::parse(Path::new("fuzzed"), data.into()).unwrap();
    let debug = DebugInfo::load(&elf, None).unwrap();
    for segment in &elf.segments {
        for step in [0, 1, 0x10, 0x40, 0x100] {
            let vaddr = segment.vaddr.wrapping_add(step);
            let _ = debug.frames(vaddr);
            let _ = node_agent::symbolize::variables::UnitFacts::at(&debug, vaddr);
        }
    }
}

/// `nested_main.c` and `nested.S` built with `depth` nested namespaces around `deep()`,
/// and `inlined` nested inlined subroutines in it; returns the binary and the link-time
/// address of `deep`.
fn nested_build(dir: &Path, depth: u32, inlined: u32) -> (std::path::PathBuf, u64) {
    let programs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs");
    let binary = dir.join(format!("nested{depth}-{inlined}"));
    run(
        "gcc",
        &[
            "-O2",
            "-g",
            &format!("-DDEPTH={depth}"),
            &format!("-DINLINED={inlined}"),
            "-o",
            binary.to_str().unwrap(),
            programs.join("nested_main.c").to_str().unwrap(),
            programs.join("nested.S").to_str().unwrap(),
        ],
    );
    let (start, _) = symbol_range(&binary, "deep");
    (binary, start)
}

/// The member analysis walks namespaces recursively. 20,000 nested namespaces (hand-made
/// DWARF: 40 KiB) overflowed the stack, which aborts the whole agent whatever
/// `catch_unwind` does. Now the walk is bounded: the frames still come, and shallow
/// nesting still gets its member analysis.
#[test]
fn deeply_nested_namespaces_do_not_overflow_the_stack() {
    if !needs_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for depth in [3, 20_000] {
        let (binary, deep) = nested_build(dir.path(), depth, 0);
        let mut event = CrashEvent::new(EventKind::Segfault);
        event.module = Some(binary.file_name().unwrap().to_str().unwrap().to_owned());
        // A PIE whose text has p_offset == p_vaddr: the address is the file offset.
        event.module_offset = Some(Address(deep));
        event.fault_address = Some(Address(0x100));
        symbolizer(&binary, Vec::new(), None)
            .symbolize(&mut event)
            .unwrap_or_else(|e| panic!("depth {depth}: {e}"));
        assert_eq!(
            event.frames.first().and_then(|f| f.function.as_deref()),
            Some("deep"),
            "depth {depth}: {event:?}"
        );
        assert_eq!(
            event.instruction.as_deref(),
            Some("mov rax, [rdi+0x100]"),
            "depth {depth}"
        );
        if depth == 3 {
            let access = event.access.expect("member analysis at depth 3");
            assert_eq!(access.pointer.as_deref(), Some("n"));
            assert_eq!(access.member.as_deref(), Some("next"));
        }
    }
}

/// A debug file with a `.gnu_debugaltlink` naming `target` and `id`.
fn with_altlink(debug_file: &Path, target: &str, id: &[u8]) {
    let section = debug_file.with_extension("altlink");
    let mut content = target.as_bytes().to_vec();
    content.push(0);
    content.extend_from_slice(id);
    std::fs::write(&section, content).unwrap();
    run(
        "objcopy",
        &[
            "--remove-section=.gnu_debugaltlink",
            &format!("--add-section=.gnu_debugaltlink={}", section.display()),
            debug_file.to_str().unwrap(),
        ],
    );
}

/// `.gnu_debugaltlink` names a file by path: `..` or an absolute path could make the root
/// agent read any host file. Only files in the debug dirs and in the binary's own directory
/// are taken; the build-id lookup under the debug dirs still works.
#[test]
fn debugaltlink_paths_are_confined_to_the_debug_dirs_and_the_binarys_directory() {
    if !needs_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    for sub in ["bin", "debug/.build-id", "debug/.dwz", "elsewhere"] {
        std::fs::create_dir_all(path(sub)).unwrap();
    }
    let binary = path("bin/crashy");
    compile_crashy(&binary, &[]);
    split_debug(&binary, &path("crashy.debug"));
    let debug_dir = path("debug");
    let debug_file = install_by_build_id(&binary, &path("crashy.debug"), &debug_dir);
    // The "supplementary file": any ELF file with DWARF and a build-id will do; its
    // build-id goes into the link, so that only where it lies decides.
    let sup_source = path("sup-source");
    compile_crashy(&sup_source, &["-O0"]);
    let sup_id: Vec<u8> = (0..support::build_id(&sup_source).len() / 2)
        .map(|i| u8::from_str_radix(&support::build_id(&sup_source)[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let places = node_agent::symbolize::Places {
        root: "/".into(),
        proc_root: "/proc".into(),
        binaries: vec![binary.clone()],
        search_paths: Vec::new(),
        debug_dirs: vec![debug_dir.clone()],
        debuginfod: None,
    };
    let found = |target: &str| {
        with_altlink(&debug_file, target, &sup_id);
        let file = ElfFile::read(&debug_file).unwrap();
        assert!(file.debugaltlink.is_some());
        places
            .supplementary_file(&file, &binary)
            .map(|f| f.path.clone())
    };
    let place = |name: &str| {
        let target = path(name);
        std::fs::copy(&sup_source, &target).unwrap();
        target
    };
    // Outside: an absolute path, and `..` out of the debug dir.
    let outside = place("elsewhere/sup.debug");
    assert_eq!(found(outside.to_str().unwrap()), None, "absolute, outside");
    assert_eq!(
        found("../../../elsewhere/sup.debug"),
        None,
        "relative, escaping with .."
    );
    assert_eq!(found("/etc/passwd"), None);
    // A symlink inside the debug dir that leads outside is outside too.
    symlink(&outside, path("debug/.dwz/link.debug")).unwrap();
    assert_eq!(found(path("debug/.dwz/link.debug").to_str().unwrap()), None);
    std::fs::remove_file(path("debug/.dwz/link.debug")).unwrap();
    std::fs::remove_file(&outside).unwrap();
    // Inside: dwz's layout (relative, from .build-id/xx/ up to .dwz/), an absolute path in
    // a debug dir, and the binary's own directory.
    let dwz = std::fs::canonicalize(place("debug/.dwz/sup.debug")).unwrap();
    assert_eq!(found("../../.dwz/sup.debug"), Some(dwz.clone()));
    assert_eq!(found(dwz.to_str().unwrap()), Some(dwz.clone()));
    std::fs::remove_file(&dwz).unwrap();
    let beside = std::fs::canonicalize(place("bin/sup.debug")).unwrap();
    assert_eq!(found(beside.to_str().unwrap()), Some(beside.clone()));
}

/// addr2line parses a function's inlined subroutines recursively: 100,000 nested ones
/// overflowed the stack while the frames of `deep` were looked up. Units nested that deep
/// are not handed to addr2line: the symbol table still names the function.
#[test]
fn deeply_nested_inlined_subroutines_do_not_overflow_the_stack() {
    if !needs_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for inlined in [3, 100_000] {
        let (binary, deep) = nested_build(dir.path(), 1, inlined);
        let mut event = CrashEvent::new(EventKind::Segfault);
        event.module = Some(binary.file_name().unwrap().to_str().unwrap().to_owned());
        event.module_offset = Some(Address(deep));
        symbolizer(&binary, Vec::new(), None)
            .symbolize(&mut event)
            .unwrap_or_else(|e| panic!("{inlined} inlined: {e}"));
        assert_eq!(
            event.frames.first().and_then(|f| f.function.as_deref()),
            Some("deep"),
            "{inlined} inlined: {event:?}"
        );
        assert_eq!(event.instruction.as_deref(), Some("mov rax, [rdi+0x100]"));
        if inlined == 3 {
            // Shallow nesting keeps the DWARF: the member analysis still runs.
            let access = event.access.expect("member analysis");
            assert_eq!(access.member.as_deref(), Some("next"));
        }
    }
}
