//! Reading an ELF file into memory, with bounds, and the facts symbolization needs from it.
//!
//! Files are read, never mmapped: a binary truncated or replaced while mapped would kill
//! the agent with SIGBUS.

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object::{Object, ObjectSection, ObjectSegment, SegmentFlags};
use thiserror::Error;

use super::mapping::LoadSegment;

/// The largest file the agent reads (debug files of big C++ programs reach a few GiB).
pub const MAX_FILE_SIZE: u64 = 4 << 30;

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

/// An ELF file held in memory, with its identity and layout.
#[derive(Clone)]
pub struct ElfFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its bytes.
    pub data: Arc<[u8]>,
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
}

impl std::fmt::Debug for ElfFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElfFile")
            .field("path", &self.path)
            .field("size", &self.data.len())
            .finish_non_exhaustive()
    }
}

impl ElfFile {
    /// Reads and parses `path`.
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
        let mut data = Vec::with_capacity(size as usize);
        // take(): the file may grow while it is read; what was there when it was opened
        // is all that is read.
        file.take(size).read_to_end(&mut data).map_err(io)?;
        ElfFile::parse(path, data.into())
    }

    /// Parses bytes already in memory.
    pub fn parse(path: &Path, data: Arc<[u8]>) -> Result<ElfFile, ElfError> {
        let parse = |source| ElfError::Parse {
            path: path.to_owned(),
            source,
        };
        let object = object::File::parse(&*data).map_err(parse)?;
        let build_id = object.build_id().map_err(parse)?.map(<[u8]>::to_vec);
        let debuglink = object
            .gnu_debuglink()
            .map_err(parse)?
            .map(|(name, crc)| (String::from_utf8_lossy(name).into_owned(), crc));
        let debugaltlink = object
            .gnu_debugaltlink()
            .map_err(parse)?
            .map(|(name, id)| (String::from_utf8_lossy(name).into_owned(), id.to_vec()));
        let segments = object
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
        let has_dwarf = object
            .section_by_name(".debug_line")
            .is_some_and(|s| s.size() > 0)
            || object.section_by_name(".zdebug_line").is_some();
        Ok(ElfFile {
            path: path.to_owned(),
            data: data.clone(),
            build_id,
            debuglink,
            debugaltlink,
            segments,
            has_dwarf,
        })
    }

    /// The bytes at a file offset, if the file has them.
    pub fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        self.data.get(start..start.checked_add(len)?)
    }
}

/// The build-id as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The CRC-32 `.gnu_debuglink` uses (IEEE 802.3, as zlib's `crc32`).
pub fn debuglink_crc32(data: &[u8]) -> u32 {
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
    !data.iter().fold(!0u32, |crc, &b| {
        table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC-32/ISO-HDLC check value of "123456789" (the catalogue of CRC parameters).
        assert_eq!(debuglink_crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(debuglink_crc32(b""), 0);
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
}
