//! Rereading the kernel ring for nbd errors when the agent starts: the kmsg cursor skips
//! what was handled before a restart, but the `NbdDeviceError` condition must be derived
//! again from what the kernel logged, not reset.

use std::fs::OpenOptions;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::NbdErrors;
use crate::kmsg::parse_record;
use crate::recognise::misc::parse_nbd;

/// Reads every record in the ring of `kmsg` (without waiting for new ones) and notes the nbd
/// errors the kernel itself logged since `since_usec`. Records user space wrote are ignored.
/// Returns the last sequence number read.
pub fn scan_ring_for_nbd_errors(
    kmsg: &Path,
    since_usec: u64,
    errors: &mut NbdErrors,
) -> io::Result<Option<u64>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(kmsg)?;
    let mut buffer = vec![0u8; 16 * 1024];
    let mut last_seq = None;
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                let Ok(record) = parse_record(&buffer[..n]) else {
                    continue;
                };
                last_seq = Some(record.seq);
                if !record.is_from_kernel() || record.timestamp_usec < since_usec {
                    continue;
                }
                if let Some(nbd) = parse_nbd(&record.message) {
                    errors.note(&nbd.device, nbd.meaning, record.timestamp_usec);
                }
            }
            // Records overwritten while reading: go on with the oldest one left.
            Err(err) if err.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
    Ok(last_seq)
}

/// Notes the nbd error in one raw kmsg record, if it is one the kernel wrote after
/// `after_seq`.
pub fn note_record(bytes: &[u8], after_seq: Option<u64>, errors: &mut NbdErrors) {
    if memchr::memmem::find(bytes, b"nbd").is_none() {
        return;
    }
    let Ok(record) = parse_record(bytes) else {
        return;
    };
    if !record.is_from_kernel() || after_seq.is_some_and(|seq| record.seq <= seq) {
        return;
    }
    if let Some(nbd) = parse_nbd(&record.message) {
        errors.note(&nbd.device, nbd.meaning, record.timestamp_usec);
    }
}
