//! The function symbols of `.symtab` and `.dynsym`, indexed by address, with their names
//! left on disk: a lookup reads the one name it answers with.

use std::borrow::Cow;

use object::{Object, ObjectSection};

use super::elf::{ElfFile, Image};

/// Symbol table entries read at a time.
const ENTRIES_PER_READ: usize = 4096;

/// The longest symbol name read.
const MAX_NAME: usize = 64 << 10;

const STT_NOTYPE: u8 = 0;
const STT_FUNC: u8 = 2;
const STT_FILE: u8 = 4;
const STT_GNU_IFUNC: u8 = 10;
const STB_LOCAL: u8 = 0;
const NO_FILE: u32 = u32::MAX;

/// One function symbol: its address, size, and where its name is.
#[derive(Debug, Clone, Copy)]
struct Entry {
    address: u64,
    size: u64,
    /// Offset of its name in its table's string table.
    name: u32,
    /// Which table: an index into [`Symbols::strings`].
    table: u8,
    /// The `STT_FILE` symbol before it, for a local symbol: an index into `files`.
    file: u32,
}

/// The function symbols of one file, by address.
pub struct Symbols {
    file: ElfFile,
    entries: Vec<Entry>,
    files: Vec<String>,
    /// Each table's string table: `(file offset, size)`.
    strings: Vec<(u64, u64)>,
}

impl Symbols {
    /// Indexes the function symbols of `file` (whose headers `object` parsed): reads the
    /// symbol tables in chunks, and only the names of `STT_FILE` symbols.
    pub fn index<'a>(file: &ElfFile, object: &object::File<'a, &'a Image>) -> Symbols {
        let mut symbols = Symbols {
            file: file.clone(),
            entries: Vec::new(),
            files: Vec::new(),
            strings: Vec::new(),
        };
        let is_64 = object.is_64();
        let little = object.is_little_endian();
        // Untyped labels in code (assembly, the C runtime's start-up code such as
        // `__wrap_main`) name code as llvm-symbolizer does.
        let code_sections: Vec<u16> = object
            .sections()
            .filter(|s| s.kind() == object::SectionKind::Text)
            .filter_map(|s| u16::try_from(s.index().0).ok())
            .collect();
        for (table, strings) in [(".symtab", ".strtab"), (".dynsym", ".dynstr")] {
            let (Some(table), Some(strings)) = (
                object.section_by_name(table).and_then(|s| s.file_range()),
                object.section_by_name(strings).and_then(|s| s.file_range()),
            ) else {
                continue;
            };
            let index = symbols.strings.len() as u8;
            symbols.strings.push(strings);
            symbols.read_table(table, index, is_64, little, &code_sections);
        }
        // Local symbols follow the STT_FILE symbol of their source file, which names the
        // file when there is no DWARF (llvm-symbolizer reports it too). At one address the
        // largest symbol wins, the first read among equals.
        symbols
            .entries
            .sort_by_key(|s| (s.address, std::cmp::Reverse(s.size)));
        symbols.entries.dedup_by_key(|s| s.address);
        symbols.entries.shrink_to_fit();
        symbols
    }

    fn read_table(
        &mut self,
        (offset, size): (u64, u64),
        table: u8,
        is_64: bool,
        little: bool,
        code_sections: &[u16],
    ) {
        let entry_size = if is_64 { 24 } else { 16 };
        let count = size / entry_size as u64;
        let mut current_file = NO_FILE;
        let mut buffer = vec![0u8; ENTRIES_PER_READ * entry_size];
        let mut done = 0u64;
        while done < count {
            let n = (count - done).min(ENTRIES_PER_READ as u64) as usize;
            let bytes = &mut buffer[..n * entry_size];
            if self
                .file
                .read_at(offset + done * entry_size as u64, bytes)
                .is_err()
            {
                return;
            }
            for raw in bytes.chunks_exact(entry_size) {
                let u32_at = |at: usize| {
                    let b: [u8; 4] = raw[at..at + 4].try_into().expect("4 bytes");
                    if little {
                        u32::from_le_bytes(b)
                    } else {
                        u32::from_be_bytes(b)
                    }
                };
                let u64_at = |at: usize| {
                    let b: [u8; 8] = raw[at..at + 8].try_into().expect("8 bytes");
                    if little {
                        u64::from_le_bytes(b)
                    } else {
                        u64::from_be_bytes(b)
                    }
                };
                let u16_at = |at: usize| {
                    let b: [u8; 2] = raw[at..at + 2].try_into().expect("2 bytes");
                    if little {
                        u16::from_le_bytes(b)
                    } else {
                        u16::from_be_bytes(b)
                    }
                };
                let (name, info, address, size, section) = if is_64 {
                    (u32_at(0), raw[4], u64_at(8), u64_at(16), u16_at(6))
                } else {
                    (
                        u32_at(0),
                        raw[12],
                        u64::from(u32_at(4)),
                        u64::from(u32_at(8)),
                        u16_at(14),
                    )
                };
                // A label in code, but not ARM's mapping symbols (`$x`, `$d.1`: where code
                // or data starts, never a function name).
                let code_label = info & 0xf == STT_NOTYPE
                    && address != 0
                    && code_sections.contains(&section)
                    && self
                        .name(table, name)
                        .is_some_and(|n| !n.is_empty() && !n.starts_with('$'));
                match info & 0xf {
                    STT_FILE => {
                        current_file = match self.name(table, name) {
                            Some(file) if !file.is_empty() => {
                                if self.files.last() != Some(&file) {
                                    self.files.push(file);
                                }
                                (self.files.len() - 1) as u32
                            }
                            _ => NO_FILE,
                        }
                    }
                    STT_FUNC | STT_GNU_IFUNC if address != 0 => {
                        self.push(address, size, name, table, info, current_file)
                    }
                    STT_NOTYPE if code_label => {
                        self.push(address, size, name, table, info, current_file)
                    }
                    _ => {}
                }
            }
            done += n as u64;
        }
    }

    /// Indexes one code symbol; a local one with the `STT_FILE` before it.
    fn push(&mut self, address: u64, size: u64, name: u32, table: u8, info: u8, file: u32) {
        let file = if info >> 4 == STB_LOCAL {
            file
        } else {
            NO_FILE
        };
        self.entries.push(Entry {
            address,
            size,
            name,
            table,
            file,
        });
    }

    /// The name at `offset` in table `table`'s strings, read from the file.
    fn name(&self, table: u8, offset: u32) -> Option<String> {
        let (start, size) = *self.strings.get(usize::from(table))?;
        let offset = u64::from(offset);
        if offset >= size {
            return None;
        }
        let mut name = Vec::new();
        let mut at = start + offset;
        let end = start + size;
        let mut chunk = [0u8; 256];
        while name.len() < MAX_NAME && at < end {
            let n = chunk.len().min((end - at) as usize);
            self.file.read_at(at, &mut chunk[..n]).ok()?;
            match memchr::memchr(0, &chunk[..n]) {
                Some(nul) => {
                    name.extend_from_slice(&chunk[..nul]);
                    return String::from_utf8(name).ok();
                }
                None => name.extend_from_slice(&chunk[..n]),
            }
            at += n as u64;
        }
        None
    }

    /// The bytes the index holds.
    pub fn bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.files.iter().map(String::capacity).sum::<usize>()
    }

    /// The symbol containing `vaddr`: its demangled name, the offset into it, and its
    /// source file when the symbol table names one.
    pub fn at(&self, vaddr: u64) -> Option<(String, u64, Option<String>)> {
        let index = self
            .entries
            .partition_point(|s| s.address <= vaddr)
            .checked_sub(1)?;
        let symbol = &self.entries[index];
        let inside = symbol.size == 0 || vaddr < symbol.address.saturating_add(symbol.size);
        if !inside {
            return None;
        }
        let name = self.name(symbol.table, symbol.name)?;
        Some((
            addr2line::demangle_auto(Cow::Borrowed(&name), None).into_owned(),
            vaddr - symbol.address,
            self.files.get(symbol.file as usize).cloned(),
        ))
    }
}
