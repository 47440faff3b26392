//! Source frames from DWARF (through addr2line), and from the symbol table when there is none.

use std::borrow::Cow;
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

/// Parsed debug information of one file.
pub struct DebugInfo {
    context: Option<addr2line::Context<Reader>>,
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
        let context = if file.has_dwarf {
            let mut dwarf = load_dwarf(file, &object, &mut held)?;
            if let Some(sup) = supplementary {
                let sup_image = sup.image();
                let sup_object = object::File::parse(&sup_image)?;
                dwarf.set_sup(load_dwarf(sup, &sup_object, &mut held)?);
            }
            Some(addr2line::Context::from_dwarf(dwarf)?)
        } else {
            None
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
                SymbolKind::Text if symbol.address() != 0 => {
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
                _ => {}
            }
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
            symbols,
            bytes: held + symbol_bytes,
        })
    }

    /// Whether DWARF was loaded.
    pub fn has_dwarf(&self) -> bool {
        self.context.is_some()
    }

    /// The DWARF unit covering `vaddr`.
    pub fn unit_at(&self, vaddr: u64) -> Option<gimli::UnitRef<'_, Reader>> {
        self.context
            .as_ref()?
            .find_dwarf_and_unit(vaddr)
            .skip_all_loads()
    }

    /// The source frames of `vaddr`, innermost (inlined) first; empty when DWARF has none.
    pub fn frames(&self, vaddr: u64) -> Result<Vec<Frame>, gimli::Error> {
        let Some(context) = &self.context else {
            return Ok(Vec::new());
        };
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
