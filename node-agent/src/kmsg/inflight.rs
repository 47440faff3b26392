//! The kernel log record whose event is being symbolized, kept in the state directory.
//!
//! Symbolization runs before the cursor is saved. If it kills the agent (the kernel's OOM
//! killer, a stack overflow, a bug), the restarted agent reads the same record again and
//! would die again, until the record leaves the ring. So before an event from the kernel
//! log is symbolized, its record is written down; afterwards the note is removed. A note
//! found at start, for this boot, names the record whose symbolization did not finish: that
//! event is then published without symbolization, saying why.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the note says: which record of which boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Note {
    boot_id: String,
    seq: u64,
}

/// The note file, and the record a previous run of the agent did not finish symbolizing.
#[derive(Debug)]
pub struct InFlightFile {
    path: PathBuf,
    boot_id: String,
    interrupted: Option<u64>,
}

impl InFlightFile {
    /// The note in `state_dir` for boot `boot_id`; reads what a previous run left there.
    pub fn open(state_dir: &Path, boot_id: &str) -> InFlightFile {
        let path = state_dir.join("symbolizing.json");
        let left = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Note>(&bytes)
                .inspect_err(|err| tracing::warn!(file = %path.display(), %err, "ignoring an unreadable symbolization note"))
                .ok(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => {
                tracing::warn!(file = %path.display(), %err, "cannot read the symbolization note");
                None
            }
        };
        let interrupted = interrupted_seq(left.as_ref(), boot_id);
        if let Some(seq) = interrupted {
            tracing::warn!(
                seq,
                "the last run of the agent stopped while symbolizing this kernel log record; its event will be published unsymbolized"
            );
        }
        InFlightFile {
            path,
            boot_id: boot_id.to_owned(),
            interrupted,
        }
    }

    /// Whether symbolizing record `seq` did not finish in a previous run.
    pub fn was_interrupted(&self, seq: u64) -> bool {
        self.interrupted == Some(seq)
    }

    /// Notes that record `seq` is being symbolized. No fsync: the note must survive the
    /// agent being killed, not the machine crashing (a reboot starts a new boot anyway).
    pub fn begin(&self, seq: u64) -> io::Result<()> {
        let note = Note {
            boot_id: self.boot_id.clone(),
            seq,
        };
        fs::write(
            &self.path,
            serde_json::to_vec(&note).map_err(io::Error::other)?,
        )
    }

    /// Removes the note: the symbolization finished, one way or another.
    pub fn end(&self) -> io::Result<()> {
        match fs::remove_file(&self.path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }
}

/// The record a note left by a previous run names, if it is of this boot (sequence numbers
/// restart at every boot).
fn interrupted_seq(note: Option<&Note>, boot_id: &str) -> Option<u64> {
    note.filter(|n| n.boot_id == boot_id).map(|n| n.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_left_behind_names_the_record_on_the_same_boot_only() {
        let dir = tempfile::tempdir().unwrap();
        let first = InFlightFile::open(dir.path(), "boot-1");
        assert!(!first.was_interrupted(7));
        first.begin(7).unwrap();
        // The agent dies here. The next run on the same boot knows the record…
        let second = InFlightFile::open(dir.path(), "boot-1");
        assert!(second.was_interrupted(7));
        assert!(!second.was_interrupted(8));
        // …a run after a reboot does not.
        assert!(!InFlightFile::open(dir.path(), "boot-2").was_interrupted(7));
        // A finished symbolization leaves nothing behind.
        second.begin(9).unwrap();
        second.end().unwrap();
        second.end().unwrap();
        assert!(!InFlightFile::open(dir.path(), "boot-1").was_interrupted(9));
    }

    #[test]
    fn a_garbled_note_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("symbolizing.json"), "{\"bootId\":").unwrap();
        assert!(!InFlightFile::open(dir.path(), "b").was_interrupted(0));
    }
}
