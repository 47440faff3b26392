//! An ELF file opened for symbolization, with bounds, and the facts symbolization needs
//! from it.
//!
//! Only what symbolization uses is read: the headers, the few small sections that identify
//! the file (`.note.gnu.build-id`, `.gnu_debuglink`, `.gnu_debugaltlink`), and later the
//! DWARF and symbol sections and the bytes of the faulting code, each with positional reads
//! (`pread`). Memory therefore follows what symbolization needs, not the file's size: a
//! binary padded with gigabytes of data that is never loaded costs nothing.
//!
//! Files are read, never mmapped: a binary truncated or replaced while mapped would kill
//! the agent with SIGBUS. Nothing beyond the size the file had when it was opened is read,
//! and a file that shrinks meanwhile gives read errors.

use std::cell::RefCell;
use std::fs;
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object::read::ReadRef;
use object::{Object, ObjectSection, ObjectSegment, SegmentFlags};
use thiserror::Error;

use super::mapping::LoadSegment;

/// The largest file the agent opens (debug files of big C++ programs reach a few GiB).
pub const MAX_FILE_SIZE: u64 = 4 << 30;

/// The longest string read from a string table while the headers are parsed.
const MAX_STRING: u64 = 4096;

/// Why an ELF file could not be used.
#[derive(Debug, Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_SIZE`].
    #[error("{path} is {size} bytes, more than the {MAX_FILE_SIZE} the agent reads")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The path is a device, FIFO, socket or directory, not a regular file.
    #[error("{path} is not a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
    },
    /// The file is not a valid ELF file.
    #[error("{path} is not a valid ELF file: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: object::Error,
    },
}

/// Where an ELF file's bytes come from: an open file, read with positional reads, or bytes
/// already in memory (tests and fuzzing).
#[derive(Clone)]
enum Source {
    File(Arc<fs::File>),
    Memory(Arc<[u8]>),
}

/// An opened ELF file, with its identity and layout. Its bytes stay on disk; clones share
/// the open file.
#[derive(Clone)]
pub struct ElfFile {
    /// Where it was read from.
    pub path: PathBuf,
    source: Source,
    /// Its size when it was opened: nothing beyond this is ever read.
    pub size: u64,
    /// The GNU build-id, if it has one.
    pub build_id: Option<Vec<u8>>,
    /// `.gnu_debuglink`: the debug file's name and CRC-32.
    pub debuglink: Option<(String, u32)>,
    /// `.gnu_debugaltlink`: the dwz supplementary file's name and build-id.
    pub debugaltlink: Option<(String, Vec<u8>)>,
    /// Its `PT_LOAD` segments.
    pub segments: Vec<LoadSegment>,
    /// Whether it carries DWARF line information of its own.
    pub has_dwarf: bool,
    /// The machine its code is for (`e_machine`): how its instructions are decoded.
    pub architecture: object::Architecture,
}

impl std::fmt::Debug for ElfFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElfFile")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl ElfFile {
    /// Opens `path` and reads its headers.
    pub fn read(path: &Path) -> Result<ElfFile, ElfError> {
        let io = |source| ElfError::Io {
            path: path.to_owned(),
            source,
        };
        // O_NONBLOCK: opening a FIFO planted where a binary should be must not hang.
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(io)?;
        let metadata = file.metadata().map_err(io)?;
        if !metadata.is_file() {
            return Err(ElfError::NotRegular {
                path: path.to_owned(),
            });
        }
        let size = metadata.len();
        if size > MAX_FILE_SIZE {
            return Err(ElfError::TooLarge {
                path: path.to_owned(),
                size,
            });
        }
        ElfFile::open(path, Source::File(Arc::new(file)), size)
    }

    /// Parses bytes already in memory.
    pub fn parse(path: &Path, data: Arc<[u8]>) -> Result<ElfFile, ElfError> {
        let size = data.len() as u64;
        ElfFile::open(path, Source::Memory(data), size)
    }

    fn open(path: &Path, source: Source, size: u64) -> Result<ElfFile, ElfError> {
        let mut file = ElfFile {
            path: path.to_owned(),
            source,
            size,
            build_id: None,
            debuglink: None,
            debugaltlink: None,
            segments: Vec::new(),
            has_dwarf: false,
            architecture: object::Architecture::Unknown,
        };
        let parse = |source| ElfError::Parse {
            path: path.to_owned(),
            source,
        };
        let image = file.image();
        let object = object::File::parse(&image).map_err(parse)?;
        file.architecture = object.architecture();
        file.build_id = object.build_id().map_err(parse)?.map(<[u8]>::to_vec);
        file.debuglink = object
            .gnu_debuglink()
            .map_err(parse)?
            .map(|(name, crc)| (String::from_utf8_lossy(name).into_owned(), crc));
        file.debugaltlink = object
            .gnu_debugaltlink()
            .map_err(parse)?
            .map(|(name, id)| (String::from_utf8_lossy(name).into_owned(), id.to_vec()));
        file.segments = object
            .segments()
            .filter_map(|segment| {
                let (offset, file_size) = segment.file_range();
                let executable = match segment.flags() {
                    SegmentFlags::Elf { p_flags, .. } => p_flags.0 & 1 != 0, // PF_X
                    _ => false,
                };
                (file_size > 0).then_some(LoadSegment {
                    offset,
                    vaddr: segment.address(),
                    file_size,
                    executable,
                })
            })
            .collect();
        file.has_dwarf = object
            .section_by_name(".debug_line")
            .is_some_and(|s| s.size() > 0)
            || object.section_by_name(".zdebug_line").is_some();
        drop(object);
        drop(image);
        Ok(file)
    }

    /// A view of the file for object's parsers that reads, and keeps, only the ranges they
    /// ask for. Drop it to free them.
    pub fn image(&self) -> Image {
        Image {
            source: self.source.clone(),
            size: self.size,
            chunks: RefCell::new(Vec::new()),
        }
    }

    /// Fills `buf` from file offset `offset`; an error if that lies beyond the size the
    /// file had when it was opened, or if the file has shrunk since.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|end| *end <= self.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{offset:#x}+{:#x} lies outside the file", buf.len()),
                )
            })?;
        match &self.source {
            Source::File(file) => file.read_exact_at(buf, offset),
            Source::Memory(data) => {
                buf.copy_from_slice(&data[offset as usize..end as usize]);
                Ok(())
            }
        }
    }

    /// The bytes at a file offset, if the file has them.
    pub fn bytes_at(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let mut bytes = vec![0; len];
        self.read_at(offset, &mut bytes).ok()?;
        Some(bytes)
    }

    /// `len` bytes from `offset` as a shared buffer and the range of them in it: a slice of
    /// the file's bytes when they are in memory, else a buffer of exactly that size.
    pub fn shared_range(&self, offset: u64, len: u64) -> io::Result<(Arc<[u8]>, Range<usize>)> {
        let outside = || {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{offset:#x}+{len:#x} lies outside the file"),
            )
        };
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= self.size)
            .ok_or_else(outside)?;
        match &self.source {
            Source::Memory(data) => Ok((data.clone(), offset as usize..end as usize)),
            Source::File(_) => {
                let len = usize::try_from(len).map_err(|_| outside())?;
                // One buffer of exactly the section's size, shared without a copy.
                let mut uninit = Arc::<[u8]>::new_uninit_slice(len);
                let slots = Arc::get_mut(&mut uninit).expect("a buffer nobody else holds");
                // SAFETY: `slots` is `len` writable bytes; zeroing makes them initialized.
                unsafe { std::ptr::write_bytes(slots.as_mut_ptr(), 0, len) };
                // SAFETY: every byte was initialized just above.
                let mut buffer = unsafe { uninit.assume_init() };
                let bytes = Arc::get_mut(&mut buffer).expect("a buffer nobody else holds");
                self.read_at(offset, bytes)?;
                Ok((buffer, 0..len))
            }
        }
    }

    /// The CRC-32 of the whole file (for `.gnu_debuglink`), read in bounded chunks.
    pub fn crc32(&self) -> io::Result<u32> {
        const CHUNK: u64 = 1 << 20;
        let mut crc = Crc32::new();
        let mut buffer = vec![0u8; CHUNK.min(self.size) as usize];
        let mut offset = 0;
        while offset < self.size {
            let len = CHUNK.min(self.size - offset) as usize;
            self.read_at(offset, &mut buffer[..len])?;
            crc.update(&buffer[..len]);
            offset += len as u64;
        }
        Ok(crc.finish())
    }
}

impl super::reader::ReadAt for ElfFile {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        ElfFile::read_at(self, offset, buf)
    }
}

/// The parts of an [`ElfFile`] that object's parsers asked for, read on demand and kept
/// until the image is dropped. Implements [`ReadRef`].
pub struct Image {
    source: Source,
    size: u64,
    /// Ranges read so far: `(offset, bytes)`. Boxes are never removed or changed while the
    /// image lives, so slices of them may be handed out for its lifetime.
    chunks: RefCell<Vec<(u64, Box<[u8]>)>>,
}

impl Image {
    /// Reads `range` now, as one piece, so that later reads inside it (strings of a string
    /// table) are served from memory.
    pub fn preload(&self, range: Range<u64>) {
        let _ = self.read_bytes_at(range.start, range.end.saturating_sub(range.start));
    }

    /// The bytes kept so far.
    pub fn bytes_held(&self) -> usize {
        self.chunks.borrow().iter().map(|(_, b)| b.len()).sum()
    }

    /// A kept chunk holding `offset..offset + len`, as a slice living as long as `self`.
    fn cached(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        let chunks = self.chunks.borrow();
        let (start, bytes) = chunks
            .iter()
            .find(|(start, bytes)| *start <= offset && end <= start + bytes.len() as u64)?;
        let from = (offset - start) as usize;
        let slice = &bytes[from..from + len as usize];
        // SAFETY: the boxed bytes are never freed, moved or written while `self` lives
        // (chunks are only ever appended), so the slice stays valid for `&self`'s lifetime
        // even after the RefCell borrow ends.
        Some(unsafe { std::slice::from_raw_parts(slice.as_ptr(), slice.len()) })
    }

    fn load(&self, offset: u64, len: u64) -> Result<&[u8], ()> {
        let end = offset.checked_add(len).ok_or(())?;
        if end > self.size {
            return Err(());
        }
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(usize::try_from(len).map_err(|_| ())?)
            .map_err(|_| ())?;
        bytes.resize(len as usize, 0);
        match &self.source {
            Source::File(file) => file.read_exact_at(&mut bytes, offset).map_err(|_| ())?,
            Source::Memory(data) => bytes.copy_from_slice(&data[offset as usize..end as usize]),
        }
        self.chunks
            .borrow_mut()
            .push((offset, bytes.into_boxed_slice()));
        self.cached(offset, len).ok_or(())
    }
}

impl<'a> ReadRef<'a> for &'a Image {
    fn len(self) -> Result<u64, ()> {
        Ok(self.size)
    }

    fn read_bytes_at(self, offset: u64, size: u64) -> Result<&'a [u8], ()> {
        if size == 0 {
            return Ok(&[]);
        }
        if let Source::Memory(data) = &self.source {
            let end = offset.checked_add(size).ok_or(())?;
            return data.get(offset as usize..end as usize).ok_or(());
        }
        match self.cached(offset, size) {
            Some(bytes) => Ok(bytes),
            None => self.load(offset, size),
        }
    }

    fn read_bytes_at_until(self, range: Range<u64>, delimiter: u8) -> Result<&'a [u8], ()> {
        if range.start >= range.end || range.end > self.size {
            return Err(());
        }
        let find = |bytes: &'a [u8]| {
            bytes
                .iter()
                .position(|b| *b == delimiter)
                .map(|end| &bytes[..end])
        };
        if let Source::Memory(data) = &self.source {
            return find(&data[range.start as usize..range.end as usize]).ok_or(());
        }
        // Inside a preloaded table: search it up to the end of that chunk.
        let within = {
            let chunks = self.chunks.borrow();
            chunks
                .iter()
                .find(|(start, bytes)| {
                    *start <= range.start && range.start < start + bytes.len() as u64
                })
                .map(|(start, bytes)| (start + bytes.len() as u64).min(range.end))
        };
        if let Some(end) = within {
            let bytes = self.cached(range.start, end - range.start).ok_or(())?;
            if let Some(found) = find(bytes) {
                return Ok(found);
            }
        }
        let len = (range.end - range.start).min(MAX_STRING);
        let bytes = self.load(range.start, len)?;
        find(bytes).ok_or(())
    }
}

/// The build-id as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CRC-32 `.gnu_debuglink` uses (IEEE 802.3, as zlib's `crc32`), fed piece by piece.
#[derive(Debug, Clone, Copy)]
pub struct Crc32(u32);

impl Crc32 {
    /// A CRC of nothing yet.
    pub fn new() -> Crc32 {
        Crc32(!0)
    }

    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
        let table = TABLE.get_or_init(|| {
            let mut table = [0u32; 256];
            for (n, entry) in table.iter_mut().enumerate() {
                let mut c = n as u32;
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xedb8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
                *entry = c;
            }
            table
        });
        self.0 = data.iter().fold(self.0, |crc, &b| {
            table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
        });
    }

    /// The CRC of everything added.
    pub fn finish(self) -> u32 {
        !self.0
    }
}

impl Default for Crc32 {
    fn default() -> Self {
        Crc32::new()
    }
}

/// The CRC-32 `.gnu_debuglink` uses, of bytes in memory.
pub fn debuglink_crc32(data: &[u8]) -> u32 {
    let mut crc = Crc32::new();
    crc.update(data);
    crc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC-32/ISO-HDLC check value of "123456789" (the catalogue of CRC parameters).
        assert_eq!(debuglink_crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(debuglink_crc32(b""), 0);
        let mut pieces = Crc32::new();
        pieces.update(b"1234");
        pieces.update(b"56789");
        assert_eq!(pieces.finish(), 0xcbf4_3926);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = ElfFile::parse(
            Path::new("junk"),
            Arc::from(&b"\x7fELF\x02\x01\x01garbage"[..]),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("junk is not a valid ELF file"),
            "{err}"
        );
        let err = ElfFile::read(Path::new("/nonexistent/binary")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read /nonexistent/binary"),
            "{err}"
        );
    }

    #[test]
    fn reads_this_machines_libc() {
        let libc = ElfFile::read(Path::new("/lib/x86_64-linux-gnu/libc.so.6")).unwrap();
        assert_eq!(libc.build_id.as_ref().map(|id| id.len()), Some(20));
        assert!(libc.segments.iter().any(|s| s.executable));
    }

    #[test]
    fn the_file_and_memory_views_read_the_same_bytes_and_crc() {
        let path = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        let whole: Arc<[u8]> = std::fs::read(path).unwrap().into();
        let on_disk = ElfFile::read(path).unwrap();
        let in_memory = ElfFile::parse(path, whole.clone()).unwrap();
        assert_eq!(on_disk.size, whole.len() as u64);
        assert_eq!(on_disk.build_id, in_memory.build_id);
        assert_eq!(on_disk.segments, in_memory.segments);
        let at = whole.len() as u64 / 3;
        assert_eq!(
            on_disk.bytes_at(at, 100).as_deref(),
            Some(&whole[at as usize..at as usize + 100])
        );
        assert_eq!(on_disk.bytes_at(whole.len() as u64 - 10, 11), None);
        let (buffer, range) = on_disk.shared_range(at, 64).unwrap();
        assert_eq!(&buffer[range], &whole[at as usize..at as usize + 64]);
        assert_eq!(on_disk.crc32().unwrap(), debuglink_crc32(&whole));
    }

    #[test]
    fn opening_reads_the_headers_only() {
        // libc's headers, notes and dynamic symbols are a small part of it.
        let dir = tempfile::tempdir().unwrap();
        let libc = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        let path = dir.path().join("libc.so.6");
        std::fs::write(&path, &libc).unwrap();
        let file = ElfFile::read(&path).unwrap();
        let image = file.image();
        let object = object::File::parse(&image).unwrap();
        let _ = object.build_id();
        drop(object);
        assert!(
            image.bytes_held() < libc.len() / 20,
            "{} of {} bytes read to parse the headers",
            image.bytes_held(),
            libc.len()
        );
    }
}
