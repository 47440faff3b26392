//! Symbolization against oracles: for every instruction of test programs built several ways,
//! our frames (function, file, line, column, inlined chain) must equal llvm-symbolizer's.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use crds::{Address, CrashEvent, EventKind};
use node_agent::symbolize::{Symbolize, Symbolizer};
use support::{compile_crashy, have, install_by_build_id, require, run, split_debug};

/// `(p_offset, p_vaddr)` of each PT_LOAD, from binutils' readelf.
fn loads(binary: &Path) -> Vec<(u64, u64, u64)> {
    run("readelf", &["-lW", binary.to_str().unwrap()])
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (hex(f[1]), hex(f[2]), hex(f[4]))
        })
        .collect()
}

/// Every instruction address of `.text`, from objdump.
fn instruction_addresses(binary: &Path) -> Vec<u64> {
    run(
        "objdump",
        &["-d", "--section=.text", binary.to_str().unwrap()],
    )
    .lines()
    .filter_map(|l| l.trim_start().split_once(":\t").map(|(a, _)| a))
    .filter_map(|a| u64::from_str_radix(a, 16).ok())
    .collect()
}

/// llvm-symbolizer's frames for each address, as (function, file, line, column) per frame.
fn oracle(
    binary: &Path,
    addresses: &[u64],
    debug_dir: Option<&Path>,
) -> Vec<Vec<(String, String, u32, u32)>> {
    let input: String = addresses.iter().map(|a| format!("{a:#x}\n")).collect();
    let mut command = Command::new("llvm-symbolizer");
    command
        .args(["--output-style=JSON", "--inlines", "--demangle", "--obj"])
        .arg(binary);
    if let Some(dir) = debug_dir {
        command.arg(format!("--debug-file-directory={}", dir.display()));
    }
    let output = support::output_with_stdin(&mut command, input.as_bytes());
    assert!(
        output.status.success(),
        "llvm-symbolizer: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    // One answer per address, in order: an empty or short answer must not pass as
    // agreement when it is zipped with our frames.
    assert_eq!(
        lines.len(),
        addresses.len(),
        "llvm-symbolizer answered {} of {} addresses for {}",
        lines.len(),
        addresses.len(),
        binary.display()
    );
    lines
        .iter()
        .zip(addresses)
        .map(|(json, address)| {
            assert_eq!(
                json["Address"].as_str(),
                Some(format!("{address:#x}").as_str()),
                "llvm-symbolizer answered out of order"
            );
            json["Symbol"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    // JSON output writes unknowns as "" where the text output writes "??".
                    let known = |v: &serde_json::Value| {
                        Some(v.as_str().unwrap())
                            .filter(|s| !s.is_empty())
                            .unwrap_or("??")
                            .to_owned()
                    };
                    (
                        known(&s["FunctionName"]),
                        known(&s["FileName"]),
                        s["Line"].as_u64().unwrap() as u32,
                        s["Column"].as_u64().unwrap() as u32,
                    )
                })
                .collect()
        })
        .collect()
}

fn ours(
    symbolizer: &Symbolizer,
    module: &str,
    file_offset: u64,
) -> Vec<(String, String, u32, u32)> {
    let mut event = CrashEvent::new(EventKind::Segfault);
    event.module = Some(module.to_owned());
    event.module_offset = Some(Address(file_offset));
    match symbolizer.symbolize(&mut event) {
        Ok(()) => event
            .frames
            .iter()
            .map(|f| {
                (
                    f.function.clone().unwrap_or("??".into()),
                    f.file.clone().unwrap_or("??".into()),
                    f.line.unwrap_or(0),
                    f.column.unwrap_or(0),
                )
            })
            .collect(),
        Err(_) => vec![("??".into(), "??".into(), 0, 0)],
    }
}

/// Frames equal except for two known differences between the cpp_demangle crate (used by
/// addr2line) and LLVM's demangler, in function names only: template literals print as
/// `(unsigned long)0` rather than `0ul`, and cpp_demangle collapses a forwarding reference
/// `T&&` with a non-reference `T` to `T` (LLVM prints `unsigned long&&`). Files, lines,
/// columns and the inlined chain must still be equal.
fn same_modulo_demangler(
    ours: &[(String, String, u32, u32)],
    theirs: &[(String, String, u32, u32)],
) -> bool {
    fn normalize(name: &str) -> String {
        let mut out = name.replace("(unsigned long)", "").replace("&&", "");
        for suffix in ["ul", "u", "l"] {
            for digit in '0'..='9' {
                out = out.replace(&format!("{digit}{suffix},"), &format!("{digit},"));
                out = out.replace(&format!("{digit}{suffix}>"), &format!("{digit}>"));
            }
        }
        out
    }
    ours.len() == theirs.len()
        && ours.iter().zip(theirs).all(|(a, b)| {
            (&a.1, a.2, a.3) == (&b.1, b.2, b.3) && normalize(&a.0) == normalize(&b.0)
        })
}

struct Build {
    name: &'static str,
    /// What is given to the symbolizer as the crashed module.
    binary: PathBuf,
    /// Where our symbolizer finds debug info by build-id, if separate.
    debug_dir: Option<PathBuf>,
    /// The file llvm-symbolizer is asked about. For stripped builds this is the separate
    /// debug file itself: it has the DWARF and the .symtab we also use, while the stripped
    /// binary has no symbols left, so llvm-symbolizer would know less than we do.
    oracle_file: PathBuf,
}

fn builds(dir: &Path) -> Vec<Build> {
    let path = |name: &str| dir.join(name);
    compile_crashy(&path("pie/crashy"), &[]);
    compile_crashy(&path("nopie/crashy"), &["-no-pie"]);
    compile_crashy(&path("compressed/crashy"), &["-gz=zlib"]);
    // Stripped, with the debug file found by build-id under a debug dir.
    compile_crashy(&path("buildid/crashy"), &[]);
    split_debug(&path("buildid/crashy"), &path("buildid/crashy.debug"));
    let debug_dir = path("buildid/debug");
    let by_build_id = install_by_build_id(
        &path("buildid/crashy"),
        &path("buildid/crashy.debug"),
        &debug_dir,
    );
    // Stripped, with a .gnu_debuglink to a debug file beside it.
    compile_crashy(&path("debuglink/crashy"), &[]);
    split_debug(&path("debuglink/crashy"), &path("debuglink/crashy.debug"));
    let link = format!(
        "--add-gnu-debuglink={}",
        path("debuglink/crashy.debug").display()
    );
    run(
        "objcopy",
        &[&link, path("debuglink/crashy").to_str().unwrap()],
    );
    // C++: namespaces, templates, virtual functions and lambdas, demangled.
    let shapes = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/shapes.cc");
    run(
        "g++",
        &[
            "-O2",
            "-g",
            "-o",
            path("cpp/shapes").to_str().unwrap(),
            shapes.to_str().unwrap(),
        ],
    );
    vec![
        Build {
            name: "cpp",
            binary: path("cpp/shapes"),
            debug_dir: None,
            oracle_file: path("cpp/shapes"),
        },
        Build {
            name: "pie",
            binary: path("pie/crashy"),
            debug_dir: None,
            oracle_file: path("pie/crashy"),
        },
        Build {
            name: "nopie",
            binary: path("nopie/crashy"),
            debug_dir: None,
            oracle_file: path("nopie/crashy"),
        },
        Build {
            name: "compressed",
            binary: path("compressed/crashy"),
            debug_dir: None,
            oracle_file: path("compressed/crashy"),
        },
        Build {
            name: "buildid",
            binary: path("buildid/crashy"),
            debug_dir: Some(debug_dir),
            oracle_file: by_build_id,
        },
        Build {
            name: "debuglink",
            binary: path("debuglink/crashy"),
            debug_dir: None,
            oracle_file: path("debuglink/crashy.debug"),
        },
    ]
}

fn symbolizer_for(binary: &Path, debug_dirs: Vec<PathBuf>) -> Symbolizer {
    support::symbolizer(binary, debug_dirs, None)
}

#[test]
fn every_instruction_of_every_build_symbolizes_like_llvm_symbolizer() {
    if !require(
        "needs llvm-symbolizer, objcopy, readelf, objdump, gcc and g++",
        [
            "llvm-symbolizer",
            "objcopy",
            "readelf",
            "objdump",
            "gcc",
            "g++",
        ]
        .iter()
        .all(|t| have(t)),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for sub in ["pie", "nopie", "compressed", "buildid", "debuglink", "cpp"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    for build in builds(dir.path()) {
        let addresses = instruction_addresses(&build.binary);
        assert!(
            addresses.len() > 50,
            "{}: only {} instructions",
            build.name,
            addresses.len()
        );
        let expected = oracle(&build.oracle_file, &addresses, None);
        // Through addr2line, then through the symbol index the first lookup builds.
        for indexed in [false, true] {
            let index_dir = tempfile::tempdir().unwrap();
            let mut symbolizer =
                symbolizer_for(&build.binary, build.debug_dir.iter().cloned().collect());
            if indexed {
                symbolizer = symbolizer.with_index_dir(index_dir.path().to_owned());
            }
            let lookups_before = symbolizer.lookups();
            let mismatches = compare_with_oracle(&build, &symbolizer, &addresses, &expected);
            assert_no_mismatches(
                &format!("{} (index: {indexed})", build.name),
                &mismatches,
                addresses.len(),
            );
            if indexed {
                symbolizer.wait_for_indexes();
                let built = std::fs::read_dir(index_dir.path()).unwrap().count();
                assert_eq!(built, 1, "{}: one index built", build.name);
                // A new symbolizer, as after a restart: it finds the index and answers
                // every address through it.
                let restarted =
                    symbolizer_for(&build.binary, build.debug_dir.iter().cloned().collect())
                        .with_index_dir(index_dir.path().to_owned());
                let before = restarted.lookups();
                let mismatches = compare_with_oracle(&build, &restarted, &addresses, &expected);
                let after = restarted.lookups();
                assert_no_mismatches(
                    &format!("{} through its index", build.name),
                    &mismatches,
                    addresses.len(),
                );
                assert_eq!(
                    (
                        after.indexed - before.indexed,
                        after.to_addr2line - before.to_addr2line
                    ),
                    (addresses.len() as u64, 0),
                    "{}: every lookup through the index, none asking addr2line",
                    build.name
                );
            } else {
                let after = symbolizer.lookups();
                assert_eq!(
                    (
                        after.indexed - lookups_before.indexed,
                        after.in_memory - lookups_before.in_memory,
                        after.to_addr2line - lookups_before.to_addr2line
                    ),
                    (0, addresses.len() as u64, 0),
                    "{}: every lookup through unit tables made in memory, none asking addr2line",
                    build.name
                );
            }
        }
    }
}

/// Fails with the first ten of `mismatches`, if there are any, out of `total` addresses.
fn assert_no_mismatches(what: &str, mismatches: &[String], total: usize) {
    assert!(
        mismatches.is_empty(),
        "{what}: {} of {total} addresses differ:\n{}",
        mismatches.len(),
        mismatches[..mismatches.len().min(10)].join("\n")
    );
}

/// Our frames for each address against llvm-symbolizer's: the differences.
fn compare_with_oracle(
    build: &Build,
    symbolizer: &Symbolizer,
    addresses: &[u64],
    expected: &[Vec<(String, String, u32, u32)>],
) -> Vec<String> {
    let segments = loads(&build.binary);
    let mut mismatches = Vec::new();
    let mut names_only = Vec::new();
    for (address, expected) in addresses.iter().zip(expected) {
        let (offset, vaddr, _) = segments
            .iter()
            .copied()
            .find(|(_, vaddr, size)| (*vaddr..vaddr + size).contains(address))
            .unwrap();
        let module = build.binary.file_name().unwrap().to_str().unwrap();
        let actual = ours(symbolizer, module, address - vaddr + offset);
        let same = if build.name == "cpp" {
            let locations = |f: &[(String, String, u32, u32)]| {
                f.iter()
                    .map(|(_, file, line, column)| (file.clone(), *line, *column))
                    .collect::<Vec<_>>()
            };
            if locations(&actual) == locations(expected)
                && !same_modulo_demangler(&actual, expected)
            {
                names_only.push(*address);
                true
            } else {
                same_modulo_demangler(&actual, expected)
            }
        } else {
            &actual == expected
        };
        if !same {
            mismatches.push(format!(
                "{address:#x}: ours {actual:?}\n   llvm-symbolizer {expected:?}"
            ));
        }
    }
    // cpp_demangle 0.5.1 also drops the parameter list of some template constructors
    // (`_Head_base<Shape*&>()` for LLVM's `_Head_base<Shape*&>(Shape*&)`): such names
    // may differ at no more than 1 address in 100, with every location still equal.
    if names_only.len() * 100 > addresses.len() {
        mismatches.push(format!(
            "{} names differ: {names_only:x?}",
            names_only.len()
        ));
    }
    mismatches
}

#[test]
fn libc_resolves_through_libc6_dbg_by_build_id() {
    let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
    if !require(
        "needs libc6-dbg and llvm-symbolizer",
        Path::new("/usr/lib/debug/.build-id").is_dir() && have("llvm-symbolizer"),
    ) {
        return;
    }
    let symbolizer = symbolizer_for(libc, vec!["/usr/lib/debug".into()]);
    let (offset, vaddr, size) = loads(libc)
        .into_iter()
        .find(|(_, _, _)| true)
        .map(|_| ())
        .and_then(|_| {
            let text = run("readelf", &["-SW", libc.to_str().unwrap()]);
            text.lines().find(|l| l.contains(" .text ")).map(|l| {
                let f: Vec<&str> = l.split(']').nth(1).unwrap().split_whitespace().collect();
                let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
                (hex(f[3]), hex(f[2]), hex(f[4]))
            })
        })
        .unwrap();
    // Every 4099th byte of .text: a spread of functions, inlined code included.
    let addresses: Vec<u64> = (vaddr..vaddr + size).step_by(4099).collect();
    let expected = oracle(libc, &addresses, Some(Path::new("/usr/lib/debug")));
    let mut compared = 0;
    for (address, expected) in addresses.iter().zip(&expected) {
        let actual = ours(&symbolizer, "libc.so.6", address - vaddr + offset);
        // Alias names differ between tools (free / cfree / __GI___libc_free), so compare
        // where the code is. Known difference: for DWARF 5 units whose relative comp_dir is
        // repeated as include_directories[0] (libc's "./csu"), LLVM and binutils print
        // "./csu/./csu/init-first.c" and addr2line-rs "./csu/init-first.c"; the file's base
        // name and the line are compared until paths are rendered the LLVM way.
        let places = |frames: &[(String, String, u32, u32)]| {
            frames
                .iter()
                .map(|f| (f.1.rsplit('/').next().unwrap_or_default().to_owned(), f.2))
                .collect::<Vec<_>>()
        };
        assert_eq!(places(&actual), places(expected), "libc {address:#x}");
        compared += 1;
    }
    assert!(compared > 100, "{compared}");
}

/// Builds crashy with zlib-compressed DWARF into `dir`.
fn compressed_build(dir: &Path) -> PathBuf {
    let binary = dir.join("crashy");
    compile_crashy(&binary, &["-gz=zlib"]);
    binary
}

#[test]
fn truncated_binaries_give_errors_never_panics() {
    use node_agent::symbolize::dwarf::DebugInfo;
    use node_agent::symbolize::elf::ElfFile;
    if !require("needs gcc", have("gcc")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = std::fs::read(compressed_build(dir.path())).unwrap();
    // The section headers sit at the end of the file, so every cut copy is refused whole.
    for len in (0..data.len()).step_by(61) {
        let err = ElfFile::parse(Path::new("cut"), data[..len].into())
            .err()
            .unwrap_or_else(|| panic!("a {len}-byte cut parsed"));
        assert!(
            err.to_string().starts_with("cut is not a valid ELF file"),
            "{err}"
        );
    }
    // Damage inside the file (headers intact): DWARF and symbols are parsed from garbage.
    let (mut loaded, mut refused) = (0, 0);
    for at in (0x40..data.len() - 0x1000).step_by(53) {
        let mut damaged = data.clone();
        damaged[at..at + 16].fill(0xff);
        let file = match ElfFile::parse(Path::new("damaged"), damaged.into()) {
            Ok(file) => file,
            Err(err) => {
                // Refused, and with a clear message, not a panic or another kind of error.
                assert!(
                    err.to_string()
                        .starts_with("damaged is not a valid ELF file"),
                    "at {at:#x}: {err}"
                );
                refused += 1;
                continue;
            }
        };
        if let Ok(info) = DebugInfo::load(&file, None) {
            loaded += 1;
            for vaddr in (0x1000..0x1400).step_by(7) {
                let _ = info.frames(vaddr);
                let _ = info.symbol(vaddr);
            }
        }
    }
    assert!(
        loaded > 100,
        "only {loaded} damaged copies loaded: the loop tested little"
    );
    // Damage to the program or section headers (at 0x40 on, and at the end, which the
    // loop spares) must be refused sometimes: else the parse check above never ran.
    assert!(refused > 0, "no damaged copy was refused");
    let whole = ElfFile::parse(Path::new("whole"), data.clone().into()).unwrap();
    assert!(DebugInfo::load(&whole, None).unwrap().has_dwarf());
}

#[test]
fn a_compressed_section_that_lies_about_its_size_is_rejected() {
    use node_agent::symbolize::dwarf::{DebugInfo, DebugInfoError};
    use node_agent::symbolize::elf::ElfFile;
    use object::{Object, ObjectSection};
    if !require("needs gcc", have("gcc")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut data = std::fs::read(compressed_build(dir.path())).unwrap();
    let offset = {
        let object = object::File::parse(&*data).unwrap();
        let section = object.section_by_name(".debug_info").unwrap();
        assert_eq!(
            section.compressed_file_range().unwrap().format,
            object::CompressionFormat::Zlib
        );
        section.file_range().unwrap().0 as usize
    };
    // Elf64_Chdr: ch_type (4), ch_reserved (4), ch_size (8): claim 1 TiB.
    data[offset + 8..offset + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let file = ElfFile::parse(Path::new("liar"), data.into()).unwrap();
    match DebugInfo::load(&file, None) {
        Err(err @ DebugInfoError::CompressedSizeLie { .. }) => {
            assert!(
                err.to_string()
                    .contains(".debug_info claims 1099511627776 bytes"),
                "{err}"
            )
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a 1 TiB claim was accepted"),
    }
}

#[test]
fn dwz_debug_files_resolve_through_their_supplementary_file() {
    if !require(
        "needs dwz, llvm-symbolizer, objcopy, readelf, objdump and gcc",
        [
            "dwz",
            "llvm-symbolizer",
            "objcopy",
            "readelf",
            "objdump",
            "gcc",
        ]
        .iter()
        .all(|t| have(t)),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    // Two programs, so that dwz has something common to move into the supplementary file.
    compile_crashy(&path("crashy"), &[]);
    compile_crashy(&path("oracle-crashy"), &[]);
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/nullmember.c");
    run(
        "gcc",
        &[
            "-O2",
            "-g",
            "-o",
            path("other").to_str().unwrap(),
            other.to_str().unwrap(),
        ],
    );
    split_debug(&path("crashy"), &path("crashy.debug"));
    split_debug(&path("other"), &path("other.debug"));
    let common = path("common.debug");
    run(
        "dwz",
        &[
            "-m",
            common.to_str().unwrap(),
            "-M",
            common.to_str().unwrap(),
            path("crashy.debug").to_str().unwrap(),
            path("other.debug").to_str().unwrap(),
        ],
    );
    let sections = run("readelf", &["-SW", path("crashy.debug").to_str().unwrap()]);
    assert!(
        sections.contains(".gnu_debugaltlink"),
        "dwz made no supplementary file:\n{sections}"
    );
    let debug_dir = path("debug");
    install_by_build_id(&path("crashy"), &path("crashy.debug"), &debug_dir);

    let addresses = instruction_addresses(&path("oracle-crashy"));
    let expected = oracle(&path("oracle-crashy"), &addresses, None);
    let compare = |what: &str| {
        let symbolizer = symbolizer_for(&path("crashy"), vec![debug_dir.clone()]);
        let differing: Vec<String> = addresses
            .iter()
            .zip(&expected)
            .filter_map(|(address, expected)| {
                let actual = ours(&symbolizer, "crashy", *address);
                (&actual != expected).then(|| format!("{address:#x}: {actual:?} vs {expected:?}"))
            })
            .collect();
        assert!(
            differing.is_empty(),
            "{what}: {} of {} differ:\n{}",
            differing.len(),
            addresses.len(),
            differing[..differing.len().min(10)].join("\n")
        );
    };
    // The supplementary file at the absolute path the link names…
    compare("at the linked path");
    // …and, moved away, by its build-id under the debug dir.
    install_by_build_id(&common, &common, &debug_dir);
    assert!(!common.exists());
    compare("by build-id");
}

/// The aarch64 cross tools (Debian's gcc-aarch64-linux-gnu and binutils-aarch64-linux-gnu).
const AARCH64_TOOLS: [&str; 4] = [
    "aarch64-linux-gnu-gcc",
    "aarch64-linux-gnu-objcopy",
    "aarch64-linux-gnu-strip",
    "aarch64-linux-gnu-readelf",
];

/// Compiles test programs for aarch64 with `-O2 -g` and `extra` flags.
fn compile_aarch64(out: &Path, sources: &[&str], extra: &[&str]) {
    let programs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs");
    let mut args: Vec<String> = ["-O2", "-g", "-pthread"].map(String::from).to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["-o".to_owned(), out.display().to_string()]);
    args.extend(
        sources
            .iter()
            .map(|s| programs.join(s).display().to_string()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("aarch64-linux-gnu-gcc", &args);
}

/// Moves an aarch64 binary's debug information into `debug_file` and strips the binary.
fn split_debug_aarch64(binary: &Path, debug_file: &Path) {
    let (binary, debug_file) = (binary.to_str().unwrap(), debug_file.to_str().unwrap());
    run(
        "aarch64-linux-gnu-objcopy",
        &["--only-keep-debug", binary, debug_file],
    );
    run("aarch64-linux-gnu-strip", &["--strip-all", binary]);
}

/// The address and size of `.text`, from binutils' readelf.
fn text_section(binary: &Path) -> (u64, u64) {
    run(
        "aarch64-linux-gnu-readelf",
        &["-SW", binary.to_str().unwrap()],
    )
    .lines()
    .find(|l| l.contains(" .text "))
    .map(|l| {
        let f: Vec<&str> = l.split(']').nth(1).unwrap().split_whitespace().collect();
        let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
        (hex(f[2]), hex(f[4]))
    })
    .expect("a .text section")
}

/// aarch64 builds of the test programs: PIE and not, compressed DWARF, and stripped with
/// the DWARF in a separate file found by build-id or by `.gnu_debuglink`.
fn aarch64_builds(dir: &Path) -> Vec<Build> {
    let path = |name: &str| dir.join(name);
    for sub in [
        "pie",
        "nopie",
        "compressed",
        "buildid",
        "debuglink",
        "member",
    ] {
        std::fs::create_dir_all(path(sub)).unwrap();
    }
    let crashy = ["crashy.c"];
    compile_aarch64(&path("pie/crashy"), &crashy, &[]);
    compile_aarch64(&path("nopie/crashy"), &crashy, &["-no-pie"]);
    compile_aarch64(&path("compressed/crashy"), &crashy, &["-gz=zlib"]);
    compile_aarch64(&path("buildid/crashy"), &crashy, &[]);
    split_debug_aarch64(&path("buildid/crashy"), &path("buildid/crashy.debug"));
    let by_build_id = install_by_build_id(
        &path("buildid/crashy"),
        &path("buildid/crashy.debug"),
        &path("buildid/debug"),
    );
    compile_aarch64(&path("debuglink/crashy"), &crashy, &[]);
    split_debug_aarch64(&path("debuglink/crashy"), &path("debuglink/crashy.debug"));
    run(
        "aarch64-linux-gnu-objcopy",
        &[
            &format!(
                "--add-gnu-debuglink={}",
                path("debuglink/crashy.debug").display()
            ),
            path("debuglink/crashy").to_str().unwrap(),
        ],
    );
    // The member test program, as the NULL-member test builds it.
    compile_aarch64(
        &path("member/qemu-nbd"),
        &["nullmember.c", "fault_report.c"],
        &["-fomit-frame-pointer"],
    );
    split_debug_aarch64(&path("member/qemu-nbd"), &path("member/qemu-nbd.debug"));
    let member_debug = install_by_build_id(
        &path("member/qemu-nbd"),
        &path("member/qemu-nbd.debug"),
        &path("member/debug"),
    );
    let plain = |name: &'static str, binary: PathBuf| Build {
        name,
        oracle_file: binary.clone(),
        binary,
        debug_dir: None,
    };
    vec![
        plain("aarch64 pie", path("pie/crashy")),
        plain("aarch64 nopie", path("nopie/crashy")),
        plain("aarch64 compressed", path("compressed/crashy")),
        Build {
            name: "aarch64 buildid",
            binary: path("buildid/crashy"),
            debug_dir: Some(path("buildid/debug")),
            oracle_file: by_build_id,
        },
        Build {
            name: "aarch64 debuglink",
            binary: path("debuglink/crashy"),
            debug_dir: None,
            oracle_file: path("debuglink/crashy.debug"),
        },
        Build {
            name: "aarch64 member",
            binary: path("member/qemu-nbd"),
            debug_dir: Some(path("member/debug")),
            oracle_file: member_debug,
        },
    ]
}

#[test]
fn every_instruction_of_aarch64_builds_symbolizes_like_llvm_symbolizer() {
    if !require(
        "needs llvm-symbolizer and the aarch64 cross tools (gcc-aarch64-linux-gnu)",
        have("llvm-symbolizer") && AARCH64_TOOLS.iter().all(|t| have(t)),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for build in aarch64_builds(dir.path()) {
        // A64 instructions are 4 bytes: every word of .text is one.
        let (text, size) = text_section(&build.binary);
        let addresses: Vec<u64> = (text..text + size).step_by(4).collect();
        assert!(
            addresses.len() > 200,
            "{}: only {} instructions",
            build.name,
            addresses.len()
        );
        let expected = oracle(&build.oracle_file, &addresses, None);
        let symbolizer = symbolizer_for(&build.binary, build.debug_dir.iter().cloned().collect());
        let segments = loads(&build.binary);
        let module = build.binary.file_name().unwrap().to_str().unwrap();
        let mut mismatches = Vec::new();
        let mut known = 0;
        for (address, expected) in addresses.iter().zip(&expected) {
            let (offset, vaddr, _) = segments
                .iter()
                .copied()
                .find(|(_, vaddr, size)| (*vaddr..vaddr + size).contains(address))
                .unwrap();
            let actual = ours(&symbolizer, module, address - vaddr + offset);
            if actual.iter().any(|f| f.2 != 0) {
                known += 1;
            }
            if &actual != expected {
                mismatches.push(format!(
                    "{address:#x}: ours {actual:?}\n   llvm-symbolizer {expected:?}"
                ));
            }
        }
        // Agreement on unknowns alone would prove nothing (the C runtime's start-up code in
        // .text has no line information).
        assert!(
            known * 3 >= addresses.len() * 2,
            "{}: only {known} of {} addresses have a line",
            build.name,
            addresses.len()
        );
        assert!(
            mismatches.is_empty(),
            "{}: {} of {} addresses differ:\n{}",
            build.name,
            mismatches.len(),
            addresses.len(),
            mismatches[..mismatches.len().min(10)].join("\n")
        );
    }
}

/// The file offset of the symbol `name` in `binary`, from object's own parser.
fn file_offset_of(binary: &Path, name: &str) -> u64 {
    use object::{Object, ObjectSegment, ObjectSymbol};
    let data = std::fs::read(binary).unwrap();
    let object = object::File::parse(&*data).unwrap();
    let address = object
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("{name} in {}", binary.display()))
        .address();
    let segment = object
        .segments()
        .find(|s| (s.address()..s.address() + s.size()).contains(&address))
        .unwrap();
    address - segment.address() + segment.file_range().0
}

#[test]
fn compressed_sections_too_large_for_memory_are_read_from_a_scratch_file() {
    use object::{Object, ObjectSection};
    if !require("needs gcc and objcopy", have("gcc") && have("objcopy")) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    compile_crashy(&path("plain"), &[]);
    // .debug_str grown by 4 MiB of pseudo-random bytes (zeros would compress more than the
    // 1000:1 a section may claim): decompressed, it exceeds the 1 MiB kept in memory, so it
    // goes to an unlinked scratch file and is read by the page from there.
    run(
        "objcopy",
        &[
            &format!("--dump-section=.debug_str={}", path("str").display()),
            path("plain").to_str().unwrap(),
        ],
    );
    let mut strings = std::fs::read(path("str")).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    strings.extend((0..4 << 20).map(|_| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 59) as u8 + b'a'
    }));
    std::fs::write(path("str"), strings).unwrap();
    run(
        "objcopy",
        &[
            &format!("--update-section=.debug_str={}", path("str").display()),
            path("plain").to_str().unwrap(),
            path("grown").to_str().unwrap(),
        ],
    );
    let offset = file_offset_of(&path("plain"), "read_null_offset");
    let expected = ours(&symbolizer_for(&path("grown"), Vec::new()), "grown", offset);
    assert_eq!(expected[0].0, "read_null_offset", "{expected:?}");
    assert!(expected[0].1.ends_with("crashy.c"), "{expected:?}");
    for format in ["zlib", "zstd"] {
        let name = format!("crashy-{format}");
        run(
            "objcopy",
            &[
                &format!("--compress-debug-sections={format}"),
                path("grown").to_str().unwrap(),
                path(&name).to_str().unwrap(),
            ],
        );
        let data = std::fs::read(path(&name)).unwrap();
        let object = object::File::parse(&*data).unwrap();
        let strings = object
            .section_by_name(".debug_str")
            .unwrap()
            .compressed_file_range()
            .unwrap();
        assert_ne!(strings.format, object::CompressionFormat::None, "{format}");
        assert!(strings.uncompressed_size > 1 << 20, "{format}");
        let actual = ours(&symbolizer_for(&path(&name), Vec::new()), &name, offset);
        assert_eq!(actual, expected, "{format}");
    }
}

/// Every address of `binary`'s code, symbolized by `symbolizer`.
fn all_frames(symbolizer: &Symbolizer, binary: &Path) -> Vec<Vec<(String, String, u32, u32)>> {
    let segments = loads(binary);
    let module = binary.file_name().unwrap().to_str().unwrap();
    instruction_addresses(binary)
        .iter()
        .map(|address| {
            let (offset, vaddr, _) = segments
                .iter()
                .copied()
                .find(|(_, vaddr, size)| (*vaddr..vaddr + size).contains(address))
                .unwrap();
            ours(symbolizer, module, address - vaddr + offset)
        })
        .collect()
}

/// The file offset of `main`'s first instruction.
fn first_line_offset(binary: &Path) -> u64 {
    let symbols = run("nm", &[binary.to_str().unwrap()]);
    let main = symbols
        .lines()
        .find_map(|l| l.strip_suffix(" T main"))
        .map(|a| u64::from_str_radix(a, 16).unwrap())
        .unwrap();
    let (offset, vaddr, _) = loads(binary)
        .into_iter()
        .find(|(_, vaddr, size)| (*vaddr..vaddr + size).contains(&main))
        .unwrap();
    main - vaddr + offset
}

#[test]
fn a_damaged_or_foreign_symbol_index_is_not_used_and_is_built_again() {
    if !require(
        "needs gcc, nm, readelf and objdump",
        ["gcc", "nm", "readelf", "objdump"].iter().all(|t| have(t)),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (binary, other) = (dir.path().join("crashy"), dir.path().join("other/crashy"));
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    compile_crashy(&binary, &[]);
    compile_crashy(&other, &["-O1"]);
    let plain = all_frames(&symbolizer_for(&binary, Vec::new()), &binary);
    let named = plain
        .iter()
        .filter(|f| f[0].0 != "??" && f[0].2 > 0)
        .count();
    assert!(
        named > 50,
        "{named} of {} addresses have a line",
        plain.len()
    );
    let indexes = dir.path().join("indexes");
    let indexed = || symbolizer_for(&binary, Vec::new()).with_index_dir(indexes.clone());
    let first = indexed();
    all_frames(&first, &binary);
    first.wait_for_indexes();
    let index_of = |b: &Path| {
        let id = run("readelf", &["-n", b.to_str().unwrap()]);
        let id = id
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .unwrap()
            .to_owned();
        indexes.join(format!("{id}.index"))
    };
    let index = index_of(&binary);
    let good = std::fs::read(&index).expect("the index was built");

    // The other build's index under this build's name: a foreign file.
    let foreign = {
        let other_symbolizer = symbolizer_for(&other, Vec::new()).with_index_dir(indexes.clone());
        all_frames(&other_symbolizer, &other);
        other_symbolizer.wait_for_indexes();
        std::fs::read(index_of(&other)).unwrap()
    };
    let mut flipped = good.clone();
    let last = flipped.len() - 20;
    flipped[last] ^= 0x40;
    let damaged: [(&str, Vec<u8>); 5] = [
        ("one byte flipped in an entry", flipped),
        ("cut short", good[..good.len() - 24].to_vec()),
        ("only a header", good[..136].to_vec()),
        ("empty", Vec::new()),
        ("another build's index", foreign),
    ];
    // What a build killed half-way leaves: a temporary file, removed by the next build.
    let stray = index.with_extension("tmp.4194304");
    std::fs::write(&stray, b"half an index").unwrap();
    for (what, bytes) in damaged {
        std::fs::write(&index, &bytes).unwrap();
        let symbolizer = indexed();
        let before = symbolizer.lookups();
        let main_offset = first_line_offset(&binary);
        let frames = ours(&symbolizer, "crashy", main_offset);
        assert_eq!(
            symbolizer.lookups().indexed,
            before.indexed,
            "{what}: the index was not used"
        );
        assert!(frames[0].2 > 0, "{what}: {frames:?}");
        symbolizer.wait_for_indexes();
        assert_eq!(std::fs::read(&index).unwrap(), good, "{what}: built again");
        assert!(
            !stray.exists(),
            "{what}: the killed build's temporary file is gone"
        );
        // Once built again, the index is used, with the same answers.
        assert_eq!(
            all_frames(&symbolizer, &binary),
            plain,
            "{what}: same answers"
        );
        assert!(
            symbolizer.lookups().indexed > before.indexed,
            "{what}: the new index is used"
        );
    }
}
