//! Source frames from DWARF (through addr2line), and from the symbol table when there is none.

use std::borrow::Cow;
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use crds::Frame;
use gimli::RunTimeEndian;
use object::{Object, ObjectSection};
use thiserror::Error;

use super::elf::{ElfFile, Image, MAX_FILE_SIZE};
use super::reader::{LazyReader, PageCache, ReadAt, Section};
use super::symbols::Symbols;

/// The reader type: sections stay on disk, read a page at a time as parsers need them.
pub type Reader = LazyReader;

/// A compressed section may claim at most this many times its compressed size.
const MAX_COMPRESSION_RATIO: u64 = 1000;

/// Why debug information could not be loaded.
#[derive(Debug, Error)]
pub enum DebugInfoError {
    /// The object could not be parsed.
    #[error("{0}")]
    Object(#[from] object::Error),
    /// The DWARF could not be parsed.
    #[error("invalid DWARF: {0}")]
    Dwarf(#[from] gimli::Error),
    /// A section header points outside the file.
    #[error("section {0} lies outside the file")]
    SectionOutsideFile(String),
    /// A compressed section could not be decompressed.
    #[error("cannot decompress section {name}: {err}")]
    Decompress {
        /// The section.
        name: String,
        /// Why.
        err: std::io::Error,
    },
    /// A compressed section declares an implausible size.
    #[error(
        "section {name} claims {claimed} bytes uncompressed from {compressed} compressed bytes"
    )]
    CompressedSizeLie {
        /// The section.
        name: String,
        /// Its declared uncompressed size.
        claimed: u64,
        /// Its compressed size.
        compressed: u64,
    },
}

/// How deep DWARF entries may nest in a unit that is walked. addr2line parses a function's
/// inlined subroutines recursively, and a stack overflow aborts the agent whatever
/// `catch_unwind` does; compilers nest far less (a few dozen levels).
const MAX_ENTRY_DEPTH: isize = 512;

/// The memory one file's debug information may hold, and how it is split.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Bytes of section pages kept in the page cache.
    pub pages: usize,
    /// Roughly how many bytes of parsed units (lines, functions) addr2line may keep before
    /// its context is rebuilt empty.
    pub parsed: usize,
}

impl Budget {
    /// A budget of about `bytes` in all: a sixteenth for pages (at most 8 MiB), half for
    /// parsed units.
    pub fn of(bytes: usize) -> Budget {
        Budget {
            pages: (bytes / 16).clamp(MIN_PAGE_BYTES, MAX_PAGE_BYTES),
            parsed: (bytes / 2).max(MIN_PAGE_BYTES),
        }
    }

    /// The whole of it.
    pub fn bytes(&self) -> usize {
        self.pages + self.parsed
    }
}

impl Default for Budget {
    fn default() -> Budget {
        Budget::of(64 << 20)
    }
}

/// Page caches of a few MiB serve a lookup: one unit, its line program, abbreviations
/// and strings.
const MIN_PAGE_BYTES: usize = 1 << 20;
const MAX_PAGE_BYTES: usize = 8 << 20;

/// Parsed units cost about this many times their DWARF bytes (entries and line rows
/// turned into addr2line's structures), as measured on gcc and rustc output.
const PARSED_PER_DWARF_BYTE: usize = 4;

/// Compressed sections up to this size are decompressed into memory; larger ones into an
/// unlinked scratch file, read through the page cache like any other section.
const MAX_DECOMPRESSED_IN_MEMORY: u64 = 1 << 20;

/// Parsed debug information of one file.
pub struct DebugInfo {
    context: Option<addr2line::Context<Reader>>,
    /// The DWARF the context reads, to check units before addr2line walks them.
    dwarf: Option<Arc<gimli::Dwarf<Reader>>>,
    /// The address ranges of the units, `(begin, end, .debug_info offset)`, made once.
    unit_ranges: OnceCell<UnitRanges>,
    /// Units already checked for their nesting depth: whether they may be walked.
    walkable: RefCell<HashMap<usize, bool>>,
    /// The DWARF bytes of the units looked at since the context was made.
    touched_bytes: Cell<usize>,
    pages: Arc<PageCache>,
    symbols: Symbols,
    budget: Budget,
    /// At most how many bytes this holds: its budget, and the symbol index.
    pub bytes: usize,
}

impl DebugInfo {
    /// Loads DWARF (if the file has line information) and the symbol tables of `file`, with
    /// the default budget. `supplementary` is the dwz file its `.gnu_debugaltlink` names.
    pub fn load(
        file: &ElfFile,
        supplementary: Option<&ElfFile>,
    ) -> Result<DebugInfo, DebugInfoError> {
        DebugInfo::load_within(file, supplementary, Budget::default())
    }

    /// Loads as [`DebugInfo::load`] does, holding at most `budget`.
    ///
    /// Nothing of the DWARF is read yet but the section headers: its sections are read a
    /// page at a time as lookups need them (see [`super::reader`]). The symbol tables are
    /// indexed by address with their names left on disk.
    pub fn load_within(
        file: &ElfFile,
        supplementary: Option<&ElfFile>,
        budget: Budget,
    ) -> Result<DebugInfo, DebugInfoError> {
        let image = file.image();
        let object = object::File::parse(&image)?;
        let pages = PageCache::new(budget.pages);
        let (context, dwarf) = if file.has_dwarf {
            let mut dwarf = load_dwarf(file, &object, &pages)?;
            if let Some(sup) = supplementary {
                let sup_image = sup.image();
                let sup_object = object::File::parse(&sup_image)?;
                dwarf.set_sup(load_dwarf(sup, &sup_object, &pages)?);
            }
            let dwarf = Arc::new(dwarf);
            (
                Some(addr2line::Context::from_arc_dwarf(dwarf.clone())?),
                Some(dwarf),
            )
        } else {
            (None, None)
        };
        let symbols = Symbols::index(file, &object);
        let bytes = budget.bytes() + symbols.bytes();
        Ok(DebugInfo {
            context,
            dwarf,
            unit_ranges: OnceCell::new(),
            walkable: RefCell::default(),
            touched_bytes: Cell::new(0),
            pages,
            symbols,
            budget,
            bytes,
        })
    }

    /// Bytes of section pages held now, and read from disk since loading.
    pub fn page_use(&self) -> (usize, u64) {
        (self.pages.bytes(), self.pages.bytes_read())
    }

    /// Keeps the parsed units within the budget: when the units looked at since the
    /// context was made may hold more, addr2line's context is made anew, empty.
    pub fn trim(&mut self) {
        let estimate = self
            .touched_bytes
            .get()
            .saturating_mul(PARSED_PER_DWARF_BYTE);
        if estimate <= self.budget.parsed {
            return;
        }
        let Some(dwarf) = &self.dwarf else {
            return;
        };
        // The old context goes first, so that two never coexist.
        self.context = None;
        self.touched_bytes.set(0);
        self.walkable.get_mut().clear();
        match addr2line::Context::from_arc_dwarf(dwarf.clone()) {
            Ok(context) => {
                tracing::debug!(estimate, "parsed units over budget: context rebuilt");
                self.context = Some(context);
            }
            Err(err) => tracing::warn!(%err, "DWARF no longer parses; symbols only"),
        }
    }

    /// Whether DWARF was loaded.
    pub fn has_dwarf(&self) -> bool {
        self.context.is_some()
    }

    /// The DWARF unit covering `vaddr`, unless its entries nest deeper than any walk of
    /// them may recurse.
    pub fn unit_at(&self, vaddr: u64) -> Option<gimli::UnitRef<'_, Reader>> {
        if !self.walkable_at(vaddr) {
            return None;
        }
        self.context
            .as_ref()?
            .find_dwarf_and_unit(vaddr)
            .skip_all_loads()
    }

    /// Whether every unit covering `vaddr` nests its entries at most [`MAX_ENTRY_DEPTH`]
    /// deep. Checked before addr2line looks at a unit: even finding the function at an
    /// address makes it parse the function's inlined subroutines, recursively.
    fn walkable_at(&self, vaddr: u64) -> bool {
        let Some(dwarf) = &self.dwarf else {
            return true;
        };
        let ranges = self.unit_ranges.get_or_init(|| UnitRanges::of(dwarf));
        for offset in ranges.covering(vaddr) {
            let walkable = *self.walkable.borrow_mut().entry(offset).or_insert_with(|| {
                let header = dwarf
                    .debug_info
                    .header_from_offset(gimli::DebugInfoOffset(offset));
                if let Ok(header) = &header {
                    self.touched_bytes
                        .set(self.touched_bytes.get() + header.length_including_self());
                }
                let within = header
                    .and_then(|header| dwarf.unit(header))
                    .is_ok_and(|unit| nesting_within(&unit, MAX_ENTRY_DEPTH));
                if !within {
                    tracing::warn!(
                        unit = offset,
                        "ignoring a DWARF unit whose entries nest more than {MAX_ENTRY_DEPTH} deep"
                    );
                }
                within
            });
            if !walkable {
                return false;
            }
        }
        true
    }

    /// The subprogram entry (in the unit [`DebugInfo::unit_at`] gives) of the outermost
    /// function at `vaddr`, as addr2line found it for the frames.
    pub fn function_at(&self, vaddr: u64) -> Option<gimli::UnitOffset> {
        let context = self.context.as_ref()?;
        if !self.walkable_at(vaddr) {
            return None;
        }
        let mut frames = context.find_frames(vaddr).skip_all_loads().ok()?;
        let mut outermost = None;
        while let Ok(Some(frame)) = frames.next() {
            outermost = frame.dw_die_offset;
        }
        outermost
    }

    /// The source frames of `vaddr`, innermost (inlined) first; empty when DWARF has none
    /// (or only a unit nested too deep to walk).
    pub fn frames(&self, vaddr: u64) -> Result<Vec<Frame>, gimli::Error> {
        let Some(context) = &self.context else {
            return Ok(Vec::new());
        };
        if !self.walkable_at(vaddr) {
            return Ok(Vec::new());
        }
        let mut iter = context.find_frames(vaddr).skip_all_loads()?;
        let mut frames = Vec::new();
        while let Some(frame) = iter.next()? {
            let function = frame
                .function
                .as_ref()
                .and_then(|f| f.demangle().ok())
                .map(Cow::into_owned);
            let location = frame.location.as_ref();
            frames.push(Frame {
                function,
                file: location.and_then(|l| l.file).map(str::to_owned),
                line: location.and_then(|l| l.line),
                column: location.and_then(|l| l.column),
                inlined: true,
                module: None,
            });
        }
        if let Some(outermost) = frames.last_mut() {
            outermost.inlined = false;
        }
        Ok(frames)
    }

    /// The symbol containing `vaddr`, the offset into it, and its source file when the
    /// symbol table names one, from `.symtab`/`.dynsym`.
    pub fn symbol(&self, vaddr: u64) -> Option<(String, u64, Option<String>)> {
        self.symbols.at(vaddr)
    }
}

/// The address ranges of the compilation units, sorted by their start, to find the units
/// covering an address without looking at every one.
struct UnitRanges {
    /// `(begin, end, .debug_info offset)`, by `begin`.
    ranges: Vec<(u64, u64, usize)>,
    /// The largest `end` among `ranges[..=i]`.
    max_end: Vec<u64>,
}

impl UnitRanges {
    /// The ranges of every unit: from `.debug_aranges` for the units it lists, which costs
    /// one read of a small section, and from the unit's own entry for the others.
    fn of(dwarf: &gimli::Dwarf<Reader>) -> UnitRanges {
        let mut ranges = Vec::new();
        let mut listed = std::collections::HashSet::new();
        let mut headers = dwarf.debug_aranges.headers();
        while let Ok(Some(header)) = headers.next() {
            let offset = header.debug_info_offset().0;
            let mut entries = header.entries();
            let mut any = false;
            while let Ok(Some(entry)) = entries.next() {
                if entry.length() != 0 {
                    let range = entry.range();
                    ranges.push((range.begin, range.end, offset));
                    any = true;
                }
            }
            if any {
                listed.insert(offset);
            }
        }
        let mut headers = dwarf.units();
        while let Ok(Some(header)) = headers.next() {
            let Some(offset) = header.debug_info_offset().map(|o| o.0) else {
                continue;
            };
            if listed.contains(&offset) {
                continue;
            }
            let Ok(unit) = dwarf.unit(header) else {
                continue;
            };
            let Ok(mut iter) = dwarf.unit_ranges(&unit) else {
                continue;
            };
            while let Ok(Some(range)) = iter.next() {
                ranges.push((range.begin, range.end, offset));
            }
        }
        ranges.sort_unstable();
        let max_end = ranges
            .iter()
            .scan(0, |max, &(_, end, _)| {
                *max = end.max(*max);
                Some(*max)
            })
            .collect();
        UnitRanges { ranges, max_end }
    }

    /// The `.debug_info` offsets of the units whose ranges hold `vaddr`.
    fn covering(&self, vaddr: u64) -> impl Iterator<Item = usize> + '_ {
        let after = self.ranges.partition_point(|(begin, _, _)| *begin <= vaddr);
        (0..after)
            .rev()
            .take_while(move |&i| self.max_end[i] > vaddr)
            .filter(move |&i| vaddr < self.ranges[i].1)
            .map(move |i| self.ranges[i].2)
    }
}

/// Whether no entry of `unit` lies deeper than `limit` (read flat, without recursion).
fn nesting_within(unit: &gimli::Unit<Reader>, limit: isize) -> bool {
    let Ok(mut entries) = unit.entries_raw(None) else {
        return false;
    };
    while !entries.is_empty() {
        if entries.next_depth() > limit {
            return false;
        }
        match entries.read_abbreviation() {
            Ok(Some(abbreviation)) => {
                if entries.skip_attributes(abbreviation.attributes()).is_err() {
                    return false;
                }
            }
            Ok(None) => {}
            Err(_) => return false,
        }
    }
    true
}

/// The DWARF sections of `file`, each read on demand through `pages`.
fn load_dwarf<'a>(
    file: &ElfFile,
    object: &object::File<'a, &'a Image>,
    pages: &Arc<PageCache>,
) -> Result<gimli::Dwarf<Reader>, DebugInfoError> {
    let endian = if object.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    gimli::Dwarf::load(|id| -> Result<Reader, DebugInfoError> {
        let name = id.name();
        // Macro information is never used, and with -g3 it is the largest section.
        if matches!(name, ".debug_macinfo" | ".debug_macro") {
            return Ok(LazyReader::empty_section(endian));
        }
        Ok(match section_bytes(object, file, name)? {
            Some((backing, offset, size)) => {
                let size = usize::try_from(size)
                    .map_err(|_| DebugInfoError::SectionOutsideFile(name.to_owned()))?;
                LazyReader::new(Section::new(backing, offset, size, pages.clone(), endian))
            }
            None => LazyReader::empty_section(endian),
        })
    })
}

/// A section's bytes: where they are, at which offset, and how many.
type SectionPlace = (Arc<dyn ReadAt>, u64, u64);

/// Where a section's bytes are: in the file, at an offset, with a size; or, for a
/// compressed section, decompressed into memory (when small) or a scratch file.
fn section_bytes<'a>(
    object: &object::File<'a, &'a Image>,
    file: &ElfFile,
    name: &str,
) -> Result<Option<SectionPlace>, DebugInfoError> {
    let Some(section) = object.section_by_name(name) else {
        return Ok(None);
    };
    let compressed = section.compressed_file_range()?;
    if compressed.format == object::CompressionFormat::None {
        // None: SHT_NOBITS, stripped into a .debug file.
        return match section.file_range() {
            Some((offset, size)) if offset.checked_add(size).is_some_and(|e| e <= file.size) => {
                Ok(Some((Arc::new(file.clone()), offset, size)))
            }
            Some(_) => Err(DebugInfoError::SectionOutsideFile(name.to_owned())),
            None => Ok(None),
        };
    }
    let limit = compressed
        .compressed_size
        .saturating_mul(MAX_COMPRESSION_RATIO)
        .min(MAX_FILE_SIZE);
    if compressed.uncompressed_size > limit {
        return Err(DebugInfoError::CompressedSizeLie {
            name: name.to_owned(),
            claimed: compressed.uncompressed_size,
            compressed: compressed.compressed_size,
        });
    }
    if compressed
        .offset
        .checked_add(compressed.compressed_size)
        .is_none_or(|end| end > file.size)
    {
        return Err(DebugInfoError::SectionOutsideFile(name.to_owned()));
    }
    let failed = |err: io::Error| DebugInfoError::Decompress {
        name: name.to_owned(),
        err,
    };
    let input = io::BufReader::with_capacity(
        64 << 10,
        FileRange {
            file,
            at: compressed.offset,
            end: compressed.offset + compressed.compressed_size,
        },
    );
    let mut decoder: Box<dyn Read> = match compressed.format {
        object::CompressionFormat::Zlib => Box::new(flate2::read::ZlibDecoder::new(input)),
        object::CompressionFormat::Zstandard => Box::new(
            ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|err| failed(io::Error::other(err.to_string())))?,
        ),
        _ => {
            return Err(failed(io::Error::other("unknown compression format")));
        }
    };
    let size = compressed.uncompressed_size;
    let mut limited = (&mut decoder).take(size);
    let backing: Arc<dyn ReadAt> = if size <= MAX_DECOMPRESSED_IN_MEMORY {
        let mut bytes = Vec::with_capacity(size as usize);
        limited.read_to_end(&mut bytes).map_err(failed)?;
        if bytes.len() as u64 != size {
            return Err(failed(io::ErrorKind::UnexpectedEof.into()));
        }
        Arc::new(bytes)
    } else {
        // An unlinked file: gone when the last reader of it is dropped.
        let scratch = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(std::env::temp_dir())
            .map_err(failed)?;
        let mut out = io::BufWriter::with_capacity(64 << 10, &scratch);
        let written = io::copy(&mut limited, &mut out).map_err(failed)?;
        out.flush().map_err(failed)?;
        drop(out);
        if written != size {
            return Err(failed(io::ErrorKind::UnexpectedEof.into()));
        }
        Arc::new(scratch)
    };
    Ok(Some((backing, 0, size)))
}

/// A range of an [`ElfFile`], read in order with positional reads.
struct FileRange<'a> {
    file: &'a ElfFile,
    at: u64,
    end: u64,
}

impl Read for FileRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.end - self.at) as usize;
        self.file.read_at(self.at, &mut buf[..n])?;
        self.at += n as u64;
        Ok(n)
    }
}
