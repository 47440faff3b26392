//! Source frames from DWARF (through addr2line), and from the symbol table when there is none.

use std::borrow::Cow;
use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use crds::Frame;
use gimli::{EndianArcSlice, RunTimeEndian};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use thiserror::Error;

use super::elf::{ElfFile, Image, MAX_FILE_SIZE};

/// The reader type: sections share the file's bytes, or own their decompressed copy.
pub type Reader = EndianArcSlice<RunTimeEndian>;

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

#[derive(Debug, Clone)]
struct Symbol {
    address: u64,
    size: u64,
    name: String,
    file: Option<String>,
}

/// How deep DWARF entries may nest in a unit that is walked. addr2line parses a function's
/// inlined subroutines recursively, and a stack overflow aborts the agent whatever
/// `catch_unwind` does; compilers nest far less (a few dozen levels).
const MAX_ENTRY_DEPTH: isize = 512;

/// Parsed debug information of one file.
pub struct DebugInfo {
    context: Option<addr2line::Context<Reader>>,
    /// The DWARF the context reads, to check units before addr2line walks them.
    dwarf: Option<Arc<gimli::Dwarf<Reader>>>,
    /// The address ranges of the units, `(begin, end, .debug_info offset)`, made once.
    unit_ranges: OnceCell<Vec<(u64, u64, usize)>>,
    /// Units already checked for their nesting depth: whether they may be walked.
    walkable: RefCell<HashMap<usize, bool>>,
    symbols: Vec<Symbol>,
    /// Roughly how many bytes this holds: the sections read, decompressed, and the symbols.
    pub bytes: usize,
}

impl DebugInfo {
    /// Loads DWARF (if the file has line information) and the symbol tables of `file`.
    /// `supplementary` is the dwz file its `.gnu_debugaltlink` names, when found.
    ///
    /// Only the DWARF sections addr2line and the member analysis use are read, and the
    /// symbol and string tables while the symbols are collected; nothing else of the file.
    pub fn load(
        file: &ElfFile,
        supplementary: Option<&ElfFile>,
    ) -> Result<DebugInfo, DebugInfoError> {
        let image = file.image();
        let object = object::File::parse(&image)?;
        let mut held = 0usize;
        let (context, dwarf) = if file.has_dwarf {
            let mut dwarf = load_dwarf(file, &object, &mut held)?;
            if let Some(sup) = supplementary {
                let sup_image = sup.image();
                let sup_object = object::File::parse(&sup_image)?;
                dwarf.set_sup(load_dwarf(sup, &sup_object, &mut held)?);
            }
            let dwarf = Arc::new(dwarf);
            (
                Some(addr2line::Context::from_arc_dwarf(dwarf.clone())?),
                Some(dwarf),
            )
        } else {
            (None, None)
        };
        // The string tables are read whole, once, rather than a string at a time.
        for name in [".strtab", ".dynstr"] {
            if let Some((offset, size)) = object.section_by_name(name).and_then(|s| s.file_range())
            {
                image.preload(offset..offset.saturating_add(size));
            }
        }
        // Local symbols follow the STT_FILE symbol of their source file, which names the
        // file when there is no DWARF (llvm-symbolizer reports it too).
        let mut symbols = Vec::new();
        let mut current_file: Option<String> = None;
        for symbol in object.symbols().chain(object.dynamic_symbols()) {
            match symbol.kind() {
                SymbolKind::File => {
                    current_file = symbol
                        .name()
                        .ok()
                        .filter(|n| !n.is_empty())
                        .map(str::to_owned)
                }
                SymbolKind::Text if symbol.address() != 0 => {}
                // Untyped labels in code (assembly, the C runtime's start-up code) name
                // code as llvm-symbolizer does; not ARM's `$x`/`$d` mapping symbols.
                SymbolKind::Unknown if is_code_label(&object, &symbol) => {}
                _ => continue,
            }
            let Ok(name) = symbol.name() else { continue };
            let file = if symbol.is_local() {
                current_file.clone()
            } else {
                None
            };
            symbols.push(Symbol {
                address: symbol.address(),
                size: symbol.size(),
                name: name.to_owned(),
                file,
            });
        }
        symbols.sort_by_key(|s| (s.address, std::cmp::Reverse(s.size)));
        symbols.dedup_by_key(|s| s.address);
        symbols.shrink_to_fit();
        let symbol_bytes: usize = symbols
            .iter()
            .map(|s| {
                std::mem::size_of::<Symbol>()
                    + s.name.len()
                    + s.file.as_ref().map_or(0, String::len)
            })
            .sum();
        Ok(DebugInfo {
            context,
            dwarf,
            unit_ranges: OnceCell::new(),
            walkable: RefCell::default(),
            symbols,
            bytes: held + symbol_bytes,
        })
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
        let ranges = self.unit_ranges.get_or_init(|| unit_ranges(dwarf));
        for &(_, _, offset) in ranges
            .iter()
            .filter(|(begin, end, _)| (*begin..*end).contains(&vaddr))
        {
            let walkable = *self.walkable.borrow_mut().entry(offset).or_insert_with(|| {
                let within = dwarf
                    .debug_info
                    .header_from_offset(gimli::DebugInfoOffset(offset))
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
        let index = self
            .symbols
            .partition_point(|s| s.address <= vaddr)
            .checked_sub(1)?;
        let symbol = &self.symbols[index];
        let inside = symbol.size == 0 || vaddr < symbol.address.saturating_add(symbol.size);
        inside.then(|| {
            (
                addr2line::demangle_auto(Cow::Borrowed(&symbol.name), None).into_owned(),
                vaddr - symbol.address,
                symbol.file.clone(),
            )
        })
    }
}

/// Whether an untyped symbol labels code: defined in an executable section, and not a
/// mapping symbol (`$x`, `$d.1`: where ARM code or data starts, never a function name).
fn is_code_label<'data>(
    object: &object::File<'data, &'data Image>,
    symbol: &object::Symbol<'data, '_, &'data Image>,
) -> bool {
    let in_code = match symbol.section() {
        object::SymbolSection::Section(index) => object
            .section_by_index(index)
            .is_ok_and(|s| s.kind() == object::SectionKind::Text),
        _ => false,
    };
    in_code
        && symbol.address() != 0
        && symbol
            .name()
            .is_ok_and(|n| !n.is_empty() && !n.starts_with('$'))
}

/// The address ranges of every compilation unit, with the unit's `.debug_info` offset.
fn unit_ranges(dwarf: &gimli::Dwarf<Reader>) -> Vec<(u64, u64, usize)> {
    let mut ranges = Vec::new();
    let mut headers = dwarf.units();
    while let Ok(Some(header)) = headers.next() {
        let offset = header.offset().0;
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
    ranges
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

/// The DWARF sections of `file`; adds the bytes read or decompressed to `held`.
fn load_dwarf<'a>(
    file: &ElfFile,
    object: &object::File<'a, &'a Image>,
    held: &mut usize,
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
            return Ok(EndianArcSlice::new(Arc::from(&[][..]), endian));
        }
        let (bytes, range) = load_section(object, file, name)?;
        // A buffer of its own (read or decompressed), not a slice of a file in memory.
        if Arc::strong_count(&bytes) == 1 {
            *held += bytes.len();
        }
        Ok(EndianArcSlice::new(bytes, endian).range(range))
    })
}

/// A section's bytes: read from the file (or sliced from it when it is in memory), or
/// decompressed.
fn load_section<'a>(
    object: &object::File<'a, &'a Image>,
    file: &ElfFile,
    name: &str,
) -> Result<(Arc<[u8]>, std::ops::Range<usize>), DebugInfoError> {
    let Some(section) = object.section_by_name(name) else {
        return Ok((Arc::from(&[][..]), 0..0));
    };
    let outside = || DebugInfoError::SectionOutsideFile(name.to_owned());
    let compressed = section.compressed_file_range()?;
    if compressed.format != object::CompressionFormat::None {
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
        let (buffer, range) = file
            .shared_range(compressed.offset, compressed.compressed_size)
            .map_err(|_| outside())?;
        let data = object::CompressedData {
            format: compressed.format,
            data: &buffer[range],
            uncompressed_size: compressed.uncompressed_size,
        };
        let bytes = data.decompress()?;
        return Ok((Arc::from(&*bytes), 0..bytes.len()));
    }
    match section.file_range() {
        Some((offset, size)) => Ok(file.shared_range(offset, size).map_err(|_| outside())?),
        None => Ok((Arc::from(&[][..]), 0..0)), // SHT_NOBITS: stripped into a .debug file
    }
}
