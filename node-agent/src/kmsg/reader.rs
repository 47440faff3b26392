//! Reading `/dev/kmsg` asynchronously: one record per `read(2)`, `EPIPE` on ring overrun.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Large enough for any record: the kernel caps one at 8 KiB of text plus dictionary
/// (`CONSOLE_EXT_LOG_MAX`); a smaller buffer makes `read` fail with `EINVAL`.
const RECORD_BUFFER: usize = 16 * 1024;

/// What one read produced.
#[derive(Debug)]
pub enum ReadOutcome<'a> {
    /// One whole record, still escaped (parse it with [`super::parse_record`]).
    Record(&'a [u8]),
    /// Records were overwritten before they were read (`EPIPE`); the next read continues at
    /// the oldest record still in the ring, and the sequence gap says how many were lost.
    Overrun,
}

/// A non-blocking reader of a kmsg character device.
pub struct KmsgReader {
    fd: AsyncFd<OwnedFd>,
    buffer: Box<[u8]>,
}

impl KmsgReader {
    /// Opens `path` (normally `/dev/kmsg`) positioned at the oldest record in the ring.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
            })?;
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open and unchanged
        // for its whole lifetime.
        let fd =
            unsafe { AsyncFd::register_with_interest(OwnedFd::from(file), Interest::READABLE) }
                .map_err(|e| {
                    let (_, e) = e.into_parts();
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{} cannot be polled (is it a kmsg device?): {e}",
                            path.display()
                        ),
                    )
                })?;
        Ok(KmsgReader {
            fd,
            buffer: vec![0; RECORD_BUFFER].into_boxed_slice(),
        })
    }

    /// Waits for and returns the next record.
    pub async fn next(&mut self) -> io::Result<ReadOutcome<'_>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let buffer = &mut self.buffer;
            match guard.try_io(|fd| read_once(fd.get_ref().as_raw_fd(), buffer)) {
                Ok(Ok(len)) => return Ok(ReadOutcome::Record(&self.buffer[..len])),
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EPIPE) => {
                    return Ok(ReadOutcome::Overrun);
                }
                Ok(Err(err)) => return Err(err),
                Err(_would_block) => continue,
            }
        }
    }
}

fn read_once(fd: i32, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buffer` is valid for writes of `buffer.len()` bytes for the whole call.
        let n = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
