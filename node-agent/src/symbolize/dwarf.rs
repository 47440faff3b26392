//! Source frames from DWARF (through addr2line), and from the symbol table when there is none.

use std::borrow::Cow;
use std::sync::Arc;

use crds::Frame;
use gimli::{EndianArcSlice, RunTimeEndian};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use thiserror::Error;

use super::elf::{ElfFile, MAX_FILE_SIZE};

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
    /// Roughly how many bytes this holds (the file plus decompressed sections).
    pub bytes: usize,
}

impl DebugInfo {
    /// Loads DWARF (if the file has line information) and the symbol tables of `file`.
    /// `supplementary` is the dwz file its `.gnu_debugaltlink` names, when found.
    pub fn load(
        file: &ElfFile,
        supplementary: Option<&ElfFile>,
    ) -> Result<DebugInfo, DebugInfoError> {
        let object = object::File::parse(&*file.data)?;
        let mut decompressed = 0usize;
        let context = if file.has_dwarf {
            let mut dwarf = load_dwarf(file, &object, &mut decompressed)?;
            if let Some(sup) = supplementary {
                let sup_object = object::File::parse(&*sup.data)?;
                dwarf.set_sup(load_dwarf(sup, &sup_object, &mut decompressed)?);
                decompressed += sup.data.len();
            }
            Some(addr2line::Context::from_dwarf(dwarf)?)
        } else {
            None
        };
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
        Ok(DebugInfo {
            context,
            symbols,
            bytes: file.data.len() + decompressed,
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

/// The DWARF sections of `file`; adds the bytes of decompressed sections to `decompressed`.
fn load_dwarf(
    file: &ElfFile,
    object: &object::File<'_>,
    decompressed: &mut usize,
) -> Result<gimli::Dwarf<Reader>, DebugInfoError> {
    let endian = if object.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    gimli::Dwarf::load(|id| -> Result<Reader, DebugInfoError> {
        let section = load_section(object, &file.data, id.name(), endian)?;
        if !Arc::ptr_eq(&section.0, &file.data) {
            *decompressed += section.0.len();
        }
        Ok(EndianArcSlice::new(section.0, endian).range(section.1))
    })
}

/// A section's bytes: the file's own buffer and the range in it, or a decompressed copy.
fn load_section(
    object: &object::File<'_>,
    data: &Arc<[u8]>,
    name: &str,
    _endian: RunTimeEndian,
) -> Result<(Arc<[u8]>, std::ops::Range<usize>), DebugInfoError> {
    let Some(section) = object.section_by_name(name) else {
        return Ok((Arc::from(&[][..]), 0..0));
    };
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
        let bytes = section.uncompressed_data()?;
        return Ok((Arc::from(&*bytes), 0..bytes.len()));
    }
    match section.file_range() {
        Some((offset, size)) => {
            let outside = || DebugInfoError::SectionOutsideFile(name.to_owned());
            let start = usize::try_from(offset).map_err(|_| outside())?;
            let end = usize::try_from(size)
                .ok()
                .and_then(|size| start.checked_add(size))
                .filter(|end| *end <= data.len())
                .ok_or_else(outside)?;
            Ok((data.clone(), start..end))
        }
        None => Ok((Arc::from(&[][..]), 0..0)), // SHT_NOBITS: stripped into a .debug file
    }
}
