//! The persisted read position `(boot_id, last_seq)`, so a restarted agent neither repeats nor
//! skips records. Sequence numbers restart at every boot, so a cursor from another boot is void.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The position after which reading resumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cursor {
    /// `/proc/sys/kernel/random/boot_id` of the boot the sequence numbers belong to.
    pub boot_id: String,
    /// The last record fully handled (its events emitted).
    pub last_seq: u64,
}

/// Where the cursor lives: one small JSON file in the state directory, replaced atomically.
#[derive(Debug, Clone)]
pub struct CursorFile {
    path: PathBuf,
}

impl CursorFile {
    /// The cursor file inside `state_dir`.
    pub fn in_dir(state_dir: &Path) -> Self {
        CursorFile {
            path: state_dir.join("kmsg-cursor.json"),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the cursor; `Ok(None)` when there is none yet.
    ///
    /// A corrupt file is an error naming the file: the caller decides to start fresh.
    pub fn load(&self) -> io::Result<Option<Cursor>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        serde_json::from_str(&text).map(Some).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt kmsg cursor {}: {err}", self.path.display()),
            )
        })
    }

    /// The cursor to resume from on this boot, if the stored one belongs to it.
    pub fn resume_point(stored: Option<Cursor>, boot_id: &str) -> Option<u64> {
        stored.filter(|c| c.boot_id == boot_id).map(|c| c.last_seq)
    }

    /// Replaces the cursor atomically (write a temporary file, fsync, rename).
    pub fn store(&self, cursor: &Cursor) -> io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(cursor).map_err(io::Error::other)?)?;
        file.sync_data()?;
        fs::rename(&tmp, &self.path)
    }
}

/// Reads this boot's id from `proc_root/sys/kernel/random/boot_id`.
pub fn read_boot_id(proc_root: &Path) -> io::Result<String> {
    Ok(
        fs::read_to_string(proc_root.join("sys/kernel/random/boot_id"))?
            .trim()
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_resumes_only_on_the_same_boot() {
        let dir = tempfile::tempdir().unwrap();
        let file = CursorFile::in_dir(dir.path());
        assert_eq!(file.load().unwrap(), None);
        let cursor = Cursor {
            boot_id: "b1".into(),
            last_seq: 41,
        };
        file.store(&cursor).unwrap();
        let loaded = file.load().unwrap();
        assert_eq!(loaded, Some(cursor.clone()));
        assert_eq!(CursorFile::resume_point(loaded.clone(), "b1"), Some(41));
        assert_eq!(
            CursorFile::resume_point(loaded, "b2"),
            None,
            "a reboot starts fresh"
        );
    }

    #[test]
    fn a_corrupt_cursor_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = CursorFile::in_dir(dir.path());
        fs::write(file.path(), "{not json").unwrap();
        let err = file.load().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("corrupt kmsg cursor"), "{err}");
    }
}
