//! Finding hung tasks of watched processes by scanning `/proc`.
//!
//! The kernel stops printing hung-task reports after `kernel.hung_task_warnings` (10 per
//! boot), may have detection disabled, and never reports tasks waiting on a synchronous bio.
//! So the agent also looks for itself: every scan walks `/proc/*/task/*`, and a thread of a
//! watched process that sits in uninterruptible sleep (`D`) without running for longer than
//! the threshold becomes a `HungTask` event, once per stuck episode (see [`episodes`]).

pub mod episodes;
pub mod procfs;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crds::{CrashEvent, DetectedBy, EventKind};
use serde::{Deserialize, Serialize};

pub use episodes::{EpisodeVerdict, HangEpisodes, SavedEpisode};

/// The longest task name the kernel keeps (`TASK_COMM_LEN - 1`).
const COMM_LEN: usize = 15;

/// What the watcher looks for.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The proc filesystem to scan (the host's, with `hostPID`).
    pub proc_root: PathBuf,
    /// Process names to watch; matched against each thread's name as the kernel truncates it.
    pub process_names: Vec<String>,
    /// How long a thread must be blocked before it is reported.
    pub threshold: Duration,
}

/// A watched thread found in uninterruptible sleep.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sighting {
    pid: u32,
    tid: u32,
    comm: String,
    switches: Option<u64>,
    last_ran_usec: Option<u64>,
    cpu: Option<usize>,
}

/// When the scan first saw a thread blocked, kept across agent restarts (for kernels without
/// `se.exec_start`, where it dates the episode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedSighting {
    /// The thread id.
    pub tid: u32,
    /// Its voluntary + involuntary context switches then.
    pub switches: Option<u64>,
    /// When it was first seen blocked with that count (µs, monotonic).
    pub since: u64,
}

/// What the hang watcher and the episode tracker keep across agent restarts in one boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HangState {
    /// The boot these monotonic times belong to.
    pub boot_id: String,
    /// Episodes already reported and delivered.
    #[serde(default)]
    pub episodes: Vec<SavedEpisode>,
    /// Threads the scan has seen blocked.
    #[serde(default)]
    pub sightings: Vec<SavedSighting>,
}

/// Scans `/proc` for stuck threads of watched processes.
#[derive(Debug)]
pub struct HangWatcher {
    config: WatchConfig,
    /// Per thread: the context-switch count and when the scan first saw it blocked with it,
    /// the fallback when `se.exec_start` is not available.
    first_seen: HashMap<u32, (Option<u64>, u64)>,
    /// The watched threads stuck past the threshold at the last scan.
    stuck: Vec<crate::conditions::HungThread>,
}

impl HangWatcher {
    /// A watcher with the given configuration.
    pub fn new(config: WatchConfig) -> Self {
        HangWatcher {
            config,
            first_seen: HashMap::new(),
            stuck: Vec::new(),
        }
    }

    /// The threads seen blocked, to keep across a restart.
    pub fn sightings(&self) -> Vec<SavedSighting> {
        let mut saved: Vec<SavedSighting> = self
            .first_seen
            .iter()
            .map(|(&tid, &(switches, since))| SavedSighting {
                tid,
                switches,
                since,
            })
            .collect();
        saved.sort_by_key(|s| s.tid);
        saved
    }

    /// Takes back the threads seen blocked before a restart.
    pub fn restore(&mut self, saved: Vec<SavedSighting>) {
        for s in saved {
            self.first_seen.insert(s.tid, (s.switches, s.since));
        }
    }

    /// Whether `comm` (as the kernel prints it) is one of the watched process names.
    pub fn is_watched(&self, comm: &str) -> bool {
        self.config
            .process_names
            .iter()
            .any(|name| truncate_comm(name) == comm)
    }

    /// The watched threads stuck past the threshold at the last scan (the `ProcessHung`
    /// condition's input).
    pub fn stuck(&self) -> &[crate::conditions::HungThread] {
        &self.stuck
    }

    /// Scans once at `now_usec` (monotonic clock) and returns the episodes to report.
    pub fn scan(&mut self, episodes: &mut HangEpisodes, now_usec: u64) -> Vec<CrashEvent> {
        let sightings = self.blocked_threads();
        self.stuck.clear();
        let mut lags = HashMap::new();
        self.first_seen
            .retain(|tid, _| sightings.iter().any(|s| s.tid == *tid));
        let threshold = self.config.threshold.as_micros() as u64;
        let mut events = Vec::new();
        for sighting in sightings {
            let first = self
                .first_seen
                .entry(sighting.tid)
                .or_insert((sighting.switches, now_usec));
            if first.0 != sighting.switches {
                *first = (sighting.switches, now_usec);
            }
            // `se.exec_start` is on the task clock of the CPU the thread last ran on, which
            // trails CLOCK_MONOTONIC by that CPU's steal and interrupt time (up to 2 s on the
            // loaded development VM), a different amount on each CPU.
            let last_ran = sighting.last_ran_usec.map(|t| {
                let lag = sighting.cpu.map_or(0, |cpu| {
                    *lags
                        .entry(cpu)
                        .or_insert_with(|| task_clock_lag(&self.config.proc_root, cpu))
                });
                t + lag
            });
            let blocked_since = last_ran.unwrap_or(first.1).min(now_usec);
            let blocked_for = now_usec - blocked_since;
            let due = blocked_for >= threshold;
            if due {
                self.stuck.push(self.hung_thread(&sighting, blocked_for));
            }
            if episodes.observe(sighting.tid, &sighting.comm, blocked_since, now_usec, due)
                == Some(EpisodeVerdict::Report)
            {
                events.push(self.event(&sighting, blocked_for));
            }
        }
        events
    }

    fn blocked_threads(&self) -> Vec<Sighting> {
        let mut found = Vec::new();
        let Ok(processes) = fs::read_dir(&self.config.proc_root) else {
            return found;
        };
        for process in processes.flatten() {
            if !is_number(&process.file_name()) {
                continue;
            }
            let Ok(tasks) = fs::read_dir(process.path().join("task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                    continue;
                };
                let dir = task.path();
                let Some(stat) = read(&dir, "stat").as_deref().and_then(procfs::parse_stat) else {
                    continue;
                };
                if stat.state != 'D' || !self.is_watched(&stat.comm) {
                    continue;
                }
                found.push(Sighting {
                    pid: process
                        .file_name()
                        .to_str()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(tid),
                    tid,
                    comm: stat.comm,
                    switches: read(&dir, "status")
                        .as_deref()
                        .and_then(procfs::parse_context_switches),
                    last_ran_usec: read(&dir, "sched")
                        .as_deref()
                        .and_then(procfs::parse_last_ran_usec),
                    cpu: stat.cpu,
                });
            }
        }
        found
    }

    fn hung_thread(
        &self,
        sighting: &Sighting,
        blocked_for_usec: u64,
    ) -> crate::conditions::HungThread {
        let task_dir = self
            .config
            .proc_root
            .join(sighting.pid.to_string())
            .join("task")
            .join(sighting.tid.to_string());
        crate::conditions::HungThread {
            pid: sighting.pid,
            tid: sighting.tid,
            comm: sighting.comm.clone(),
            blocked_seconds: blocked_for_usec / 1_000_000,
            wchan: read(&task_dir, "wchan")
                .map(|w| w.trim().to_owned())
                .filter(|w| !w.is_empty() && w != "0"),
            nbd_devices: nbd_devices_open(&self.config.proc_root.join(sighting.pid.to_string())),
        }
    }

    fn event(&self, sighting: &Sighting, blocked_for_usec: u64) -> CrashEvent {
        let mut event = CrashEvent::new(EventKind::HungTask);
        event.comm = Some(sighting.comm.clone());
        event.pid = Some(sighting.tid);
        event.blocked_seconds = Some(blocked_for_usec / 1_000_000);
        event.detected_by = Some(DetectedBy::ProcScan);
        let task_dir = self.task_dir(sighting.tid);
        event.wchan = task_dir
            .as_deref()
            .and_then(|dir| read(dir, "wchan"))
            .map(|w| w.trim().to_owned())
            .filter(|w| !w.is_empty() && w != "0");
        event.kernel_stack = task_dir
            .as_deref()
            .and_then(|dir| read(dir, "stack"))
            .map(|s| procfs::parse_stack(&s))
            .unwrap_or_default();
        event
    }

    fn task_dir(&self, tid: u32) -> Option<PathBuf> {
        // /proc/TID works for any thread id, even though it is not listed.
        let dir = self.config.proc_root.join(tid.to_string());
        dir.exists().then_some(dir)
    }
}

/// The name as the kernel keeps it: at most 15 bytes, cut at a character boundary.
fn truncate_comm(name: &str) -> &str {
    let mut end = name.len().min(COMM_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The nbd devices (`nbd0`) among the open files of the process at `process_dir`.
fn nbd_devices_open(process_dir: &Path) -> Vec<String> {
    let Ok(fds) = fs::read_dir(process_dir.join("fd")) else {
        return Vec::new();
    };
    let mut devices: Vec<String> = fds
        .flatten()
        .take(4096)
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let name = target.to_str()?.strip_prefix("/dev/")?.to_owned();
            let number = name.strip_prefix("nbd")?;
            (!number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())).then_some(name)
        })
        .collect();
    devices.sort();
    devices.dedup();
    devices
}

fn is_number(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// How far CPU `cpu`'s task clock (that of `se.exec_start`) trails CLOCK_MONOTONIC, in
/// microseconds: this thread moves to that CPU, reads its own `se.exec_start` (set when it was
/// scheduled there, so now to within a tick) and the monotonic clock, and moves back. 0 when
/// it cannot (no such CPU, no `se.exec_start`).
fn task_clock_lag(proc_root: &Path, cpu: usize) -> u64 {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: the sets are plain bit arrays of `size` bytes, valid for both calls.
    unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size, &mut old) != 0 {
            return 0;
        }
        let mut there: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut there);
        if libc::sched_setaffinity(0, size, &there) != 0 {
            return 0;
        }
        let own = read(&proc_root.join("thread-self"), "sched")
            .as_deref()
            .and_then(procfs::parse_last_ran_usec);
        let now = crate::daemon::monotonic_usec();
        libc::sched_setaffinity(0, size, &old);
        own.map_or(0, |own| now.saturating_sub(own))
    }
}

fn read(dir: &Path, file: &str) -> Option<String> {
    fs::read_to_string(dir.join(file)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_names_match_the_truncated_comm() {
        let watcher = HangWatcher::new(WatchConfig {
            proc_root: "/proc".into(),
            process_names: vec!["qemu-nbd".into(), "qemu-storage-daemon".into()],
            threshold: Duration::from_secs(1),
        });
        assert!(watcher.is_watched("qemu-nbd"));
        assert!(watcher.is_watched("qemu-storage-da"));
        assert!(!watcher.is_watched("qemu-nb"));
        assert!(!watcher.is_watched("dd"));
    }
}
