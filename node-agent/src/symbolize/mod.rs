//! Stage 3 of the pipeline: from a module and an address to function, file, line and the
//! inlined frames, even for stripped binaries.
//!
//! [`locate`] finds the binary and its debug file, [`elf`] reads them (never mmapped),
//! [`mapping`] turns the kernel's offset into a link-time address, and [`dwarf`] asks
//! addr2line for the frames. Parsed files are cached, bounded by bytes.

pub mod debuginfod;
pub mod dwarf;
pub mod elf;
pub mod index;
pub mod lines;
pub mod locate;
pub mod mapping;
pub mod reader;
pub mod symbols;
pub mod variables;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crds::{CrashEvent, Frame};
use thiserror::Error;

use crate::explain::{access, arm64, arm64_access, disasm};
use dwarf::DebugInfo;
use elf::ElfFile;
pub use locate::Places;
use object::Architecture;

/// Why an event could not be symbolized.
#[derive(Debug, Error)]
pub enum SymbolizeError {
    /// No candidate binary for the module exists.
    #[error("no binary named {module} was found; pass --binary or --search-path")]
    BinaryNotFound {
        /// The module name.
        module: String,
    },
    /// A candidate exists but is not usable.
    #[error("{0}")]
    BadBinary(#[from] elf::ElfError),
    /// The kernel's offset does not map into the binary.
    #[error("{0}")]
    Mapping(#[from] mapping::MappingError),
    /// Neither DWARF nor a symbol covers the address.
    #[error(
        "{binary} has no debug information for {address:#x} (build-id {build_id}); install its debug package or serve it by debuginfod"
    )]
    NoDebugInfo {
        /// The binary.
        binary: String,
        /// The link-time address.
        address: u64,
        /// Its build-id, to look the debug file up by.
        build_id: String,
    },
    /// An earlier run of the agent stopped while symbolizing this record (killed, for
    /// example by the OOM killer): it is not tried again, so it cannot kill the agent twice.
    #[error(
        "symbolizing this record did not finish when the agent last tried (it was killed, perhaps out of memory); the event is published unsymbolized"
    )]
    Interrupted,
    /// The debug file is being fetched from debuginfod in the background: this event is
    /// reported without it, later ones of the binary will have it.
    #[error(
        "{binary} has no local debug information for {address:#x}; its debug file (build-id {build_id}) is being fetched from debuginfod for later crashes"
    )]
    DebuginfodPending {
        /// The binary.
        binary: String,
        /// The link-time address.
        address: u64,
        /// Its build-id.
        build_id: String,
    },
    /// A parser panicked on this input (a bug, ours or a dependency's): the event is kept
    /// unsymbolized and the agent goes on.
    #[error("symbolization failed on a malformed file (an internal error; the event is kept)")]
    Panicked,
}

impl SymbolizeError {
    /// A short label for the failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            SymbolizeError::BinaryNotFound { .. } => "binary_not_found",
            SymbolizeError::BadBinary(_) => "bad_binary",
            SymbolizeError::Mapping(_) => "address_not_mapped",
            SymbolizeError::NoDebugInfo { .. } => "no_debug_info",
            SymbolizeError::DebuginfodPending { .. } => "debuginfod_pending",
            SymbolizeError::Panicked => "panicked",
            SymbolizeError::Interrupted => "interrupted",
        }
    }
}

/// Fills in what can be learned about an event from binaries and debug information.
pub trait Symbolize {
    /// Adds `binaryPath`, `buildId`, `binaryMatches`, `frames` … to the event where it can.
    /// Ok(()) also when there is nothing to symbolize (no module).
    fn symbolize(&self, event: &mut CrashEvent) -> Result<(), SymbolizeError>;

    /// Adds only `binaryPath`, `buildId` and `binaryMatches`, from the binary's headers and
    /// notes, never its debug information: what a report's fingerprint needs when
    /// symbolizing is not to be tried.
    fn identify(&self, _event: &mut CrashEvent) -> Result<(), SymbolizeError> {
        Ok(())
    }

    /// Waits for work it started in the background (a process about to exit).
    fn wait_for_background_work(&self) {}
}

impl<T: Symbolize + ?Sized> Symbolize for Box<T> {
    fn symbolize(&self, event: &mut CrashEvent) -> Result<(), SymbolizeError> {
        (**self).symbolize(event)
    }

    fn identify(&self, event: &mut CrashEvent) -> Result<(), SymbolizeError> {
        (**self).identify(event)
    }

    fn wait_for_background_work(&self) {
        (**self).wait_for_background_work()
    }
}

/// A symbolizer that adds nothing (`--no-symbolize`).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSymbolizer;

impl Symbolize for NoSymbolizer {
    fn symbolize(&self, _event: &mut CrashEvent) -> Result<(), SymbolizeError> {
        Ok(())
    }
}

/// A binary with its debug information, as cached. addr2line's context fills itself in
/// lazily and is not `Sync`, hence the lock.
struct Loaded {
    binary: ElfFile,
    debug: Option<Mutex<DebugInfo>>,
    /// The symbol index its debug information could have, to build.
    index_wanted: Option<IndexWanted>,
    bytes: usize,
    /// Its DWARF is being fetched from debuginfod in the background.
    debuginfod_pending: bool,
}

/// A file to index, and what identifies it.
struct IndexWanted {
    file: ElfFile,
    identity: index::Identity,
}

impl Loaded {
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What identifies a file's content cheaply: a replaced or rewritten file gets a new entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    device: u64,
    inode: u64,
    size: u64,
    modified_ns: i128,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            device: m.dev(),
            inode: m.ino(),
            size: m.size(),
            modified_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

struct CacheEntry {
    path: PathBuf,
    stamp: Stamp,
    loaded: Arc<Loaded>,
    last_used: u64,
}

/// The most binaries kept open and parsed at once.
const MAX_CACHED_FILES: usize = 64;

/// How many files' budgets the cache holds (each file gets this fraction of it).
const FILES_PER_CACHE: usize = 4;

/// What a cached binary costs beyond its debug information: its headers' facts and an
/// open file.
const LOADED_OVERHEAD: usize = 4096;

/// A least-recently-used cache bounded by the bytes its entries hold, and by their number.
struct Cache {
    entries: Vec<CacheEntry>,
    limit_bytes: usize,
    clock: u64,
}

impl Cache {
    fn get(&mut self, path: &Path, stamp: &Stamp) -> Option<Arc<Loaded>> {
        self.clock += 1;
        let entry = self
            .entries
            .iter_mut()
            .find(|e| e.path == path && &e.stamp == stamp)?;
        entry.last_used = self.clock;
        Some(entry.loaded.clone())
    }

    fn remove(&mut self, loaded: &Arc<Loaded>) {
        self.entries.retain(|e| !Arc::ptr_eq(&e.loaded, loaded));
    }

    fn insert(&mut self, path: PathBuf, stamp: Stamp, loaded: Arc<Loaded>) {
        self.clock += 1;
        self.entries.retain(|e| e.path != path);
        self.entries.push(CacheEntry {
            path,
            stamp,
            loaded,
            last_used: self.clock,
        });
        while self.entries.len() > MAX_CACHED_FILES
            || self.entries.len() > 1
                && self.entries.iter().map(|e| e.loaded.bytes()).sum::<usize>() > self.limit_bytes
        {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
                .expect("non-empty");
            self.entries.remove(oldest);
        }
    }
}

/// Symbolizes against the files of this node.
pub struct Symbolizer {
    places: Places,
    cache: Arc<Mutex<Cache>>,
    indexes: Option<Indexes>,
}

/// How many bytes of symbol indexes a directory keeps (the least recently written go).
pub const INDEX_DIR_LIMIT: u64 = 512 << 20;

/// Where symbol indexes are kept, and the builds under way.
struct Indexes {
    dir: PathBuf,
    /// The build-ids being indexed, with their builder threads.
    building: Mutex<Vec<(Vec<u8>, std::thread::JoinHandle<()>)>>,
}

impl Symbolizer {
    /// A symbolizer looking in `places`, caching up to `cache_bytes` of parsed files.
    pub fn new(places: Places, cache_bytes: usize) -> Self {
        Symbolizer {
            places,
            cache: Arc::new(Mutex::new(Cache {
                entries: Vec::new(),
                limit_bytes: cache_bytes,
                clock: 0,
            })),
            indexes: None,
        }
    }

    /// Keeps a symbol index per build-id in `dir` ([`index`]): a file with DWARF and a
    /// build-id is indexed in a background thread the first time it is loaded, and read
    /// through its index from then on, also after a restart.
    pub fn with_index_dir(mut self, dir: PathBuf) -> Self {
        self.indexes = Some(Indexes {
            dir,
            building: Mutex::default(),
        });
        self
    }

    /// Waits for the symbol indexes being built (a short-lived process, before it exits).
    pub fn wait_for_indexes(&self) {
        let Some(indexes) = &self.indexes else {
            return;
        };
        let builds = std::mem::take(
            &mut *indexes
                .building
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for (_, build) in builds {
            let _ = build.join();
        }
    }

    /// The debug information of `file`, through its symbol index when there is one; when
    /// there is none but could be, also what to build it from.
    fn load_debug(
        &self,
        file: &ElfFile,
        supplementary: Option<&ElfFile>,
    ) -> Result<(DebugInfo, Option<IndexWanted>), dwarf::DebugInfoError> {
        let budget = self.file_budget();
        let (Some(indexes), Some(identity)) = (&self.indexes, dwarf::identity(file)) else {
            return Ok((DebugInfo::load_within(file, supplementary, budget)?, None));
        };
        let path = index::path_in(&indexes.dir, &identity.build_id);
        match index::SymbolIndex::open(&path, &identity) {
            Ok(found) => {
                let debug = DebugInfo::load_indexed(file, supplementary, budget, Some(found))?;
                return Ok((debug, None));
            }
            Err(index::IndexError::Io(err)) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(%err, "symbol index not used; building it again"),
        }
        let debug = DebugInfo::load_within(file, supplementary, budget)?;
        Ok((
            debug,
            Some(IndexWanted {
                file: file.clone(),
                identity,
            }),
        ))
    }

    /// Starts building the symbol index `loaded` wants, in a background thread at a lower
    /// priority, unless it is being built. Its cached entry goes first (what addr2line
    /// parsed is freed while the index is built); so does the entry loaded meanwhile, once
    /// the index is there, so that the next crash in it loads it with the index.
    fn start_index_build(&self, loaded: &Arc<Loaded>) {
        let (Some(indexes), Some(wanted)) = (&self.indexes, &loaded.index_wanted) else {
            return;
        };
        let mut building = indexes
            .building
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        building.retain(|(_, build)| !build.is_finished());
        if building
            .iter()
            .any(|(id, _)| *id == wanted.identity.build_id)
        {
            return;
        }
        self.cache().remove(loaded);
        let (file, identity) = (wanted.file.clone(), wanted.identity.clone());
        let (dir, cache, binary) = (
            indexes.dir.clone(),
            self.cache.clone(),
            loaded.binary.path.clone(),
        );
        let build = std::thread::Builder::new()
            .name("symbol-index".into())
            .spawn(move || {
                // SAFETY: setpriority has no memory-safety preconditions; 0 is this thread.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
                let started = std::time::Instant::now();
                match dwarf::build_index(&file, &dir, &identity) {
                    Ok(()) => {
                        tracing::info!(file = %file.path.display(), elapsed = ?started.elapsed(), "symbol index built");
                        cache
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .entries
                            .retain(|e| e.path != binary);
                    }
                    Err(err) => tracing::warn!(file = %file.path.display(), %err, "no symbol index"),
                }
            });
        match build {
            Ok(build) => building.push((wanted.identity.build_id.clone(), build)),
            Err(err) => tracing::warn!(%err, "cannot start a symbol index build"),
        }
    }

    fn load(&self, path: &Path) -> Result<Arc<Loaded>, elf::ElfError> {
        let stamp = Stamp::of(path);
        if let Some(stamp) = &stamp
            && let Some(hit) = self.cache().get(path, stamp)
        {
            return Ok(hit);
        }
        let binary = ElfFile::read(path)?;
        let debug = self.places.debug_file(&binary).and_then(|(file, how)| {
            tracing::debug!(binary = %path.display(), debug = %file.path.display(), how, "debug information found");
            let supplementary = self.places.supplementary_file(&file, path);
            self.load_debug(&file, supplementary.as_ref()).inspect_err(|err| tracing::warn!(file = %file.path.display(), %err, "unusable debug information")).ok()
        });
        let found_dwarf = debug.is_some();
        let (debug, index_wanted) = match debug {
            Some((debug, wanted)) => (Some(debug), wanted),
            // Symbols only: the binary's own .symtab/.dynsym.
            None => (
                DebugInfo::load_within(&binary, None, self.file_budget()).ok(),
                None,
            ),
        };
        // The binary itself holds only its headers' facts and an open file.
        let bytes = LOADED_OVERHEAD + debug.as_ref().map_or(0, |d| d.bytes);
        let debuginfod_pending = !found_dwarf
            && match (&self.places.debuginfod, binary.build_id.as_deref()) {
                (Some(client), Some(id)) => client.is_fetching(id),
                _ => false,
            };
        let loaded = Arc::new(Loaded {
            binary,
            debug: debug.map(Mutex::new),
            index_wanted,
            bytes,
            debuginfod_pending,
        });
        // Without DWARF, a later crash asks debuginfod again (its negative cache limits how
        // often), so the load is not cached.
        let retry_later = !found_dwarf && self.places.debuginfod.is_some();
        // A file that changed while it was read may have given errors (a read past its new
        // end): what was learned is not kept under the old stamp.
        let unchanged = stamp.as_ref() == Stamp::of(path).as_ref();
        if let Some(stamp) = stamp.filter(|_| !retry_later && unchanged) {
            self.cache().insert(path.to_owned(), stamp, loaded.clone());
        }
        Ok(loaded)
    }

    /// What one file's debug information may hold: a quarter of the cache, so that a few
    /// binaries stay loaded at once.
    fn file_budget(&self) -> dwarf::Budget {
        dwarf::Budget::of(self.cache().limit_bytes / FILES_PER_CACHE)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // The cache's own operations cannot leave it inconsistent: a poisoned lock is fine.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `loaded`, unless a panic poisoned its debug information while it was locked: then
    /// that entry is dropped from the cache and the files are loaded afresh.
    fn unpoisoned(&self, loaded: Arc<Loaded>) -> Arc<Loaded> {
        if !loaded.debug.as_ref().is_some_and(Mutex::is_poisoned) {
            return loaded;
        }
        tracing::warn!(binary = %loaded.binary.path.display(), "a panic interrupted symbolization with this binary; loading it again");
        self.cache().remove(&loaded);
        match self.load(&loaded.binary.path) {
            Ok(fresh) => fresh,
            Err(_) => loaded,
        }
    }
}

/// The longest x86-64 instruction (A64 instructions are 4 bytes).
const MAX_INSTRUCTION_LENGTH: usize = 15;

/// The largest function whose code the member analysis decodes.
const MAX_FUNCTION_BYTES: u64 = 1 << 20;

/// Which member was accessed through which pointer at `vaddr`, from the function's code in
/// `binary` and the variables and types in `debug` (the NULL-member analysis).
pub fn trace_access(
    binary: &ElfFile,
    debug: &DebugInfo,
    vaddr: u64,
) -> Option<crds::PointerAccess> {
    let (facts, function) = variables::UnitFacts::at(debug, vaddr)?;
    let length = function.end.checked_sub(function.start)?;
    if length > MAX_FUNCTION_BYTES {
        return None;
    }
    let start = mapping::vaddr_to_file_offset(&binary.segments, function.start)?;
    let code = binary.bytes_at(start, usize::try_from(length).ok()?)?;
    match binary.architecture {
        Architecture::Aarch64 => arm64_access::trace_access(&facts, &code, function.start, vaddr),
        _ => access::trace_access(&facts, &code, function.start, vaddr),
    }
}

/// The instruction at a faulting address, read from the binary.
struct Faulting {
    /// As a disassembler prints it.
    text: String,
    /// Whether it touches memory through a traceable operand (known for x86-64 and A64).
    touches_memory: bool,
    /// An A64 load's or store's `[xN, #imm]` operand.
    arm64_operand: Option<arm64_access::MemoryOperand>,
}

/// The instruction at `file_offset` of `binary`, linked at `vaddr`. Decoded for x86-64 and
/// AArch64 binaries; None for other machines.
fn faulting_instruction(binary: &ElfFile, file_offset: u64, vaddr: u64) -> Option<Faulting> {
    match binary.architecture {
        Architecture::X86_64 => binary
            .bytes_at(file_offset, MAX_INSTRUCTION_LENGTH)
            .and_then(|bytes| disasm::decode_at(&bytes, vaddr))
            .map(|i| Faulting {
                touches_memory: i.memory.is_some(),
                text: i.text,
                arm64_operand: None,
            }),
        Architecture::Aarch64 => {
            let instruction = arm64_access::decode(&binary.bytes_at(file_offset, 4)?)?;
            let operand = arm64_access::memory_operand(&instruction);
            Some(Faulting {
                text: instruction.to_string(),
                touches_memory: operand.is_some(),
                arm64_operand: operand,
            })
        }
        _ => None,
    }
}

/// Whether `binary` cannot be the one that faulted because its code is for another machine
/// than the event's (an arm64 report, known by its ESR, and an x86-64 binary of that name).
fn for_another_machine(event: &CrashEvent, binary: &ElfFile) -> bool {
    event.esr.is_some()
        && !matches!(
            binary.architecture,
            Architecture::Aarch64 | Architecture::Unknown
        )
}

/// Whether the `Code:` bytes equal the binary's bytes around `file_offset` (None without Code).
fn code_matches(event: &CrashEvent, binary: &ElfFile, file_offset: u64) -> Option<bool> {
    let code = disasm::parse_code(event.code.as_deref()?).ok()?;
    let start = file_offset.checked_sub(code.fault_index as u64)?;
    Some(binary.bytes_at(start, code.bytes.len()).as_deref() == Some(&code.bytes[..]))
}

impl Symbolizer {
    /// The binary the event's process ran: the first candidate whose bytes match the
    /// `Code:` record (or the first that loads, when none can be checked), loaded by `load`,
    /// with the file offset of the faulting instruction and whether the bytes matched.
    fn choose_binary<T>(
        &self,
        event: &CrashEvent,
        module: &str,
        load: impl Fn(&Path) -> Result<T, elf::ElfError>,
        binary: impl Fn(&T) -> &ElfFile,
    ) -> Result<(T, u64, Option<bool>), SymbolizeError> {
        let mut chosen: Option<(T, u64, Option<bool>)> = None;
        let mut last_error = None;
        for path in self.places.binary_candidates(event) {
            let loaded = match load(&path) {
                Ok(loaded) => loaded,
                Err(err) => {
                    last_error = Some(SymbolizeError::from(err));
                    continue;
                }
            };
            let offset = match event.module_offset {
                Some(offset) => offset.0,
                None => match mapping::vma_to_file_offset(
                    &binary(&loaded).segments,
                    event.ip.map_or(0, |a| a.0),
                    event.vma_start.map_or(0, |a| a.0),
                ) {
                    Ok(offset) => offset,
                    Err(err) => {
                        last_error = Some(err.into());
                        continue;
                    }
                },
            };
            let matches = if for_another_machine(event, binary(&loaded)) {
                Some(false)
            } else {
                code_matches(event, binary(&loaded), offset)
            };
            let good = matches != Some(false);
            if good || chosen.is_none() {
                chosen = Some((loaded, offset, matches));
            }
            if good {
                break;
            }
        }
        chosen.ok_or_else(|| {
            last_error.unwrap_or(SymbolizeError::BinaryNotFound {
                module: module.to_owned(),
            })
        })
    }
}

impl Symbolize for Symbolizer {
    fn wait_for_background_work(&self) {
        self.wait_for_indexes();
    }

    fn identify(&self, event: &mut CrashEvent) -> Result<(), SymbolizeError> {
        let Some(module) = event.module.clone() else {
            return Ok(());
        };
        let (binary, offset, matches) = self.choose_binary(event, &module, ElfFile::read, |b| b)?;
        event.binary_path = Some(binary.path.display().to_string());
        event.build_id = binary.build_id.as_deref().map(elf::hex);
        event.binary_matches = matches;
        event.module_offset.get_or_insert(crds::Address(offset));
        Ok(())
    }

    fn symbolize(&self, event: &mut CrashEvent) -> Result<(), SymbolizeError> {
        let Some(module) = event.module.clone() else {
            return Ok(());
        };
        let (loaded, offset, matches) =
            self.choose_binary(event, &module, |path| self.load(path), |l| &l.binary)?;
        let loaded = self.unpoisoned(loaded);
        let binary = &loaded.binary;
        event.binary_path = Some(binary.path.display().to_string());
        event.build_id = binary.build_id.as_deref().map(elf::hex);
        event.binary_matches = matches;
        event.module_offset.get_or_insert(crds::Address(offset));
        let vaddr = mapping::file_offset_to_vaddr(&binary.segments, offset)?;
        let no_debug_info = || {
            let (binary, address) = (binary.path.display().to_string(), vaddr);
            let build_id = event.build_id.clone().unwrap_or_else(|| "none".into());
            if loaded.debuginfod_pending {
                SymbolizeError::DebuginfodPending {
                    binary,
                    address,
                    build_id,
                }
            } else {
                SymbolizeError::NoDebugInfo {
                    binary,
                    address,
                    build_id,
                }
            }
        };
        let mut debug = loaded
            .debug
            .as_ref()
            .ok_or_else(no_debug_info)?
            .lock()
            // Only when another panic poisoned it since `unpoisoned`: addr2line's lazily
            // filled parts are one-time cells, which a panic leaves empty, not half-done.
            .unwrap_or_else(PoisonError::into_inner);
        let mut frames = debug.frames(vaddr).unwrap_or_default();
        let symbol = debug.symbol(vaddr);
        if !frames
            .iter()
            .any(|f| f.function.is_some() || f.line.is_some())
        {
            let (name, _, file) = symbol.ok_or_else(no_debug_info)?;
            frames = vec![Frame {
                function: Some(name),
                file,
                ..Frame::default()
            }];
        } else if let (Some(outermost), Some((name, _, _))) = (frames.last_mut(), symbol) {
            // As llvm-symbolizer does: the symbol table names the outermost function, which
            // tells split parts apart (main.cold) where DWARF has one name for all.
            outermost.function = Some(name);
        }
        event.frames = frames;
        if matches != Some(false) {
            let faulting = faulting_instruction(binary, offset, vaddr);
            // The member analysis walks the unit's DWARF: skip it for an instruction known
            // to touch no memory (a trap, a divide).
            if faulting.as_ref().is_none_or(|f| f.touches_memory) {
                event.access = trace_access(binary, &debug, vaddr);
            }
            // arm64 `unhandled exception` reports (5.x on) print no fault address: the faulting load's or
            // store's base register in the register dump, plus its offset, gives it.
            if let Some(operand) = faulting.as_ref().and_then(|f| f.arm64_operand)
                && event.fault_address.is_none()
            {
                event.fault_address = arm64::fault_address_from_registers(event, &operand);
            }
            if event.instruction.is_none() {
                event.instruction = faulting.map(|f| f.text);
            }
        }
        debug.trim();
        drop(debug);
        self.start_index_build(&loaded);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

    fn libc_symbolizer() -> Symbolizer {
        Symbolizer::new(
            Places {
                root: "/".into(),
                proc_root: "/proc".into(),
                binaries: vec![LIBC.into()],
                search_paths: Vec::new(),
                debug_dirs: Vec::new(),
                debuginfod: None,
            },
            64 << 20,
        )
    }

    /// An event 4 bytes into libc's `getpid` (its address from object's own parser).
    fn libc_event(_symbolizer: &Symbolizer) -> CrashEvent {
        use object::{Object, ObjectSegment, ObjectSymbol};
        let data = std::fs::read(LIBC).unwrap();
        let object = object::File::parse(&*data).unwrap();
        let getpid = object
            .dynamic_symbols()
            .find(|s| s.name() == Ok("getpid"))
            .unwrap()
            .address();
        let segment = object
            .segments()
            .find(|s| (s.address()..s.address() + s.size()).contains(&getpid))
            .unwrap();
        let mut event = CrashEvent::new(crds::EventKind::Segfault);
        event.module = Some("libc.so.6".into());
        event.module_offset = Some(crds::Address(
            getpid - segment.address() + segment.file_range().0 + 4,
        ));
        event
    }

    #[test]
    fn a_panic_while_the_debug_information_is_locked_does_not_disable_the_binary() {
        let fresh = libc_symbolizer();
        let mut expected = libc_event(&fresh);
        fresh.symbolize(&mut expected).unwrap();
        assert!(!expected.frames.is_empty());

        let symbolizer = libc_symbolizer();
        let loaded = symbolizer.load(Path::new(LIBC)).unwrap();
        // A parser bug panics while the lock is held: the mutex is poisoned.
        let debug = loaded.clone();
        let panicked = std::thread::spawn(move || {
            let _held = debug.debug.as_ref().unwrap().lock().unwrap();
            panic!("a parser bug while the debug information is locked");
        })
        .join();
        assert!(panicked.is_err());
        assert!(loaded.debug.as_ref().unwrap().is_poisoned());
        drop(loaded);

        for _ in 0..2 {
            let mut event = libc_event(&symbolizer);
            symbolizer.symbolize(&mut event).unwrap();
            assert_eq!(event.frames, expected.frames);
        }
    }
}
