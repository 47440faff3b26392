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
    let file = ElfFile::parse(Path::new("beyond"), beyond.into());
    if let Ok(file) = file {
        assert!(DebugInfo::load(&file, None).is_err());
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
    while rounds.load(Ordering::Relaxed) < 200 || answered + refused < 200 {
        let mut event = event_at(start);
        match symbolizer.symbolize(&mut event) {
            Ok(()) => {
                // A half-written file may parse, but what it says must be what it is.
                if event.frames == reference.frames {
                    answered += 1;
                } else {
                    refused += 1;
                }
            }
            Err(_) => refused += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
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
