//! Crashes seen by the kernel's core dump, not only by its log: the agent installs itself as
//! the `core_pattern` pipe handler. For each dump the kernel runs [`handler`] in the root
//! namespaces and, with `core_pipe_limit` > 0, keeps `/proc/PID` while it runs; the handler
//! reads the registers from the head of the dump, unwinds the stack with the modules' CFI,
//! names the pod from the process's cgroup, symbolizes from the container's own files, spools
//! one event per crash, and passes the dump on to the previous handler. The agent merges each
//! spooled event with the kernel log's line of the same crash ([`merge`]).
//!
//! The kernel log stays the baseline: without the handler (not permitted, disabled, over the
//! pipe limit) every crash is still reported from its kernel line.

pub mod attribute;
pub mod core_notes;
pub mod handler;
pub mod install;
pub mod merge;
pub mod pattern;
pub mod unwind;

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crds::CrashEvent;
use serde::{Deserialize, Serialize};

pub use install::{CoreHandler, InstallConfig};
pub use merge::{CoreMerge, Merged};

/// The largest spooled event read back: a CrashEvent is bounded well below this.
const MAX_SPOOLED_BYTES: u64 = 4 << 20;

/// What the handler needs to know, written by the agent into the state dir before it installs
/// the pattern: the pattern it replaced, and where the node keeps debug files and bundles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandlerConfig {
    /// The settings the handler replaced, which it chains to and which uninstall restores.
    pub previous: pattern::Previous,
    /// The node's debug dirs (host paths), after the container's own `/usr/lib/debug`.
    pub debug_dirs: Vec<PathBuf>,
    /// The container runtime's state dir on the host (containerd: `/run/containerd`).
    pub runtime_state_dir: PathBuf,
}

impl HandlerConfig {
    /// Its file in `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("coredump").join("handler.json")
    }

    /// Reads it from `state_dir`.
    pub fn load(state_dir: &Path) -> io::Result<HandlerConfig> {
        let bytes = std::fs::read(HandlerConfig::path(state_dir))?;
        serde_json::from_slice(&bytes).map_err(io::Error::other)
    }

    /// Writes it into `state_dir`, atomically.
    pub fn store(&self, state_dir: &Path) -> io::Result<()> {
        let path = HandlerConfig::path(state_dir);
        write_atomically(
            &path,
            &serde_json::to_vec_pretty(self).map_err(io::Error::other)?,
        )
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The directory where the handler leaves one event per crash for the agent.
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// The spool of the state dir `state_dir`.
    pub fn in_state_dir(state_dir: &Path) -> Spool {
        Spool {
            dir: state_dir.join("coredump").join("spool"),
        }
    }

    /// Spools `event`: `TID.TIME_NS.json`, written atomically.
    pub fn write(&self, event: &CrashEvent) -> io::Result<PathBuf> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = self
            .dir
            .join(format!("{}.{nanos}.json", event.pid.unwrap_or(0)));
        write_atomically(&path, &serde_json::to_vec(event).map_err(io::Error::other)?)?;
        Ok(path)
    }

    /// Marks a dump of thread `tid` as being analysed, until the returned guard is dropped.
    pub fn mark_in_flight(&self, tid: &str) -> Option<InFlight> {
        std::fs::create_dir_all(&self.dir).ok()?;
        let path = self.dir.join(format!("{tid}.inflight"));
        std::fs::write(&path, b"").ok()?;
        Some(InFlight(path))
    }

    /// Whether the handler is analysing a dump of thread `tid` now.
    pub fn is_in_flight(&self, tid: u32) -> bool {
        self.dir.join(format!("{tid}.inflight")).exists()
    }

    /// The spooled events, oldest first. Files that are not spooled events (hostile or
    /// half-written ones) are removed and counted in the second value.
    pub fn read(&self) -> (Vec<(PathBuf, CrashEvent)>, usize) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return (Vec::new(), 0);
        };
        let mut paths: Vec<(u128, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| {
                let time = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.rsplit('.').next())
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                (time, p)
            })
            .collect();
        paths.sort();
        let mut events = Vec::new();
        let mut bad = 0;
        for (_, path) in paths {
            match read_event(&path) {
                Ok(event) => events.push((path, event)),
                Err(err) => {
                    tracing::warn!(file = %path.display(), %err, "removing an unreadable spooled crash");
                    let _ = std::fs::remove_file(&path);
                    bad += 1;
                }
            }
        }
        (events, bad)
    }
}

fn read_event(path: &Path) -> io::Result<CrashEvent> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_SPOOLED_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SPOOLED_BYTES {
        return Err(io::Error::other("larger than any spooled event"));
    }
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

/// A dump being analysed; the mark goes when this is dropped.
pub struct InFlight(PathBuf);

impl Drop for InFlight {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spooled_events_come_back_oldest_first_and_hostile_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::in_state_dir(dir.path());
        let mut first = CrashEvent::new(crds::EventKind::Segfault);
        first.pid = Some(7);
        let mut second = CrashEvent::new(crds::EventKind::Abort);
        second.pid = Some(8);
        spool.write(&first).unwrap();
        spool.write(&second).unwrap();
        std::fs::write(spool.dir.join("9.1.json"), b"{not json").unwrap();
        let (events, bad) = spool.read();
        assert_eq!(bad, 1);
        let kinds: Vec<_> = events.iter().map(|(_, e)| e.kind).collect();
        assert_eq!(kinds, [crds::EventKind::Segfault, crds::EventKind::Abort]);
        assert!(!spool.dir.join("9.1.json").exists());
        let mark = spool.mark_in_flight("8").unwrap();
        assert!(spool.is_in_flight(8));
        drop(mark);
        assert!(!spool.is_in_flight(8));
    }
}
