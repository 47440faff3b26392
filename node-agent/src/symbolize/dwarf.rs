//! Source frames from DWARF (through addr2line), and from the symbol table when there is none.

use std::borrow::Cow;
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use crds::Frame;
use gimli::{Reader as _, RunTimeEndian};
use object::{Object, ObjectSection};
use thiserror::Error;

use super::elf::{ElfFile, Image, MAX_FILE_SIZE};
use super::index::{self, Entry, Extent, Identity, IndexError, SymbolIndex, UnitTable};
use super::lines;
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

/// Parsed units cost at most about this many times their DWARF bytes (entries and line
/// rows turned into addr2line's structures): measured, with nothing ever dropped, 1.1 on
/// the agent's own rustc output (1000 lookups: 90 MiB for 80 MiB of units) and 0.4 on gcc's
/// C++ (413 MiB for 1 GiB); 2 keeps a margin.
const PARSED_PER_DWARF_BYTE: usize = 2;

/// What one unit parsed for a lookup is counted as holding (its abbreviations and line
/// program header).
const PARSED_UNIT_BYTES: usize = 32 << 10;

/// Compressed sections up to this size are decompressed into memory; larger ones into an
/// unlinked scratch file, read through the page cache like any other section.
const MAX_DECOMPRESSED_IN_MEMORY: u64 = 1 << 20;

/// Parsed debug information of one file.
pub struct DebugInfo {
    /// addr2line's context, made when first needed (at once without an index).
    context: OnceCell<Option<addr2line::Context<Reader>>>,
    /// The DWARF the context reads, to check units before addr2line walks them.
    dwarf: Option<Arc<gimli::Dwarf<Reader>>>,
    /// The file's symbol index, when one was found for it: lookups go through it.
    index: Option<SymbolIndex>,
    /// Without one, the `.debug_info` offsets of every unit, read from their headers on
    /// the first lookup: the units are numbered by them.
    unit_offsets: OnceCell<Option<Vec<u64>>>,
    /// Without one, the tables made in memory for the units lookups needed, by number.
    unit_tables: RefCell<HashMap<u32, Arc<UnitTable>>>,
    /// The bytes those tables, and the units parsed for lookups, hold.
    table_bytes: Cell<usize>,
    /// Where lookups are counted.
    counts: Arc<LookupCounts>,
    /// The units lookups led to, parsed once each, by number.
    index_units: OnceCell<Box<[ParsedUnit]>>,
    /// The address ranges of the units, `(begin, end, .debug_info offset)`, made once
    /// (none when they do not parse).
    unit_ranges: OnceCell<Option<UnitRanges>>,
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

/// A unit parsed once for lookups; none when it does not parse.
type ParsedUnit = OnceCell<Option<gimli::Unit<Reader>>>;

/// Why a lookup through the symbol index gave no answer (addr2line is asked instead).
#[derive(Debug, Error)]
enum IndexedError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Dwarf(#[from] gimli::Error),
    #[error(transparent)]
    Lines(#[from] lines::LineError),
    #[error("the index names no unit there")]
    NoUnit,
    #[error("the index names no subprogram there")]
    NotASubprogram,
    #[error("entries nest too deep")]
    TooDeep,
    #[error("a name in the supplementary file")]
    Supplementary,
}

/// How lookups went: through a symbol index, through tables made in memory, and how many
/// of those gave no answer and asked addr2line. Shared by the files a symbolizer loads.
#[derive(Debug, Default)]
pub struct LookupCounts([std::sync::atomic::AtomicU64; 3]);

impl LookupCounts {
    fn add(&self, which: usize) {
        self.0[which].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counts now.
    pub fn get(&self) -> Lookups {
        let load = |i: usize| self.0[i].load(std::sync::atomic::Ordering::Relaxed);
        Lookups {
            indexed: load(0),
            in_memory: load(1),
            to_addr2line: load(2),
        }
    }
}

/// Counts of lookups by the way they went (see [`LookupCounts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookups {
    /// Through a symbol index on disk.
    pub indexed: u64,
    /// Through unit tables made in memory.
    pub in_memory: u64,
    /// Of either, answered by addr2line instead.
    pub to_addr2line: u64,
}

/// One inlined call holding an address: its name and where it was called from.
struct InlinedCall {
    name: Option<Reader>,
    file: Option<u64>,
    line: u32,
    column: u32,
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
        DebugInfo::load_indexed(file, supplementary, budget, None, Arc::default())
    }

    /// Loads as [`DebugInfo::load_within`] does; with `index` (the file's
    /// [`SymbolIndex`]) lookups read it, without one they make tables in memory for the units
    /// they need; addr2line is made only for a lookup neither answers. Lookups are counted
    /// in `counts`.
    pub fn load_indexed(
        file: &ElfFile,
        supplementary: Option<&ElfFile>,
        budget: Budget,
        index: Option<SymbolIndex>,
        counts: Arc<LookupCounts>,
    ) -> Result<DebugInfo, DebugInfoError> {
        let image = file.image();
        let object = object::File::parse(&image)?;
        let pages = PageCache::new(budget.pages);
        let context = OnceCell::new();
        let dwarf = if file.has_dwarf {
            let mut dwarf = load_dwarf(file, &object, &pages)?;
            if let Some(sup) = supplementary {
                let sup_image = sup.image();
                let sup_object = object::File::parse(&sup_image)?;
                dwarf.set_sup(load_dwarf(sup, &sup_object, &pages)?);
            }
            Some(Arc::new(dwarf))
        } else {
            None
        };
        let index = index.filter(|_| dwarf.is_some());
        let symbols = Symbols::index(file, &object);
        let bytes = budget.bytes() + symbols.bytes();
        Ok(DebugInfo {
            context,
            dwarf,
            index,
            unit_offsets: OnceCell::new(),
            unit_tables: RefCell::default(),
            table_bytes: Cell::new(0),
            counts,
            index_units: OnceCell::new(),
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

    /// Whether lookups go through a symbol index.
    pub fn is_indexed(&self) -> bool {
        self.index.is_some()
    }

    /// Keeps the parsed units within the budget: when the units looked at since the
    /// context was made may hold more, addr2line's context and the units the index led to
    /// are dropped, to be made anew, empty, when next needed.
    pub fn trim(&mut self) {
        let estimate = self
            .touched_bytes
            .get()
            .saturating_mul(PARSED_PER_DWARF_BYTE)
            .saturating_add(self.table_bytes.get());
        if estimate <= self.budget.parsed {
            return;
        }
        tracing::debug!(estimate, "parsed units over budget: dropped");
        self.context = OnceCell::new();
        self.index_units = OnceCell::new();
        self.unit_tables.get_mut().clear();
        self.table_bytes.set(0);
        self.touched_bytes.set(0);
        self.walkable.get_mut().clear();
    }

    /// addr2line's context, made now if it was not.
    fn context(&self) -> Option<&addr2line::Context<Reader>> {
        self.context
            .get_or_init(|| {
                let dwarf = self.dwarf.as_ref()?;
                addr2line::Context::from_arc_dwarf(dwarf.clone())
                    .inspect_err(|err| tracing::warn!(%err, "DWARF no longer parses; symbols only"))
                    .ok()
            })
            .as_ref()
    }

    /// Whether DWARF was loaded.
    pub fn has_dwarf(&self) -> bool {
        self.dwarf.is_some()
    }

    /// The DWARF unit covering `vaddr`, unless its entries nest deeper than any walk of
    /// them may recurse.
    pub fn unit_at(&self, vaddr: u64) -> Option<gimli::UnitRef<'_, Reader>> {
        match self.entries_at(vaddr) {
            Ok((function, sequence)) => {
                if let Ok(unit) = self.indexed_unit(function.or(sequence)?.unit) {
                    return Some(unit);
                }
            }
            Err(err) => tracing::debug!(%err, vaddr, "no unit from the unit tables"),
        }
        if !self.walkable_at(vaddr) {
            return None;
        }
        self.context()?.find_dwarf_and_unit(vaddr).skip_all_loads()
    }

    /// Whether every unit covering `vaddr` nests its entries at most [`MAX_ENTRY_DEPTH`]
    /// deep. Checked before addr2line looks at a unit: even finding the function at an
    /// address makes it parse the function's inlined subroutines, recursively.
    fn walkable_at(&self, vaddr: u64) -> bool {
        let Some(dwarf) = &self.dwarf else {
            return true;
        };
        let Some(ranges) = self.unit_ranges.get_or_init(|| UnitRanges::of(dwarf)) else {
            return false;
        };
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
        if let Ok((function, _)) = self.entries_at(vaddr) {
            return Some(gimli::UnitOffset(function?.value as usize));
        }
        let context = self.context()?;
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
        if self.dwarf.is_some() {
            self.counts.add(if self.index.is_some() { 0 } else { 1 });
            match self.indexed_frames(vaddr) {
                Ok(frames) => return Ok(frames),
                Err(err) => {
                    self.counts.add(2);
                    tracing::debug!(%err, vaddr, "no answer from the unit tables; asking addr2line")
                }
            }
        }
        let Some(context) = self.context() else {
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

    /// The number of units: the index's, or read from the units' headers once.
    fn unit_count(&self) -> Result<usize, IndexedError> {
        if let Some(index) = &self.index {
            return Ok(index.units());
        }
        Ok(self.unit_offsets()?.len())
    }

    /// Without an index, the offsets of every unit, from their headers.
    fn unit_offsets(&self) -> Result<&[u64], IndexedError> {
        let offsets = self.unit_offsets.get_or_init(|| {
            let dwarf = self.dwarf.as_ref()?;
            let mut offsets = Vec::new();
            let mut headers = dwarf.units();
            // All of them or none: a unit missing from the list would hide its functions.
            while let Some(header) = headers.next().ok()? {
                offsets.push(header.debug_info_offset()?.0 as u64);
            }
            Some(offsets)
        });
        offsets.as_deref().ok_or(IndexedError::NoUnit)
    }

    /// The `.debug_info` offset of unit `number`.
    fn unit_offset(&self, number: u32) -> Result<u64, IndexedError> {
        match &self.index {
            Some(index) => Ok(index.unit_offset(number)?),
            None => self
                .unit_offsets()?
                .get(number as usize)
                .copied()
                .ok_or(IndexedError::NoUnit),
        }
    }

    /// The number of the unit holding `.debug_info` offset `offset`.
    fn unit_holding(&self, offset: u64) -> Result<u32, IndexedError> {
        let number = match &self.index {
            Some(index) => index.unit_holding(offset)?,
            None => self
                .unit_offsets()?
                .partition_point(|o| *o <= offset)
                .checked_sub(1)
                .map(|n| n as u32),
        };
        number.ok_or(IndexedError::NoUnit)
    }

    /// The table of unit `number`, made in memory when first needed.
    fn unit_table(&self, number: u32) -> Result<Arc<UnitTable>, IndexedError> {
        if let Some(table) = self.unit_tables.borrow().get(&number) {
            return Ok(table.clone());
        }
        let table = Arc::new(index::scan_unit(self.indexed_unit(number)?, number)?);
        self.table_bytes.set(self.table_bytes.get() + table.bytes());
        self.unit_tables.borrow_mut().insert(number, table.clone());
        Ok(table)
    }

    /// The subprogram range and the line sequence covering `vaddr`: from the index, or
    /// from the tables of the units covering it, the first that has either, as addr2line
    /// looks through them.
    fn entries_at(&self, vaddr: u64) -> Result<(Option<Entry>, Option<Entry>), IndexedError> {
        if let Some(index) = &self.index {
            let function = index.function_at(vaddr)?;
            let sequence = index.sequence_at(vaddr, function.map(|f| f.unit))?;
            return Ok((function, sequence));
        }
        let dwarf = self.dwarf.as_ref().ok_or(IndexedError::NoUnit)?;
        let ranges = self
            .unit_ranges
            .get_or_init(|| UnitRanges::of(dwarf))
            .as_ref()
            .ok_or(IndexedError::NoUnit)?;
        let offsets = self.unit_offsets()?;
        for offset in ranges.covering_by_end(vaddr) {
            let number = offsets
                .binary_search(&(offset as u64))
                .map_err(|_| IndexedError::NoUnit)? as u32;
            let table = self.unit_table(number)?;
            let function = index::covering(&table.functions, vaddr);
            let sequence = index::covering(&table.sequences, vaddr);
            if function.is_some() || sequence.is_some() {
                return Ok((function, sequence));
            }
        }
        Ok((None, None))
    }

    /// The last checkpoint at or before `vaddr` in `sequence`.
    fn checkpoint_before(
        &self,
        vaddr: u64,
        sequence: &Entry,
    ) -> Result<Option<lines::Checkpoint>, IndexedError> {
        match &self.index {
            Some(index) => Ok(index.checkpoint_before(vaddr, sequence)?),
            None => Ok(self
                .unit_table(sequence.unit)?
                .checkpoint_before(vaddr, sequence)),
        }
    }

    /// The unit numbered `number`, parsed once.
    fn indexed_unit(&self, number: u32) -> Result<gimli::UnitRef<'_, Reader>, IndexedError> {
        let dwarf = self.dwarf.as_ref().ok_or(IndexedError::NoUnit)?;
        let count = self.unit_count()?;
        let cells = self
            .index_units
            .get_or_init(|| (0..count).map(|_| OnceCell::new()).collect());
        let cell = cells.get(number as usize).ok_or(IndexedError::NoUnit)?;
        let unit = cell.get_or_init(|| {
            let offset = self.unit_offset(number).ok()?;
            let header = dwarf
                .debug_info
                .header_from_offset(gimli::DebugInfoOffset(usize::try_from(offset).ok()?))
                .ok()?;
            self.table_bytes
                .set(self.table_bytes.get() + PARSED_UNIT_BYTES);
            dwarf.unit(header).ok()
        });
        let unit = unit.as_ref().ok_or(IndexedError::NoUnit)?;
        Ok(gimli::UnitRef::new(dwarf, unit))
    }

    /// The frames of `vaddr` from the index: the subprogram covering it and its inlined
    /// calls that do, and the line row of the sequence covering it, as addr2line gives
    /// them.
    fn indexed_frames(&self, vaddr: u64) -> Result<Vec<Frame>, IndexedError> {
        let (function, sequence) = self.entries_at(vaddr)?;
        // addr2line reads the location from the function's own unit.
        let sequence = sequence.filter(|s| function.is_none_or(|f| f.unit == s.unit));
        let location = match sequence {
            Some(sequence) => {
                let unit = self.indexed_unit(sequence.unit)?;
                let program = unit.line_program.as_ref().ok_or(IndexedError::NoUnit)?;
                let row = match self.checkpoint_before(vaddr, &sequence)? {
                    Some(checkpoint) => lines::row_from(program.header(), &checkpoint, vaddr)?,
                    None => {
                        let rows = lines::rows(program.header(), u64::from(sequence.value))?;
                        lines::row_at(&rows, vaddr)
                    }
                };
                match row {
                    Some(row) => Some((
                        file_name(unit, row.file)?,
                        (row.line != 0).then_some(row.line),
                        (row.line != 0).then_some(row.column),
                    )),
                    None => None,
                }
            }
            None => None,
        };
        let Some(function) = function else {
            return Ok(match location {
                Some((file, line, column)) => vec![Frame {
                    function: None,
                    file,
                    line,
                    column,
                    inlined: false,
                    module: None,
                }],
                None => Vec::new(),
            });
        };
        let unit = self.indexed_unit(function.unit)?;
        let (name, calls) =
            self.inlined_calls(unit, gimli::UnitOffset(function.value as usize), vaddr)?;
        let language = language(unit);
        let demangled = |name: &Option<Reader>| -> Result<Option<String>, IndexedError> {
            Ok(match name {
                Some(name) => {
                    Some(addr2line::demangle_auto(name.to_string_lossy()?, language).into_owned())
                }
                None => None,
            })
        };
        let (mut file, mut line, mut column) = location.unwrap_or((None, None, None));
        let mut frames = Vec::with_capacity(calls.len() + 1);
        for call in calls.iter().rev() {
            frames.push(Frame {
                function: demangled(&call.name)?,
                file,
                line,
                column,
                inlined: true,
                module: None,
            });
            file = match call.file {
                Some(index) => file_name(unit, index)?,
                None => None,
            };
            line = (call.line != 0).then_some(call.line);
            column = (call.column != 0).then_some(call.column);
        }
        frames.push(Frame {
            function: demangled(&name)?,
            file,
            line,
            column,
            inlined: false,
            module: None,
        });
        Ok(frames)
    }

    /// The name of the subprogram at `offset` and its inlined calls that hold `probe`,
    /// outermost first, read as addr2line reads them (without recursion).
    fn inlined_calls(
        &self,
        unit: gimli::UnitRef<'_, Reader>,
        offset: gimli::UnitOffset,
        probe: u64,
    ) -> Result<(Option<Reader>, Vec<InlinedCall>), IndexedError> {
        let mut entries = unit.entries_raw(Some(offset))?;
        let base = entries.next_depth();
        let abbreviation = entries
            .read_abbreviation()?
            .filter(|a| a.tag() == gimli::DW_TAG_subprogram)
            .ok_or(IndexedError::NotASubprogram)?;
        let mut name = None;
        let mut extent = Extent::default();
        for spec in abbreviation.attributes() {
            let attribute = entries.read_attribute(*spec)?;
            extent.read(unit, &attribute)?;
            self.take_name(unit, &attribute, &mut name)?;
        }
        if !extent.holds(unit, probe)? {
            return Err(IndexedError::NotASubprogram);
        }
        let mut calls = Vec::new();
        // The depth of the innermost entry known to hold `probe`.
        let mut holding = base;
        while !entries.is_empty() {
            let depth = entries.next_depth();
            if depth <= holding {
                break;
            }
            if depth - base > MAX_ENTRY_DEPTH {
                return Err(IndexedError::TooDeep);
            }
            let Some(abbreviation) = entries.read_abbreviation()? else {
                continue;
            };
            match abbreviation.tag() {
                gimli::DW_TAG_subprogram => {
                    entries.skip_attributes(abbreviation.attributes())?;
                    skip_children(&mut entries, depth)?;
                }
                gimli::DW_TAG_inlined_subroutine => {
                    let mut extent = Extent::default();
                    let mut call = InlinedCall {
                        name: None,
                        file: None,
                        line: 0,
                        column: 0,
                    };
                    for spec in abbreviation.attributes() {
                        let attribute = entries.read_attribute(*spec)?;
                        extent.read(unit, &attribute)?;
                        self.take_name(unit, &attribute, &mut call.name)?;
                        match attribute.name() {
                            gimli::DW_AT_call_file => {
                                if let gimli::AttributeValue::FileIndex(file) = attribute.value()
                                    && (file > 0 || unit.header.version() >= 5)
                                {
                                    call.file = Some(file);
                                }
                            }
                            gimli::DW_AT_call_line => {
                                call.line = attribute.udata_value().unwrap_or(0) as u32
                            }
                            gimli::DW_AT_call_column => {
                                call.column = attribute.udata_value().unwrap_or(0) as u32
                            }
                            _ => {}
                        }
                    }
                    if extent.holds(unit, probe)? {
                        calls.push(call);
                        holding = depth;
                    } else {
                        skip_children(&mut entries, depth)?;
                    }
                }
                _ => entries.skip_attributes(abbreviation.attributes())?,
            }
        }
        Ok((name, calls))
    }

    /// Takes `attribute` into `name` as addr2line does: a linkage name first, then a name,
    /// then the name of the entry an abstract origin or specification points to.
    fn take_name(
        &self,
        unit: gimli::UnitRef<'_, Reader>,
        attribute: &gimli::Attribute<Reader>,
        name: &mut Option<Reader>,
    ) -> Result<(), IndexedError> {
        match attribute.name() {
            gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                if let Ok(value) = unit.attr_string(attribute.value()) {
                    *name = Some(value);
                }
            }
            gimli::DW_AT_name if name.is_none() => *name = unit.attr_string(attribute.value()).ok(),
            gimli::DW_AT_abstract_origin | gimli::DW_AT_specification if name.is_none() => {
                *name = self.referenced_name(unit, attribute.value())?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The name of the entry `value` points to, following abstract origins and
    /// specifications at most 16 times, as addr2line does.
    fn referenced_name(
        &self,
        unit: gimli::UnitRef<'_, Reader>,
        value: gimli::AttributeValue<Reader>,
    ) -> Result<Option<Reader>, IndexedError> {
        let mut unit = unit;
        let mut value = value;
        for _ in 0..16 {
            let offset = match value {
                gimli::AttributeValue::UnitRef(offset) => offset,
                gimli::AttributeValue::DebugInfoRef(offset) => {
                    unit = self.indexed_unit(self.unit_holding(offset.0 as u64)?)?;
                    offset
                        .to_unit_offset(&unit.header)
                        .ok_or(IndexedError::NoUnit)?
                }
                gimli::AttributeValue::DebugInfoRefSup(_) => {
                    return Err(IndexedError::Supplementary);
                }
                _ => return Ok(None),
            };
            let mut entries = unit.entries_raw(Some(offset))?;
            let abbreviation = entries
                .read_abbreviation()?
                .ok_or(gimli::Error::NoEntryAtGivenOffset(offset.0 as u64))?;
            let mut name = None;
            let mut next = None;
            for spec in abbreviation.attributes() {
                let attribute = entries.read_attribute(*spec)?;
                match attribute.name() {
                    gimli::DW_AT_linkage_name | gimli::DW_AT_MIPS_linkage_name => {
                        if let Ok(value) = unit.attr_string(attribute.value()) {
                            return Ok(Some(value));
                        }
                    }
                    gimli::DW_AT_name => {
                        if let Ok(value) = unit.attr_string(attribute.value()) {
                            name = Some(value);
                        }
                    }
                    gimli::DW_AT_abstract_origin | gimli::DW_AT_specification => {
                        next = Some(attribute.value());
                    }
                    _ => {}
                }
            }
            if name.is_some() {
                return Ok(name);
            }
            match next {
                Some(next) => value = next,
                None => return Ok(None),
            }
        }
        Ok(None)
    }

    /// The symbol containing `vaddr`, the offset into it, and its source file when the
    /// symbol table names one, from `.symtab`/`.dynsym`.
    pub fn symbol(&self, vaddr: u64) -> Option<(String, u64, Option<String>)> {
        self.symbols.at(vaddr)
    }
}

/// What identifies `file`'s DWARF for its symbol index: none without a build-id or DWARF.
pub fn identity(file: &ElfFile) -> Option<Identity> {
    let build_id = file.build_id.clone().filter(|_| file.has_dwarf)?;
    let image = file.image();
    let object = object::File::parse(&image).ok()?;
    let size = |name| object.section_by_name(name).map_or(0, |s| s.size());
    Some(Identity {
        build_id,
        file_size: file.size,
        debug_info: size(".debug_info"),
        debug_line: size(".debug_line"),
    })
}

/// Scans `file`'s DWARF once and writes its symbol index into `dir` (see [`super::index`]),
/// reading through a page cache of its own.
pub fn build_index(file: &ElfFile, dir: &Path, identity: &Identity) -> Result<(), IndexError> {
    let image = file.image();
    let object = object::File::parse(&image).map_err(|e| IndexError::Io(io::Error::other(e)))?;
    // One pass in order: a few pages at a time are enough.
    let pages = PageCache::new(MIN_PAGE_BYTES);
    let dwarf = load_dwarf(file, &object, &pages)
        .map_err(|e| IndexError::Io(io::Error::other(e.to_string())))?;
    std::fs::create_dir_all(dir)?;
    index::build(&dwarf, &index::path_in(dir, &identity.build_id), identity)?;
    index::evict(dir, super::INDEX_DIR_LIMIT)?;
    Ok(())
}

/// Skips the children of the entry at `depth` whose attributes were just read.
fn skip_children(entries: &mut gimli::EntriesRaw<'_, Reader>, depth: isize) -> gimli::Result<()> {
    while !entries.is_empty() && entries.next_depth() > depth {
        if let Some(abbreviation) = entries.read_abbreviation()? {
            entries.skip_attributes(abbreviation.attributes())?;
        }
    }
    Ok(())
}

/// The unit's source language, for demangling.
fn language(unit: gimli::UnitRef<'_, Reader>) -> Option<gimli::DwLang> {
    let mut entries = unit.entries();
    let root = entries.next_dfs().ok()??;
    match root.attr_value(gimli::DW_AT_language)? {
        gimli::AttributeValue::Language(language) => Some(language),
        _ => None,
    }
}

/// The path of file `index` of the unit's line program, as addr2line renders it: the
/// compilation directory, the file's directory unless it is number 0, then its name.
fn file_name(unit: gimli::UnitRef<'_, Reader>, index: u64) -> Result<Option<String>, IndexedError> {
    let Some(program) = &unit.line_program else {
        return Ok(None);
    };
    let header = program.header();
    let Some(file) = header.file(index) else {
        // Before DWARF 5 file 0 is none, and addr2line gives it as "".
        return Ok((index == 0).then(String::new));
    };
    let mut path = match &unit.comp_dir {
        Some(dir) => dir.to_string_lossy()?.into_owned(),
        None => String::new(),
    };
    if file.directory_index() != 0
        && let Some(directory) = file.directory(header)
    {
        path_push(&mut path, &unit.attr_string(directory)?.to_string_lossy()?);
    }
    path_push(
        &mut path,
        &unit.attr_string(file.path_name())?.to_string_lossy()?,
    );
    Ok(Some(path))
}

/// Appends `part` to `path` as addr2line does: an absolute part replaces it.
fn path_push(path: &mut String, part: &str) {
    let forward_root = |p: &str| p.starts_with('/') || p.get(1..3) == Some(":/");
    let backward_root = |p: &str| p.starts_with('\\') || p.get(1..3) == Some(":\\");
    if forward_root(part) || backward_root(part) {
        *path = part.to_owned();
        return;
    }
    let separator = if backward_root(path) { '\\' } else { '/' };
    if !path.is_empty() && !path.ends_with(separator) {
        path.push(separator);
    }
    path.push_str(part);
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
    fn of(dwarf: &gimli::Dwarf<Reader>) -> Option<UnitRanges> {
        let mut ranges = Vec::new();
        let mut listed = std::collections::HashSet::new();
        // Strict, as addr2line is: a section that stops parsing half-way (a file cut short
        // while it is read) lists no units rather than some of them.
        let mut headers = dwarf.debug_aranges.headers();
        while let Some(header) = headers.next().ok()? {
            let offset = header.debug_info_offset().0;
            let mut entries = header.entries();
            let mut any = false;
            while let Some(entry) = entries.next().ok()? {
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
        while let Some(header) = headers.next().ok()? {
            let Some(offset) = header.debug_info_offset().map(|o| o.0) else {
                continue;
            };
            if listed.contains(&offset) {
                continue;
            }
            let Ok(unit) = dwarf.unit(header) else {
                continue;
            };
            let mut iter = dwarf.unit_ranges(&unit).ok()?;
            while let Some(range) = iter.next().ok()? {
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
        Some(UnitRanges { ranges, max_end })
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

    /// The same units, in the order addr2line tries them: by the end of their range.
    fn covering_by_end(&self, vaddr: u64) -> Vec<usize> {
        let after = self.ranges.partition_point(|(begin, _, _)| *begin <= vaddr);
        let mut found: Vec<(u64, usize, usize)> = (0..after)
            .rev()
            .take_while(|&i| self.max_end[i] > vaddr)
            .filter(|&i| vaddr < self.ranges[i].1)
            .map(|i| (self.ranges[i].1, i, self.ranges[i].2))
            .collect();
        found.sort_unstable();
        let mut offsets: Vec<usize> = found.into_iter().map(|(_, _, offset)| offset).collect();
        offsets.dedup();
        offsets
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
