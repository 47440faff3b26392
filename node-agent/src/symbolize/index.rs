//! A compact address index of one file's DWARF, kept on disk per build-id.
//!
//! A lookup through addr2line parses every unit header (the cold cost of a binary of many
//! units), then the whole unit and the whole line program that cover the address (the warm
//! cost). The index records, once per build-id, what those passes find: the units, every
//! subprogram's address ranges with its unit and entry, and every line sequence's range
//! with the offset its rows replay from ([`super::lines`]). A lookup then reads a few
//! entries of the index with `pread`, one subprogram's entries, and one sequence.
//!
//! The file is written to a temporary name and renamed, so a reader sees a whole index or
//! none. It names the file it indexes (build-id, sizes of the file and of its DWARF
//! sections) and carries a CRC-32 of its entries; a file that does not match, is not well
//! formed or is damaged is not used. What an entry leads to is checked where it is used
//! (a subprogram entry, holding the address), and a failed check makes the caller ask
//! addr2line. The index lives in the agent's own state directory: whoever can write there
//! can already change what the agent reports, so it is not defended against a forger.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::dwarf::Reader;
use super::lines;

const MAGIC: &[u8; 8] = b"CWSYMIX2";
const HEADER_BYTES: u64 = 136;
const MAX_BUILD_ID: usize = 64;
const ENTRY_BYTES: u64 = 24;
const CHECKPOINT_BYTES: u64 = 32;
/// At most this many entries per table (functions, sequences, checkpoints: 24 or 32 bytes
/// each, so a build holds at most 128 MiB of its largest table; 1 GiB of DWARF needs about
/// a million).
const MAX_ENTRIES: usize = 4 << 20;
/// How far back from the last entry starting at or before an address a lookup looks for
/// one that covers it (ranges that nest or overlap).
const OVERLAP_SCAN: u64 = 16;

/// What an index was made from: it is used only for the same file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The file's GNU build-id.
    pub build_id: Vec<u8>,
    /// The file's size.
    pub file_size: u64,
    /// The size of its `.debug_info`.
    pub debug_info: u64,
    /// The size of its `.debug_line`.
    pub debug_line: u64,
}

/// Why an index could not be made or used.
#[derive(Debug, Error)]
pub enum IndexError {
    /// Reading or writing it failed.
    #[error("symbol index: {0}")]
    Io(#[from] io::Error),
    /// It is not an index of this file, or not well formed.
    #[error("symbol index {0}: not an index of this file")]
    Mismatch(PathBuf),
    /// The DWARF it would index could not be read.
    #[error("symbol index: invalid DWARF: {0}")]
    Dwarf(#[from] gimli::Error),
    /// A line program could not be run.
    #[error("symbol index: {0}")]
    Lines(#[from] lines::LineError),
    /// The file has more functions and sequences than an index holds.
    #[error("symbol index: more than {MAX_ENTRIES} entries in a table")]
    TooLarge,
    /// An entry names a unit that is not there.
    #[error("symbol index: entry names unit {0}, which it does not list")]
    NoSuchUnit(u32),
}

/// One entry: `[begin, end)`, the unit (its number in the index), and a value (a
/// subprogram's offset in its unit, or where a sequence's rows replay from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// First address.
    pub begin: u64,
    /// First address after.
    pub end: u64,
    /// The unit's number.
    pub unit: u32,
    /// The entry's offset in its unit, or the sequence's replay offset.
    pub value: u32,
}

impl Entry {
    fn to_bytes(self) -> [u8; ENTRY_BYTES as usize] {
        let mut out = [0u8; ENTRY_BYTES as usize];
        out[0..8].copy_from_slice(&self.begin.to_le_bytes());
        out[8..16].copy_from_slice(&self.end.to_le_bytes());
        out[16..20].copy_from_slice(&self.unit.to_le_bytes());
        out[20..24].copy_from_slice(&self.value.to_le_bytes());
        out
    }

    fn from_bytes(bytes: &[u8; ENTRY_BYTES as usize]) -> Entry {
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        Entry {
            begin: u64_at(0),
            end: u64_at(8),
            unit: u32_at(16),
            value: u32_at(20),
        }
    }
}

/// A place to resume a unit's line program from (see [`lines::Checkpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The unit's number.
    pub unit: u32,
    /// Where and with which registers.
    pub at: lines::Checkpoint,
}

impl Checkpoint {
    fn to_bytes(self) -> [u8; CHECKPOINT_BYTES as usize] {
        let mut out = [0u8; CHECKPOINT_BYTES as usize];
        out[0..8].copy_from_slice(&self.at.address.to_le_bytes());
        let words = [
            self.unit,
            self.at.offset as u32,
            self.at.file as u32,
            self.at.line as u32,
            self.at.column as u32,
        ];
        for (i, word) in words.iter().enumerate() {
            out[8 + 4 * i..12 + 4 * i].copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    fn from_bytes(bytes: &[u8; CHECKPOINT_BYTES as usize]) -> Checkpoint {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        Checkpoint {
            unit: u32_at(8),
            at: lines::Checkpoint {
                address: u64::from_le_bytes(bytes[0..8].try_into().unwrap()),
                offset: u64::from(u32_at(12)),
                file: u64::from(u32_at(16)),
                line: u64::from(u32_at(20)),
                column: u64::from(u32_at(24)),
                sequence: 0,
            },
        }
    }
}

/// The address ranges an entry's attributes give, as addr2line reads them.
#[derive(Default)]
pub struct Extent {
    low_pc: Option<u64>,
    high_pc: Option<u64>,
    size: Option<u64>,
    ranges: Option<gimli::RangeListsOffset<usize>>,
}

impl Extent {
    /// Takes in `attribute` if it is one of the range attributes.
    pub fn read(
        &mut self,
        unit: gimli::UnitRef<'_, Reader>,
        attribute: &gimli::Attribute<Reader>,
    ) -> gimli::Result<()> {
        match (attribute.name(), attribute.value()) {
            (gimli::DW_AT_low_pc, gimli::AttributeValue::Addr(a)) => self.low_pc = Some(a),
            (gimli::DW_AT_low_pc, gimli::AttributeValue::DebugAddrIndex(i)) => {
                self.low_pc = Some(unit.address(i)?)
            }
            (gimli::DW_AT_high_pc, gimli::AttributeValue::Addr(a)) => self.high_pc = Some(a),
            (gimli::DW_AT_high_pc, gimli::AttributeValue::DebugAddrIndex(i)) => {
                self.high_pc = Some(unit.address(i)?)
            }
            (gimli::DW_AT_high_pc, gimli::AttributeValue::Udata(size)) => self.size = Some(size),
            (gimli::DW_AT_ranges, value) => self.ranges = unit.attr_ranges_offset(value)?,
            _ => {}
        }
        Ok(())
    }

    /// Whether one of its ranges holds `probe`.
    pub fn holds(&self, unit: gimli::UnitRef<'_, Reader>, probe: u64) -> gimli::Result<bool> {
        let mut holds = false;
        self.for_each(unit, |begin, end| holds |= begin <= probe && probe < end)?;
        Ok(holds)
    }

    /// Calls `f` with each non-empty range.
    pub fn for_each(
        &self,
        unit: gimli::UnitRef<'_, Reader>,
        mut f: impl FnMut(u64, u64),
    ) -> gimli::Result<()> {
        let mut add = |begin: u64, end: u64| {
            if begin < end {
                f(begin, end)
            }
        };
        if let Some(offset) = self.ranges {
            let mut ranges = unit.ranges(offset)?;
            while let Some(range) = ranges.next()? {
                add(range.begin, range.end);
            }
        } else if let (Some(begin), Some(end)) = (self.low_pc, self.high_pc) {
            add(begin, end);
        } else if let (Some(begin), Some(size)) = (self.low_pc, self.size) {
            add(begin, begin.wrapping_add(size));
        }
        Ok(())
    }
}

/// What one unit gives an index: its subprograms' ranges, line sequences and checkpoints,
/// each sorted.
#[derive(Debug, Default)]
pub struct UnitTable {
    /// Subprogram ranges, by `begin`.
    pub functions: Vec<Entry>,
    /// Line sequences, by `begin`.
    pub sequences: Vec<Entry>,
    /// Checkpoints in its long sequences, by address.
    pub checkpoints: Vec<Checkpoint>,
}

impl UnitTable {
    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Entry>() * (self.functions.len() + self.sequences.len())
            + std::mem::size_of::<Checkpoint>() * self.checkpoints.len()
    }

    /// The last checkpoint at or before `probe` within `sequence`.
    pub fn checkpoint_before(&self, probe: u64, sequence: &Entry) -> Option<lines::Checkpoint> {
        let at = self
            .checkpoints
            .partition_point(|c| c.at.address <= probe)
            .checked_sub(1)?;
        let checkpoint = &self.checkpoints[at];
        (sequence.begin <= checkpoint.at.address && checkpoint.at.address < sequence.end)
            .then_some(checkpoint.at)
    }
}

/// The entry of `entries` (by `begin`) covering `probe`, as [`SymbolIndex`] finds it.
pub fn covering(entries: &[Entry], probe: u64) -> Option<Entry> {
    let after = entries.partition_point(|e| e.begin <= probe);
    entries[after.saturating_sub(OVERLAP_SCAN as usize)..after]
        .iter()
        .rev()
        .find(|e| probe < e.end)
        .copied()
}

/// Reads one unit: every subprogram's ranges (wherever it nests), and its line program's
/// sequences and checkpoints, numbered `unit_number`.
pub fn scan_unit(
    unit_ref: gimli::UnitRef<'_, Reader>,
    unit_number: u32,
) -> Result<UnitTable, IndexError> {
    let mut table = UnitTable::default();
    let unit = unit_ref.unit;
    let mut entries = unit.entries_raw(None)?;
    while !entries.is_empty() {
        let die = entries.next_offset();
        let Some(abbreviation) = entries.read_abbreviation()? else {
            continue;
        };
        if abbreviation.tag() != gimli::DW_TAG_subprogram {
            entries.skip_attributes(abbreviation.attributes())?;
            continue;
        }
        let mut extent = Extent::default();
        for spec in abbreviation.attributes() {
            let attribute = entries.read_attribute(*spec)?;
            extent.read(unit_ref, &attribute)?;
        }
        let die = u32::try_from(die.0).map_err(|_| IndexError::TooLarge)?;
        extent.for_each(unit_ref, |begin, end| {
            table.functions.push(Entry {
                begin,
                end,
                unit: unit_number,
                value: die,
            })
        })?;
    }
    if let Some(program) = &unit.line_program {
        let (sequences, checkpoints) = lines::scan(program.header())?;
        let fits = |c: &lines::Checkpoint| {
            [c.offset, c.file, c.line, c.column]
                .iter()
                .all(|v| *v <= u64::from(u32::MAX))
        };
        table.checkpoints = checkpoints
            .into_iter()
            .filter(fits)
            .map(|at| Checkpoint {
                unit: unit_number,
                at,
            })
            .collect();
        for sequence in sequences {
            table.sequences.push(Entry {
                begin: sequence.start,
                end: sequence.end,
                unit: unit_number,
                value: u32::try_from(sequence.replay_from).map_err(|_| IndexError::TooLarge)?,
            });
        }
    }
    if table.functions.len() + table.sequences.len() + table.checkpoints.len() > MAX_ENTRIES {
        return Err(IndexError::TooLarge);
    }
    table
        .functions
        .sort_unstable_by_key(|e| (e.begin, e.unit, e.value));
    table
        .sequences
        .sort_unstable_by_key(|e| (e.begin, e.unit, e.value));
    table
        .checkpoints
        .sort_unstable_by_key(|c| (c.at.address, c.unit, c.at.offset));
    Ok(table)
}

/// A table of fixed-size entries spilled to an unlinked scratch file while the DWARF is
/// read, and sorted only when it is written: building an index holds its largest table, not
/// all of them.
struct Spill<const N: usize> {
    out: io::BufWriter<File>,
    count: u64,
}

impl<const N: usize> Spill<N> {
    fn new(dir: &Path) -> io::Result<Spill<N>> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)?;
        Ok(Spill {
            out: io::BufWriter::with_capacity(64 << 10, file),
            count: 0,
        })
    }

    fn push(&mut self, entry: [u8; N]) -> Result<(), IndexError> {
        self.out.write_all(&entry)?;
        self.count += 1;
        if self.count > MAX_ENTRIES as u64 {
            return Err(IndexError::TooLarge);
        }
        Ok(())
    }

    /// Its entries, sorted by `key`, written to `out` and hashed into `crc`.
    fn write_sorted<K: Ord>(
        self,
        key: impl Fn(&[u8; N]) -> K,
        out: &mut impl Write,
        crc: &mut crc32fast::Hasher,
    ) -> Result<(), IndexError> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        let mut entries = vec![[0u8; N]; self.count as usize];
        file.read_exact_at(entries.as_flattened_mut(), 0)?;
        entries.sort_unstable_by_key(key);
        for entry in &entries {
            crc.update(entry);
            out.write_all(entry)?;
        }
        Ok(())
    }
}

/// The sort key of a function or sequence entry: by address, then unit and value, so that
/// the same DWARF always gives the same index.
fn entry_key(bytes: &[u8; ENTRY_BYTES as usize]) -> (u64, u32, u32) {
    let entry = Entry::from_bytes(bytes);
    (entry.begin, entry.unit, entry.value)
}

/// The sort key of a checkpoint: by address, then unit and offset.
fn checkpoint_key(bytes: &[u8; CHECKPOINT_BYTES as usize]) -> (u64, u32, u64) {
    let checkpoint = Checkpoint::from_bytes(bytes);
    (checkpoint.at.address, checkpoint.unit, checkpoint.at.offset)
}

/// Reads every unit of `dwarf` once (its subprograms' ranges, wherever they nest, and its
/// line sequences) and writes the index of `identity` at `path`, through a temporary file
/// renamed into place.
pub fn build(
    dwarf: &gimli::Dwarf<Reader>,
    path: &Path,
    identity: &Identity,
) -> Result<(), IndexError> {
    if identity.build_id.len() > MAX_BUILD_ID || identity.build_id.is_empty() {
        return Err(IndexError::Mismatch(path.to_owned()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut units: Vec<u64> = Vec::new();
    let mut functions = Spill::<{ ENTRY_BYTES as usize }>::new(dir)?;
    let mut sequences = Spill::<{ ENTRY_BYTES as usize }>::new(dir)?;
    let mut checkpoints = Spill::<{ CHECKPOINT_BYTES as usize }>::new(dir)?;
    let mut headers = dwarf.units();
    while let Some(header) = headers.next()? {
        let unit_number = u32::try_from(units.len()).map_err(|_| IndexError::TooLarge)?;
        let offset = header
            .debug_info_offset()
            .ok_or(gimli::Error::UnsupportedOffset)?;
        units.push(offset.0 as u64);
        let unit = dwarf.unit(header)?;
        let table = scan_unit(gimli::UnitRef::new(dwarf, &unit), unit_number)?;
        for entry in &table.functions {
            functions.push(entry.to_bytes())?;
        }
        for entry in &table.sequences {
            sequences.push(entry.to_bytes())?;
        }
        for checkpoint in &table.checkpoints {
            checkpoints.push(checkpoint.to_bytes())?;
        }
    }
    // What a build of this file that was killed left behind (one agent per node builds).
    if let (Some(dir), Some(stem)) = (path.parent(), path.file_stem()) {
        let prefix = format!("{}.tmp.", stem.to_string_lossy());
        for stray in std::fs::read_dir(dir)?.filter_map(Result::ok) {
            if stray.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(stray.path());
            }
        }
    }
    let temporary = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = (|| -> Result<(), IndexError> {
        let file = File::create(&temporary)?;
        let mut out = io::BufWriter::with_capacity(64 << 10, &file);
        let mut crc = crc32fast::Hasher::new();
        out.write_all(&[0u8; HEADER_BYTES as usize])?;
        for unit in &units {
            crc.update(&unit.to_le_bytes());
            out.write_all(&unit.to_le_bytes())?;
        }
        let counts = [functions.count, sequences.count, checkpoints.count];
        functions.write_sorted(entry_key, &mut out, &mut crc)?;
        sequences.write_sorted(entry_key, &mut out, &mut crc)?;
        checkpoints.write_sorted(checkpoint_key, &mut out, &mut crc)?;
        out.flush()?;
        drop(out);
        let mut header = [0u8; HEADER_BYTES as usize];
        header[0..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&(identity.build_id.len() as u32).to_le_bytes());
        header[12..16].copy_from_slice(&crc.finalize().to_le_bytes());
        header[16..16 + identity.build_id.len()].copy_from_slice(&identity.build_id);
        let numbers = [
            identity.file_size,
            identity.debug_info,
            identity.debug_line,
            units.len() as u64,
            counts[0],
            counts[1],
            counts[2],
        ];
        for (i, n) in numbers.iter().enumerate() {
            header[80 + 8 * i..88 + 8 * i].copy_from_slice(&n.to_le_bytes());
        }
        file.write_all_at(&header, 0)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
        return written;
    }
    std::fs::rename(&temporary, path)?;
    Ok(())
}

/// An index on disk, read entry by entry.
#[derive(Debug)]
pub struct SymbolIndex {
    file: File,
    units: u64,
    functions: u64,
    sequences: u64,
    checkpoints: u64,
}

impl SymbolIndex {
    /// Opens the index at `path` if it is a well-formed index of `identity`.
    pub fn open(path: &Path, identity: &Identity) -> Result<SymbolIndex, IndexError> {
        let mismatch = || IndexError::Mismatch(path.to_owned());
        let file = File::open(path)?;
        let mut header = [0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut header, 0).map_err(|_| mismatch())?;
        let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
        let id_len = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        if &header[0..8] != MAGIC
            || id_len > MAX_BUILD_ID
            || header[16..16 + id_len] != identity.build_id[..]
            || [u64_at(80), u64_at(88), u64_at(96)]
                != [identity.file_size, identity.debug_info, identity.debug_line]
        {
            return Err(mismatch());
        }
        let (units, functions, sequences, checkpoints) =
            (u64_at(104), u64_at(112), u64_at(120), u64_at(128));
        let expected = functions
            .checked_add(sequences)
            .and_then(|entries| entries.checked_mul(ENTRY_BYTES))
            .zip(units.checked_mul(8))
            .and_then(|(a, b)| a.checked_add(b)?.checked_add(HEADER_BYTES))
            .zip(checkpoints.checked_mul(CHECKPOINT_BYTES))
            .and_then(|(a, b)| a.checked_add(b));
        if expected != Some(file.metadata()?.len()) || units > u64::from(u32::MAX) {
            return Err(mismatch());
        }
        // A damaged index (a bad disk, a partial copy) is not used: its entries are read
        // one at a time later, so they are checked here once.
        let crc = u32::from_le_bytes(header[12..16].try_into().unwrap());
        if checksum_from(&file, HEADER_BYTES)? != crc {
            return Err(mismatch());
        }
        Ok(SymbolIndex {
            file,
            units,
            functions,
            sequences,
            checkpoints,
        })
    }

    /// How many units it lists.
    pub fn units(&self) -> usize {
        self.units as usize
    }

    /// The `.debug_info` offset of unit `number`.
    pub fn unit_offset(&self, number: u32) -> Result<u64, IndexError> {
        if u64::from(number) >= self.units {
            return Err(IndexError::NoSuchUnit(number));
        }
        let mut bytes = [0u8; 8];
        self.file
            .read_exact_at(&mut bytes, HEADER_BYTES + 8 * u64::from(number))?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// The number of the unit holding `.debug_info` offset `offset`.
    pub fn unit_holding(&self, offset: u64) -> Result<Option<u32>, IndexError> {
        let (mut low, mut high) = (0u64, self.units);
        while low < high {
            let middle = low + (high - low) / 2;
            if self.unit_offset(middle as u32)? <= offset {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        Ok(low.checked_sub(1).map(|n| n as u32))
    }

    /// The subprogram range covering `probe`.
    pub fn function_at(&self, probe: u64) -> Result<Option<Entry>, IndexError> {
        self.covering(self.functions_start(), self.functions, probe, None)
    }

    /// The line sequence covering `probe`, one of `unit`'s when that is given and there
    /// are several.
    pub fn sequence_at(&self, probe: u64, unit: Option<u32>) -> Result<Option<Entry>, IndexError> {
        let start = self.functions_start() + self.functions * ENTRY_BYTES;
        self.covering(start, self.sequences, probe, unit)
    }

    /// The last checkpoint at or before `probe` in the sequence `sequence`, if it has one.
    pub fn checkpoint_before(
        &self,
        probe: u64,
        sequence: &Entry,
    ) -> Result<Option<lines::Checkpoint>, IndexError> {
        let table = self.functions_start() + (self.functions + self.sequences) * ENTRY_BYTES;
        let read = |i: u64| -> Result<Checkpoint, IndexError> {
            let mut bytes = [0u8; CHECKPOINT_BYTES as usize];
            self.file
                .read_exact_at(&mut bytes, table + i * CHECKPOINT_BYTES)?;
            Ok(Checkpoint::from_bytes(&bytes))
        };
        let (mut low, mut high) = (0u64, self.checkpoints);
        while low < high {
            let middle = low + (high - low) / 2;
            if read(middle)?.at.address <= probe {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        let Some(last) = low.checked_sub(1) else {
            return Ok(None);
        };
        let checkpoint = read(last)?;
        Ok((checkpoint.unit == sequence.unit
            && sequence.begin <= checkpoint.at.address
            && checkpoint.at.address < sequence.end)
            .then_some(checkpoint.at))
    }

    fn functions_start(&self) -> u64 {
        HEADER_BYTES + 8 * self.units
    }

    fn entry(&self, table: u64, i: u64) -> Result<Entry, IndexError> {
        let mut bytes = [0u8; ENTRY_BYTES as usize];
        self.file
            .read_exact_at(&mut bytes, table + i * ENTRY_BYTES)?;
        Ok(Entry::from_bytes(&bytes))
    }

    /// The entry of the table at `table` (`count` entries by `begin`) covering `probe`:
    /// the last one starting at or before it that ends after it, looking a few back for
    /// ranges that overlap; one of `unit`'s first.
    fn covering(
        &self,
        table: u64,
        count: u64,
        probe: u64,
        unit: Option<u32>,
    ) -> Result<Option<Entry>, IndexError> {
        let (mut low, mut high) = (0u64, count);
        while low < high {
            let middle = low + (high - low) / 2;
            if self.entry(table, middle)?.begin <= probe {
                low = middle + 1;
            } else {
                high = middle;
            }
        }
        let mut found = None;
        for i in (low.saturating_sub(OVERLAP_SCAN)..low).rev() {
            let entry = self.entry(table, i)?;
            if probe < entry.end {
                if unit.is_none_or(|u| u == entry.unit) {
                    return Ok(Some(entry));
                }
                found.get_or_insert(entry);
            }
        }
        Ok(found)
    }
}

/// The CRC-32 of `file` from `offset` to its end, read in blocks.
fn checksum_from(file: &File, mut offset: u64) -> io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut block = vec![0u8; 256 << 10];
    loop {
        let n = file.read_at(&mut block, offset)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&block[..n]);
        offset += n as u64;
    }
}

/// The index file of the file with `build_id` in `dir`.
pub fn path_in(dir: &Path, build_id: &[u8]) -> PathBuf {
    dir.join(format!("{}.index", super::elf::hex(build_id)))
}

/// Removes the least recently written indexes of `dir` until the rest fit in `limit` bytes.
pub fn evict(dir: &Path, limit: u64) -> io::Result<()> {
    let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "index"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, meta.len(), e.path()))
        })
        .collect();
    files.sort();
    let mut total: u64 = files.iter().map(|f| f.1).sum();
    for (_, len, path) in files {
        if total <= limit {
            break;
        }
        std::fs::remove_file(&path)?;
        total -= len;
    }
    Ok(())
}
