//! Finding a crashed module's binary and its debug information on the node.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crds::CrashEvent;

use super::debuginfod::Debuginfod;
use super::elf::{ElfFile, hex};

/// Where binaries and debug files are looked for.
#[derive(Debug, Clone)]
pub struct Places {
    /// The host filesystem prefix (`/`, or where the DaemonSet mounts the host).
    pub root: PathBuf,
    /// The proc filesystem of the host's pid namespace.
    pub proc_root: PathBuf,
    /// Binaries named explicitly (`--binary`): used for modules of the same file name.
    pub binaries: Vec<PathBuf>,
    /// Directories searched for a module by file name (under `root`).
    pub search_paths: Vec<PathBuf>,
    /// Roots holding `.build-id/xx/rest.debug` and debuglink files (under `root`).
    pub debug_dirs: Vec<PathBuf>,
    /// Debuginfod servers, asked by build-id when no local file has the DWARF.
    pub debuginfod: Option<Arc<Debuginfod>>,
}

/// The default search path for modules, as on Debian.
pub const DEFAULT_SEARCH_PATHS: [&str; 9] = [
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib",
    "/usr/local/lib",
    "/lib/x86_64-linux-gnu",
    "/usr/libexec",
];

impl Places {
    /// `path` as seen from the agent: under `root`.
    pub fn under_root(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Candidate paths for the event's module, best first: `--binary`, the live process's
    /// mappings (hung processes still exist, also inside containers), then the search path.
    pub fn binary_candidates(&self, event: &CrashEvent) -> Vec<PathBuf> {
        let Some(module) = event.module.as_deref() else {
            return Vec::new();
        };
        let mut candidates: Vec<PathBuf> = self
            .binaries
            .iter()
            .filter(|b| b.file_name().is_some_and(|n| n == module))
            .cloned()
            .collect();
        if let Some(pid) = event.pid {
            candidates.extend(self.mapped_by_live_process(pid, event.comm.as_deref(), module));
        }
        for dir in &self.search_paths {
            let path = self.under_root(&dir.join(module));
            if path.is_file() {
                candidates.push(path);
            }
        }
        candidates.dedup();
        candidates
    }

    /// The module as mapped by a process that still runs (`/proc/PID/root` + the mapped path).
    fn mapped_by_live_process(
        &self,
        pid: u32,
        comm: Option<&str>,
        module: &str,
    ) -> Option<PathBuf> {
        let task = self.proc_root.join(pid.to_string());
        // The pid may have been reused since the crash: the name must still match.
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        let live_comm = crate::hangwatch::procfs::parse_stat(&stat)?.comm;
        if comm.is_some_and(|c| c != live_comm) {
            return None;
        }
        let maps = std::fs::read_to_string(task.join("maps")).ok()?;
        let mapped = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| Path::new(p).file_name().is_some_and(|n| n == module))?;
        Some(task.join("root").join(mapped.trim_start_matches('/')))
    }

    /// `DEBUG_DIR/.build-id/xx/rest.debug` for build-id `id`, under `root`, for each debug
    /// dir (none for an id shorter than two bytes).
    fn build_id_paths(&self, id: &[u8]) -> Vec<PathBuf> {
        if id.len() < 2 {
            return Vec::new();
        }
        let id_hex = hex(id);
        self.debug_dirs
            .iter()
            .map(|dir| {
                self.under_root(
                    &dir.join(".build-id")
                        .join(&id_hex[..2])
                        .join(format!("{}.debug", &id_hex[2..])),
                )
            })
            .collect()
    }

    /// The dwz supplementary file named by `debug_file`'s `.gnu_debugaltlink`: at the named
    /// path (under `root`, or relative to the debug file), or by its build-id under a
    /// debug dir. Its build-id must be the one the link records.
    ///
    /// The named path comes from a file, not from the operator: it is used only when,
    /// with `..` and symlinks resolved, it lies in a debug dir or in the directory of
    /// `binary` (the crashed module), so that a crafted link cannot make the agent read
    /// other host files.
    pub fn supplementary_file(&self, debug_file: &ElfFile, binary: &Path) -> Option<ElfFile> {
        let (name, id) = debug_file.debugaltlink.as_ref()?;
        let named = Path::new(name);
        let mut places = Vec::new();
        let linked = if named.is_absolute() {
            Some(self.under_root(named))
        } else {
            debug_file.path.parent().map(|dir| dir.join(named))
        };
        if let Some(linked) = linked {
            match self.confined(&linked, binary) {
                Some(path) => places.push(path),
                None => tracing::warn!(
                    debug_file = %debug_file.path.display(),
                    link = %name,
                    "ignoring a .gnu_debugaltlink that leads outside the debug dirs and the binary's directory"
                ),
            }
        }
        places.extend(self.build_id_paths(id));
        // The supplementary file must not be the debug file itself (a link loop).
        places
            .into_iter()
            .filter(|p| p != &debug_file.path)
            .filter_map(|p| ElfFile::read(&p).ok())
            .find(|f| f.build_id.as_deref() == Some(id) && f.has_dwarf)
    }

    /// `path` with `..` and symlinks resolved, if it lies in a debug dir (under `root`) or
    /// in `binary`'s own directory.
    fn confined(&self, path: &Path, binary: &Path) -> Option<PathBuf> {
        let resolved = std::fs::canonicalize(path).ok()?;
        let allowed = self
            .debug_dirs
            .iter()
            .map(|dir| self.under_root(dir))
            .chain(binary.parent().map(Path::to_owned));
        for dir in allowed {
            if let Ok(dir) = std::fs::canonicalize(&dir)
                && resolved.starts_with(&dir)
            {
                return Some(resolved);
            }
        }
        None
    }

    /// The file holding `binary`'s DWARF: itself, a build-id file, or a debuglink target.
    /// Returns the file and how it was found.
    pub fn debug_file(&self, binary: &ElfFile) -> Option<(ElfFile, &'static str)> {
        if binary.has_dwarf {
            return Some((binary.clone(), "own DWARF"));
        }
        if let Some(id) = binary.build_id.as_deref() {
            for path in self.build_id_paths(id) {
                if let Ok(file) = ElfFile::read(&path)
                    && file.build_id.as_deref() == Some(id)
                    && file.has_dwarf
                {
                    return Some((file, "build-id"));
                }
            }
        }
        if let Some((name, crc)) = &binary.debuglink {
            let name = Path::new(name).file_name()?;
            let dir = binary.path.parent().unwrap_or(Path::new("/"));
            let mut places = vec![dir.join(name), dir.join(".debug").join(name)];
            for debug_dir in &self.debug_dirs {
                // GDB's layout: DEBUGDIR/<the binary's directory on the host>/NAME.
                let host_dir = dir.strip_prefix(&self.root).unwrap_or(dir);
                places.push(
                    self.under_root(
                        &debug_dir
                            .join(host_dir.strip_prefix("/").unwrap_or(host_dir))
                            .join(name),
                    ),
                );
            }
            for path in places {
                if let Ok(file) = ElfFile::read(&path)
                    && file.crc32().is_ok_and(|actual| actual == *crc)
                    && file.has_dwarf
                {
                    return Some((file, "debuglink"));
                }
            }
        }
        if let (Some(client), Some(id)) = (&self.debuginfod, binary.build_id.as_deref()) {
            match client.lookup(id).map(|path| ElfFile::read(&path)) {
                Ok(Ok(file)) => return Some((file, "debuginfod")),
                Ok(Err(err)) => tracing::warn!(%err, "unusable file in the debuginfod cache"),
                Err(err) => tracing::debug!(%err, "debuginfod has no debug file"),
            }
        }
        None
    }
}
