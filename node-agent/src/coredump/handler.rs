//! `crashwatch-agent coredump …`: what the kernel runs for each core dump (see [`super`]).
//! It reads the crashed thread's registers from the head of the core stream, walks the stack
//! through `/proc/PID/mem` with the modules' CFI while the kernel keeps the process, names the
//! pod, symbolizes every frame from the container's own files, spools the event for the
//! agent, and passes the whole dump on to the previous handler. It keeps no core file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crds::{Address, CrashEvent, EventKind, Frame};

use super::core_notes::{self, CoreFacts, RIP, RSP};
use super::pattern::{Destination, Specifiers, destination};
use super::unwind::{self, Cfi, MappedCfi, Memory, Modules};
use super::{HandlerConfig, Spool, attribute};
use crate::symbolize::elf::ElfFile;
use crate::symbolize::mapping::LoadSegment;
use crate::symbolize::{Places, Symbolize, Symbolizer, mapping};

/// The longest the handler waits for the previous handler after passing the dump on.
const CHAINED_WAIT: Duration = Duration::from_secs(30);
/// What the handler's symbolizer may cache: it lives for one crash.
const CACHE_BYTES: usize = 64 << 20;

/// Runs the handler for one dump: `args` are the pattern's specifiers, stdin is the core.
/// Never fails in a way that loses the previous handler's dump: errors are logged to the
/// kernel log and the dump is passed on regardless.
pub fn run(args: &[String]) -> io::Result<()> {
    let specifiers = match Specifiers::from_args(args) {
        Ok(s) => s,
        Err(err) => {
            log_to_kmsg(&err);
            return Err(io::Error::new(io::ErrorKind::InvalidInput, err));
        }
    };
    let state_dir = state_dir_of_handler()?;
    let _in_flight = Spool::in_state_dir(&state_dir).mark_in_flight(&specifiers.global_tid);
    let config = HandlerConfig::load(&state_dir).unwrap_or_default();
    let pid: u32 = specifiers.global_pid.parse().unwrap_or(0);
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let mut specifiers = specifiers;
    if let Ok(exe) = std::fs::read_link(proc_dir.join("exe")) {
        let exe = exe
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_owned();
        specifiers.exe_path = exe.replace('/', "!");
        specifiers.exe_name = exe.rsplit('/').next().unwrap_or_default().to_owned();
    }
    let uses_pid =
        std::fs::read_to_string("/proc/sys/kernel/core_uses_pid").is_ok_and(|v| v.trim() != "0");
    let mut chained = Chained::start(
        destination(&config.previous.pattern, &specifiers, uses_pid),
        &specifiers,
        &proc_dir,
    );

    let mut stdin = io::stdin().lock();
    let head = read_head(&mut stdin);
    chained.write(&head.bytes);
    match head.facts {
        Ok(facts) => {
            let analysis = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                analyse(&facts, &specifiers, &proc_dir, &config)
            }));
            match analysis {
                Ok(Some(event)) => {
                    if let Err(err) = Spool::in_state_dir(&state_dir).write(&event) {
                        log_to_kmsg(&format!("cannot spool the crash of pid {pid}: {err}"));
                    }
                }
                Ok(None) => {}
                Err(_) => log_to_kmsg(&format!("analysing the crash of pid {pid} panicked")),
            }
        }
        Err(err) => log_to_kmsg(&format!("cannot read the core of pid {pid}: {err}")),
    }
    // The rest of the dump: to the previous handler, or drained so the kernel finishes.
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        match stdin.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => chained.write(&buffer[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    chained.finish();
    Ok(())
}

/// The state dir, from where this binary lies: `STATE/bin/crashwatch-agent`.
fn state_dir_of_handler() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_owned)
        .ok_or_else(|| io::Error::other("the handler binary lies in no state dir"))
}

/// Writes one line to the kernel log, where a handler's trouble can be seen
/// (`dmesg | grep crashwatch`); its stderr goes nowhere.
fn log_to_kmsg(message: &str) {
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        // One write is one record.
        let line = format!("crashwatch core handler: {message}\n");
        let _ = kmsg.write_all(line.as_bytes());
    }
}

/// The head of the core stream: its bytes (passed on as read) and the facts in its notes.
struct Head {
    bytes: Vec<u8>,
    facts: Result<CoreFacts, String>,
}

/// Reads the ELF header, the first program header and the notes.
fn read_head(input: &mut impl Read) -> Head {
    let mut bytes = Vec::new();
    let mut fill = |bytes: &mut Vec<u8>, upto: u64| -> bool {
        let want = upto.saturating_sub(bytes.len() as u64);
        if want == 0 {
            return true;
        }
        input.take(want).read_to_end(bytes).is_ok() && bytes.len() as u64 >= upto
    };
    if !fill(&mut bytes, 64) {
        return Head {
            bytes,
            facts: Err("the stream ended within the ELF header".into()),
        };
    }
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes"));
    if phoff > core_notes::MAX_NOTES || !fill(&mut bytes, phoff + 56) {
        return Head {
            bytes,
            facts: Err("the stream ended within the program headers".into()),
        };
    }
    let notes = match core_notes::notes_range(&bytes) {
        Ok(notes) => notes,
        Err(err) => {
            return Head {
                bytes,
                facts: Err(err.to_string()),
            };
        }
    };
    if notes.end > core_notes::MAX_NOTES + phoff + (1 << 20) {
        return Head {
            bytes,
            facts: Err("the notes lie too far into the stream".into()),
        };
    }
    fill(&mut bytes, notes.end);
    let start = (notes.start as usize).min(bytes.len());
    let end = (notes.end as usize).min(bytes.len());
    let facts = core_notes::parse_notes(&bytes[start..end]).map_err(|e| e.to_string());
    Head { bytes, facts }
}

/// Where the previous handler gets the dump.
enum Chained {
    Nowhere,
    Pipe(Child),
    File(File, u64),
}

impl Chained {
    fn start(destination: Destination, specifiers: &Specifiers, proc_dir: &Path) -> Chained {
        match destination {
            Destination::Nowhere => Chained::Nowhere,
            Destination::Pipe(argv) => {
                let spawned = Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                match spawned {
                    Ok(child) => Chained::Pipe(child),
                    Err(err) => {
                        log_to_kmsg(&format!(
                            "cannot start the previous handler {argv:?}: {err}"
                        ));
                        Chained::Nowhere
                    }
                }
            }
            Destination::File(path) => {
                // As the kernel does for a file: only within RLIMIT_CORE, in the process's
                // own filesystem view.
                let limit: u64 = specifiers.core_limit.parse().unwrap_or(0);
                if limit == 0 {
                    return Chained::Nowhere;
                }
                let target = match path.strip_prefix('/') {
                    Some(absolute) => proc_dir.join("root").join(absolute),
                    None => proc_dir.join("cwd").join(&path),
                };
                let created = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target);
                match created {
                    Ok(file) => {
                        if let (Ok(uid), Ok(gid)) =
                            (specifiers.uid.parse::<u32>(), specifiers.gid.parse::<u32>())
                        {
                            let _ = std::os::unix::fs::fchown(&file, Some(uid), Some(gid));
                        }
                        Chained::File(file, limit)
                    }
                    Err(err) => {
                        log_to_kmsg(&format!("cannot write the core file {path}: {err}"));
                        Chained::Nowhere
                    }
                }
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        let failed = match self {
            Chained::Nowhere => false,
            Chained::Pipe(child) => child
                .stdin
                .as_mut()
                .is_some_and(|stdin| stdin.write_all(bytes).is_err()),
            Chained::File(file, room) => {
                let n = bytes
                    .len()
                    .min(usize::try_from(*room).unwrap_or(usize::MAX));
                *room -= n as u64;
                file.write_all(&bytes[..n]).is_err()
            }
        };
        if failed {
            // The previous handler stopped reading: the rest is drained, not passed on.
            self.finish();
            *self = Chained::Nowhere;
        }
    }

    fn finish(&mut self) {
        if let Chained::Pipe(child) = self {
            drop(child.stdin.take());
            let deadline = Instant::now() + CHAINED_WAIT;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        *self = Chained::Nowhere;
    }
}

/// The crashed process's memory, through `/proc/PID/mem`.
struct ProcMemory(File);

impl Memory for ProcMemory {
    fn read_u64(&self, address: u64) -> Option<u64> {
        let mut bytes = [0u8; 8];
        self.0.read_exact_at(&mut bytes, address).ok()?;
        Some(u64::from_le_bytes(bytes))
    }
}

/// One file mapping of `/proc/PID/maps`.
#[derive(Debug, Clone)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    executable: bool,
    path: String,
}

fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (range, perms, offset) = (fields.next()?, fields.next()?, fields.next()?);
            let path = fields.nth(2)?;
            if !path.starts_with('/') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset: u64::from_str_radix(offset, 16).ok()?,
                executable: perms.contains('x'),
                path: path.to_owned(),
            })
        })
        .collect()
}

/// A module's load segments (to map file offsets to link-time addresses) and its CFI.
type LoadedModule = (Vec<LoadSegment>, Rc<Cfi>);

/// The process's mapped modules, opened through its root, with their CFI read on demand.
struct ProcessModules {
    root: PathBuf,
    mappings: Vec<Mapping>,
    loaded: std::cell::RefCell<HashMap<String, Option<LoadedModule>>>,
}

impl ProcessModules {
    fn mapping_at(&self, pc: u64) -> Option<&Mapping> {
        self.mappings
            .iter()
            .find(|m| m.executable && (m.start..m.end).contains(&pc))
    }

    /// The module's load segments and CFI, read once.
    fn module(&self, path: &str) -> Option<LoadedModule> {
        self.loaded
            .borrow_mut()
            .entry(path.to_owned())
            .or_insert_with(|| {
                let file = ElfFile::read(&self.root.join(path.trim_start_matches('/'))).ok()?;
                let cfi = read_cfi(&file)?;
                Some((file.segments.clone(), Rc::new(cfi)))
            })
            .clone()
    }

    /// The file offset of runtime address `pc`, and its mapping.
    fn file_offset(&self, pc: u64) -> Option<(&Mapping, u64)> {
        let mapping = self.mapping_at(pc)?;
        Some((mapping, pc - mapping.start + mapping.offset))
    }
}

impl Modules for ProcessModules {
    fn cfi_at(&self, pc: u64) -> Option<MappedCfi> {
        let (mapping, offset) = self.file_offset(pc)?;
        let (segments, cfi) = self.module(&mapping.path)?;
        let vaddr = mapping::file_offset_to_vaddr(&segments, offset).ok()?;
        Some(MappedCfi {
            cfi,
            bias: pc.wrapping_sub(vaddr),
        })
    }
}

/// `.eh_frame`, `.eh_frame_hdr`, `.text` and `.got` of `file`.
fn read_cfi(file: &ElfFile) -> Option<Cfi> {
    use object::{Object, ObjectSection};
    let image = file.image();
    let object = object::File::parse(&image).ok()?;
    let eh_frame = object.section_by_name(".eh_frame")?;
    let hdr = object
        .section_by_name(".eh_frame_hdr")
        .and_then(|s| Some((s.data().ok()?.to_vec(), s.address())));
    Some(Cfi {
        eh_frame: eh_frame.data().ok()?.to_vec(),
        eh_frame_address: eh_frame.address(),
        eh_frame_hdr: hdr,
        text_address: object.section_by_name(".text").map_or(0, |s| s.address()),
        got_address: object.section_by_name(".got").map_or(0, |s| s.address()),
    })
}

/// The kind of crash a signal means; None for signals crashwatch does not report.
pub fn kind_of_signal(signo: i32, code: i32) -> Option<EventKind> {
    const SI_KERNEL: i32 = 0x80;
    Some(match signo {
        libc::SIGSEGV if code == SI_KERNEL => EventKind::GeneralProtection,
        libc::SIGSEGV => EventKind::Segfault,
        libc::SIGBUS => EventKind::BusError,
        libc::SIGFPE => EventKind::DivideError,
        libc::SIGILL => EventKind::InvalidOpcode,
        libc::SIGTRAP => EventKind::Breakpoint,
        libc::SIGABRT => EventKind::Abort,
        _ => return None,
    })
}

/// The event of this dump: who, where, the whole stack, symbolized.
fn analyse(
    facts: &CoreFacts,
    specifiers: &Specifiers,
    proc_dir: &Path,
    config: &HandlerConfig,
) -> Option<CrashEvent> {
    let signo: i32 = specifiers.signal.parse().ok()?;
    let code = facts.signal.map_or(0, |s| s.code);
    let kind = kind_of_signal(signo, code)?;
    let mut event = CrashEvent::new(kind);
    event.comm = std::fs::read_to_string(proc_dir.join("comm"))
        .ok()
        .map(|c| c.trim_end_matches('\n').to_owned())
        .or_else(|| Some(specifiers.comm.clone()));
    event.pid = specifiers.global_tid.parse().ok();
    event.ip = Some(Address(facts.registers[RIP]));
    event.sp = Some(Address(facts.registers[RSP]));
    if let Some(signal) = facts.signal
        && kind != EventKind::Abort
    {
        event.fault_address = Some(Address(signal.addr));
        event.si_code = Some(signal.code as u32 as u64);
        if signal.addr == facts.registers[RIP] && kind == EventKind::Segfault {
            event.error_bits = vec!["user".into(), "instruction-fetch".into()];
        }
    }
    event.timestamp = specifiers
        .time
        .parse::<i64>()
        .ok()
        .and_then(|t| jiff::Timestamp::from_second(t).ok())
        .map(|t| t.to_string());
    if let Ok(cgroup) = std::fs::read_to_string(proc_dir.join("cgroup"))
        && let Some((pod, container)) = attribute::attribute(&cgroup, &config.runtime_state_dir)
    {
        event.pod = Some(pod);
        event.container = Some(container);
    }

    let maps = std::fs::read_to_string(proc_dir.join("maps")).unwrap_or_default();
    let modules = ProcessModules {
        root: proc_dir.join("root"),
        mappings: parse_maps(&maps),
        loaded: Default::default(),
    };
    let pcs = match File::open(proc_dir.join("mem")) {
        Ok(mem) => unwind::walk(&facts.registers, &modules, &ProcMemory(mem)).0,
        Err(_) => vec![facts.registers[RIP]],
    };
    if let Some((mapping, offset)) = modules.file_offset(facts.registers[RIP]) {
        event.module = mapping.path.rsplit('/').next().map(str::to_owned);
        event.module_offset = Some(Address(offset));
        event.vma_start = Some(Address(mapping.start));
        event.vma_size = Some(Address(mapping.end - mapping.start));
    }
    let symbolizers = Symbolizers::new(&modules, config);
    // The faulting frame: symbolized with its instruction and the NULL-member analysis.
    if event.module.is_some() {
        let mut first = event.clone();
        if symbolizers.symbolize(&mut first).is_ok() {
            event = first;
        }
        let module = event.module.clone();
        for frame in &mut event.frames {
            frame.module = module.clone();
        }
    }
    // The binary's path as the process saw it, not through /proc/PID/root.
    if let Some(path) = &event.binary_path
        && let Some(inside) = path.strip_prefix(&*modules.root.to_string_lossy())
    {
        event.binary_path = Some(inside.to_owned());
    }
    if event.frames.is_empty() {
        event
            .frames
            .push(unknown_frame(&modules, facts.registers[RIP]));
    }
    for &return_address in pcs.iter().skip(1) {
        let call = return_address.wrapping_sub(1);
        let Some((mapping, offset)) = modules.file_offset(call) else {
            event.frames.push(unknown_frame(&modules, call));
            continue;
        };
        let module = mapping.path.rsplit('/').next().map(str::to_owned);
        let mut caller = CrashEvent::new(kind);
        caller.module = module.clone();
        caller.module_offset = Some(Address(offset));
        let mut frames = match symbolizers.symbolize(&mut caller) {
            Ok(()) if !caller.frames.is_empty() => caller.frames,
            _ => vec![unknown_frame(&modules, call)],
        };
        for frame in &mut frames {
            frame.module = module.clone();
        }
        let reached_main = frames.last().and_then(|f| f.function.as_deref()) == Some("main");
        event.frames.extend(frames);
        // As gdb's `bt` does: what runs before main is the C library's business.
        if reached_main || event.frames.len() >= crds::bounds::FRAMES {
            break;
        }
    }
    event.frames.truncate(crds::bounds::FRAMES);
    Some(event)
}

/// A frame known only by module and offset.
fn unknown_frame(modules: &ProcessModules, pc: u64) -> Frame {
    let (module, function) = match modules.file_offset(pc) {
        Some((mapping, offset)) => {
            let name = mapping.path.rsplit('/').next().unwrap_or("?").to_owned();
            (Some(name.clone()), format!("{name}+{offset:#x}"))
        }
        None => (None, format!("{pc:#x}")),
    };
    Frame {
        module,
        function: Some(function),
        ..Frame::default()
    }
}

/// Symbolizes from the container's files first (its binaries, its `/usr/lib/debug`), then
/// with the node's debug dirs.
struct Symbolizers {
    container: Symbolizer,
    node: Option<Symbolizer>,
}

impl Symbolizers {
    fn new(modules: &ProcessModules, config: &HandlerConfig) -> Symbolizers {
        let binaries: Vec<PathBuf> = modules
            .mappings
            .iter()
            .filter(|m| m.executable)
            .map(|m| modules.root.join(m.path.trim_start_matches('/')))
            .collect();
        let places = |root: PathBuf, debug_dirs: Vec<PathBuf>| Places {
            root,
            proc_root: PathBuf::from("/proc"),
            binaries: binaries.clone(),
            search_paths: Vec::new(),
            debug_dirs,
            debuginfod: None,
        };
        let container = Symbolizer::new(
            places(modules.root.clone(), vec![PathBuf::from("/usr/lib/debug")]),
            CACHE_BYTES,
        );
        let node = (!config.debug_dirs.is_empty()).then(|| {
            Symbolizer::new(
                places(PathBuf::from("/"), config.debug_dirs.clone()),
                CACHE_BYTES,
            )
        });
        Symbolizers { container, node }
    }

    /// Symbolizes `event`: with the container's files, and with the node's debug dirs when
    /// those gave no source lines.
    fn symbolize(&self, event: &mut CrashEvent) -> Result<(), crate::symbolize::SymbolizeError> {
        let mut inside = event.clone();
        let result = self.container.symbolize(&mut inside);
        let has_lines = |e: &CrashEvent| e.frames.iter().any(|f| f.line.is_some());
        if !has_lines(&inside)
            && let Some(node) = &self.node
        {
            let mut outside = event.clone();
            if node.symbolize(&mut outside).is_ok() && has_lines(&outside) {
                *event = outside;
                return Ok(());
            }
        }
        *event = inside;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_give_file_mappings_only() {
        let maps = "555555554000-555555555000 r--p 00000000 fe:01 1234 /usr/bin/crashy\n\
                    555555555000-555555556000 r-xp 00001000 fe:01 1234 /usr/bin/crashy\n\
                    7ffff7fc3000-7ffff7fc7000 r--p 00000000 00:00 0 [vvar]\n\
                    7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0 [stack]\n";
        let mappings = parse_maps(maps);
        assert_eq!(mappings.len(), 2);
        assert!(mappings[1].executable);
        assert_eq!(mappings[1].offset, 0x1000);
        assert_eq!(mappings[1].path, "/usr/bin/crashy");
    }

    #[test]
    fn signals_map_to_kinds() {
        assert_eq!(kind_of_signal(11, 1), Some(EventKind::Segfault));
        assert_eq!(kind_of_signal(11, 0x80), Some(EventKind::GeneralProtection));
        assert_eq!(kind_of_signal(6, 0), Some(EventKind::Abort));
        assert_eq!(kind_of_signal(3, 0), None, "SIGQUIT is not a crash");
    }
}
