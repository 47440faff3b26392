//! A gimli [`Reader`](gimli::Reader) over a section that stays on disk: bytes are read with
//! positional reads (`pread`), a page at a time, when a parser first touches them, and kept
//! in a cache bounded by bytes. A lookup therefore holds what it reads (the unit headers,
//! the one unit and line program that cover an address, the strings and abbreviations they
//! name), never whole sections, whatever the file's size.
//!
//! Readers split off or copied from another (names, expressions, a unit's entries) start
//! without a page, so that what a parser keeps for long (a unit's line program header, a
//! function's name) pins no more than the one page it last read.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use gimli::{ReaderOffsetId, RunTimeEndian};

/// Bytes read from the file at a time.
pub const PAGE_SIZE: usize = 8 << 10;

/// The longest string (or other delimited run) looked for: a name longer than this in
/// hostile DWARF is an error, not a scan of the whole section.
const MAX_FIND: usize = 1 << 20;

/// Where a section's bytes are: an open file (or a scratch file a compressed section was
/// decompressed into), read at offsets.
pub trait ReadAt: Send + Sync {
    /// Fills `buf` from `offset`, or fails.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let bytes = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

/// Pages of the sections of one file, bounded by bytes, oldest read evicted first.
pub struct PageCache {
    inner: Mutex<Pages>,
    limit: usize,
}

#[derive(Default)]
struct Pages {
    map: HashMap<(u32, usize), Arc<Page>>,
    order: VecDeque<(u32, usize)>,
    bytes: usize,
    /// Bytes read from disk so far (for tests and benchmarks).
    read: u64,
}

impl PageCache {
    /// A cache holding at most `limit` bytes of pages (at least one page).
    pub fn new(limit: usize) -> Arc<PageCache> {
        Arc::new(PageCache {
            inner: Mutex::default(),
            limit: limit.max(PAGE_SIZE),
        })
    }

    /// Its bound in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The bytes it holds now.
    pub fn bytes(&self) -> usize {
        self.pages().bytes
    }

    /// The bytes read from disk since it was made.
    pub fn bytes_read(&self) -> u64 {
        self.pages().read
    }

    fn pages(&self) -> std::sync::MutexGuard<'_, Pages> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn page(&self, section: &Section, index: usize) -> gimli::Result<Arc<Page>> {
        let key = (section.id, index);
        let mut pages = self.pages();
        if let Some(page) = pages.map.get(&key) {
            return Ok(page.clone());
        }
        let start = index * PAGE_SIZE;
        let len = PAGE_SIZE.min(section.size - start);
        let mut bytes = vec![0u8; len];
        section
            .backing
            .read_at(section.base + start as u64, &mut bytes)
            .map_err(|_| gimli::Error::Io)?;
        let page = Arc::new(Page {
            start,
            bytes: bytes.into_boxed_slice(),
        });
        pages.read += len as u64;
        pages.bytes += len;
        pages.map.insert(key, page.clone());
        pages.order.push_back(key);
        while pages.bytes > self.limit {
            let Some(oldest) = pages.order.pop_front() else {
                break;
            };
            if let Some(evicted) = pages.map.remove(&oldest) {
                pages.bytes -= evicted.bytes.len();
            }
        }
        Ok(page)
    }
}

/// Bytes of a section read at once, and where they start in it.
struct Page {
    start: usize,
    bytes: Box<[u8]>,
}

/// One section of a file: where its bytes are, and the cache its pages go through.
pub struct Section {
    id: u32,
    endian: RunTimeEndian,
    backing: Arc<dyn ReadAt>,
    base: u64,
    size: usize,
    cache: Arc<PageCache>,
}

impl Section {
    /// The section of `size` bytes at `base` in `backing`, read through `cache`.
    pub fn new(
        backing: Arc<dyn ReadAt>,
        base: u64,
        size: usize,
        cache: Arc<PageCache>,
        endian: RunTimeEndian,
    ) -> Section {
        static NEXT_ID: AtomicU32 = AtomicU32::new(0);
        Section {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            endian,
            backing,
            base,
            size,
            cache,
        }
    }
}

/// A gimli reader of a part of a [`Section`], reading pages on demand. Small (four
/// words): parsed units keep many of them.
pub struct LazyReader {
    section: Arc<Section>,
    /// The next byte to read and the end, as offsets in the section.
    start: usize,
    end: usize,
    /// The page last read.
    page: Option<Arc<Page>>,
}

/// A copy starts without the page: parsers keep copies (a unit's entries, a line program)
/// after reading from them, and those must not pin pages the cache has evicted.
impl Clone for LazyReader {
    fn clone(&self) -> LazyReader {
        LazyReader {
            section: self.section.clone(),
            start: self.start,
            end: self.end,
            page: None,
        }
    }
}

impl fmt::Debug for LazyReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LazyReader")
            .field("section", &self.section.id)
            .field("start", &self.start)
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl LazyReader {
    /// A reader of the whole section.
    pub fn new(section: Section) -> LazyReader {
        let end = section.size;
        LazyReader {
            section: Arc::new(section),
            start: 0,
            end,
            page: None,
        }
    }

    /// A reader of nothing.
    pub fn empty_section(endian: RunTimeEndian) -> LazyReader {
        LazyReader::new(Section::new(
            Arc::new(Vec::new()),
            0,
            0,
            PageCache::new(0),
            endian,
        ))
    }

    fn eof(&self) -> gimli::Error {
        gimli::Error::UnexpectedEof(gimli::ReaderOffsetId(self.start as u64))
    }

    /// The bytes at `at` in the current page, if it holds at least `len` of them.
    #[inline]
    fn in_page(&self, at: usize, len: usize) -> Option<&[u8]> {
        let page = self.page.as_deref()?;
        let from = at.checked_sub(page.start)?;
        page.bytes.get(from..from.checked_add(len)?)
    }

    /// Makes the page holding `at` current, and returns its bytes from `at` on.
    fn load_page(&mut self, at: usize) -> gimli::Result<&[u8]> {
        let index = at / PAGE_SIZE;
        let page_start = index * PAGE_SIZE;
        if self.page.as_ref().is_none_or(|p| p.start != page_start) {
            self.page = Some(self.section.cache.page(&self.section, index)?);
        }
        let page = self.page.as_deref().expect("just set");
        Ok(&page.bytes[at - page_start..])
    }

    /// Copies `buf.len()` bytes from `at` (known to lie within the reader) into `buf`.
    fn copy_at(&mut self, mut at: usize, buf: &mut [u8]) -> gimli::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let available = self.load_page(at)?;
            let n = available.len().min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&available[..n]);
            filled += n;
            at += n;
        }
        Ok(())
    }

    fn remaining_bytes(&self) -> gimli::Result<Cow<'_, [u8]>> {
        let len = self.end - self.start;
        if let Some(bytes) = self.in_page(self.start, len) {
            return Ok(Cow::Borrowed(bytes));
        }
        let mut bytes = vec![0u8; len];
        self.clone().copy_at(self.start, &mut bytes)?;
        Ok(Cow::Owned(bytes))
    }
}

impl gimli::Reader for LazyReader {
    type Endian = RunTimeEndian;
    type Offset = usize;

    fn endian(&self) -> RunTimeEndian {
        self.section.endian
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn empty(&mut self) {
        self.start = self.end;
    }

    fn truncate(&mut self, len: usize) -> gimli::Result<()> {
        if len > self.len() {
            return Err(self.eof());
        }
        self.end = self.start + len;
        Ok(())
    }

    fn offset_from(&self, base: &LazyReader) -> usize {
        self.start - base.start
    }

    fn offset_id(&self) -> ReaderOffsetId {
        ReaderOffsetId(self.start as u64)
    }

    fn lookup_offset_id(&self, id: ReaderOffsetId) -> Option<usize> {
        let at = usize::try_from(id.0).ok()?;
        (self.start..=self.end)
            .contains(&at)
            .then(|| at - self.start)
    }

    fn find(&self, byte: u8) -> gimli::Result<usize> {
        if let Some(page) = self.page.as_deref()
            && let Some(from) = self.start.checked_sub(page.start)
            && from < page.bytes.len()
        {
            let within = (page.bytes.len() - from).min(self.end - self.start);
            if let Some(found) = memchr::memchr(byte, &page.bytes[from..from + within]) {
                return Ok(found);
            }
        }
        let mut reader = self.clone();
        let limit = self.end.min(self.start.saturating_add(MAX_FIND));
        let mut at = self.start;
        while at < limit {
            let available = reader.load_page(at)?;
            let n = available.len().min(limit - at);
            if let Some(found) = memchr::memchr(byte, &available[..n]) {
                return Ok(at + found - self.start);
            }
            at += n;
        }
        Err(self.eof())
    }

    fn skip(&mut self, len: usize) -> gimli::Result<()> {
        if len > self.len() {
            return Err(self.eof());
        }
        self.start += len;
        Ok(())
    }

    fn split(&mut self, len: usize) -> gimli::Result<LazyReader> {
        if len > self.len() {
            return Err(self.eof());
        }
        let head = LazyReader {
            section: self.section.clone(),
            start: self.start,
            end: self.start + len,
            // Kept readers must not pin pages; it loads its own when read.
            page: None,
        };
        self.start += len;
        Ok(head)
    }

    fn to_slice(&self) -> gimli::Result<Cow<'_, [u8]>> {
        self.remaining_bytes()
    }

    fn to_string(&self) -> gimli::Result<Cow<'_, str>> {
        match self.remaining_bytes()? {
            Cow::Borrowed(bytes) => std::str::from_utf8(bytes)
                .map(Cow::Borrowed)
                .map_err(|_| gimli::Error::BadUtf8),
            Cow::Owned(bytes) => String::from_utf8(bytes)
                .map(Cow::Owned)
                .map_err(|_| gimli::Error::BadUtf8),
        }
    }

    fn to_string_lossy(&self) -> gimli::Result<Cow<'_, str>> {
        Ok(match self.remaining_bytes()? {
            Cow::Borrowed(bytes) => String::from_utf8_lossy(bytes),
            Cow::Owned(bytes) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
        })
    }

    #[inline]
    fn read_slice(&mut self, buf: &mut [u8]) -> gimli::Result<()> {
        if buf.len() > self.end - self.start {
            return Err(self.eof());
        }
        if let Some(bytes) = self.in_page(self.start, buf.len()) {
            buf.copy_from_slice(bytes);
        } else {
            self.copy_at(self.start, buf)?;
        }
        self.start += buf.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gimli::Reader as _;

    fn reader(bytes: Vec<u8>, cache: usize) -> (LazyReader, Arc<PageCache>) {
        let cache = PageCache::new(cache);
        let size = bytes.len();
        let section = Section::new(
            Arc::new(bytes),
            0,
            size,
            cache.clone(),
            RunTimeEndian::Little,
        );
        (LazyReader::new(section), cache)
    }

    #[test]
    fn reads_across_pages_as_a_slice_would() {
        let bytes: Vec<u8> = (0..3 * PAGE_SIZE + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let (mut lazy, _) = reader(bytes.clone(), 2 * PAGE_SIZE);
        let mut slice = gimli::EndianSlice::new(&bytes, RunTimeEndian::Little);
        lazy.skip(PAGE_SIZE - 3).unwrap();
        slice.skip(PAGE_SIZE - 3).unwrap();
        for _ in 0..(PAGE_SIZE / 8) {
            assert_eq!(lazy.read_u64().unwrap(), slice.read_u64().unwrap());
        }
        let mut head = lazy.split(PAGE_SIZE + 5).unwrap();
        let mut slice_head = slice.split(PAGE_SIZE + 5).unwrap();
        assert_eq!(&*head.to_slice().unwrap(), slice_head.slice());
        assert_eq!(head.read_u32().unwrap(), slice_head.read_u32().unwrap());
        assert_eq!(lazy.len(), slice.len());
        let last = bytes[bytes.len() - 1];
        assert_eq!(lazy.find(last).ok(), gimli::Reader::find(&slice, last).ok());
        assert!(lazy.clone().skip(lazy.len() + 1).is_err());
        let mut rest = vec![0; lazy.len()];
        lazy.read_slice(&mut rest).unwrap();
        assert_eq!(rest, slice.slice());
        assert!(lazy.read_u8().is_err());
    }

    #[test]
    fn holds_no_more_than_its_bound_however_much_is_read() {
        let bytes = vec![1u8; 64 * PAGE_SIZE];
        let (mut lazy, cache) = reader(bytes, 4 * PAGE_SIZE);
        let mut buf = vec![0; 1000];
        while lazy.len() >= buf.len() {
            lazy.read_slice(&mut buf).unwrap();
        }
        assert!(cache.bytes() <= 4 * PAGE_SIZE, "{}", cache.bytes());
        assert!(cache.bytes_read() >= 63 * PAGE_SIZE as u64);
    }

    #[test]
    fn a_string_without_its_end_is_an_error_not_a_scan_of_everything() {
        let (lazy, cache) = reader(vec![b'a'; 4 * MAX_FIND], 4 * PAGE_SIZE);
        assert!(lazy.find(0).is_err());
        assert!(cache.bytes_read() <= MAX_FIND as u64 + PAGE_SIZE as u64);
    }
}
