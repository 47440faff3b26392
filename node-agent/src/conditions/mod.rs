//! The Node conditions the agent writes on its own Node's status, and how they are derived
//! (pure). This is a contract with remediators (medik8s NodeHealthCheck, MachineHealthCheck,
//! draino) and with the chart's admission policy; `tests/node_conditions.rs` pins it.
//!
//! - [`PROCESS_HUNG`]: True while a watched thread has been stuck in uninterruptible sleep
//!   past the threshold; False once every such thread left `D` or exited. Derived on every
//!   `/proc` scan, so a restarted agent finds the same answer, never a reset one.
//! - [`NBD_DEVICE_ERROR`]: True while the kernel logged an nbd driver error within the
//!   window; False after a whole window without one. A restarted agent reads the kernel
//!   ring again for these ([`scan_ring_for_nbd_errors`]).

pub mod reboot;
pub mod ring;
pub mod writer;

use std::collections::BTreeMap;
use std::time::Duration;

pub use ring::scan_ring_for_nbd_errors;

use std::path::Path;

use tokio::sync::watch;

/// What the daemon feeds the condition writer: derives the conditions from its `/proc`
/// scans and the kernel log records it reads, and hands them over a watch channel.
#[derive(Debug)]
pub struct ConditionFeed {
    sender: watch::Sender<Option<Vec<Desired>>>,
    nbd_window: Duration,
    nbd: NbdErrors,
    ring_through: Option<u64>,
}

impl ConditionFeed {
    /// A feed sending to `sender`; nbd errors count for `nbd_window`.
    pub fn new(sender: watch::Sender<Option<Vec<Desired>>>, nbd_window: Duration) -> Self {
        ConditionFeed {
            sender,
            nbd_window,
            nbd: NbdErrors::new(),
            ring_through: None,
        }
    }

    /// Reads the nbd errors of the last window from the kernel ring (at start).
    pub fn read_ring(&mut self, kmsg: &Path, now_usec: u64) {
        let since = now_usec.saturating_sub(self.nbd_window.as_micros() as u64);
        match scan_ring_for_nbd_errors(kmsg, since, &mut self.nbd) {
            Ok(through) => self.ring_through = through,
            Err(err) => {
                tracing::warn!(%err, kmsg = %kmsg.display(), "cannot reread the kernel ring for nbd errors")
            }
        }
    }

    /// Notes a raw kernel log record the daemon read.
    pub fn on_record(&mut self, bytes: &[u8]) {
        ring::note_record(bytes, self.ring_through, &mut self.nbd);
    }

    /// Derives the conditions after a `/proc` scan. The writer is woken at once only when a
    /// status or reason changes; a new message goes out with the next heartbeat.
    pub fn after_scan(&mut self, stuck: &[HungThread], now_usec: u64) {
        let desired = vec![
            process_hung(stuck),
            self.nbd.condition(now_usec, self.nbd_window),
        ];
        self.sender.send_if_modified(|current| {
            let news = current.as_ref().is_none_or(|was| {
                was.len() != desired.len()
                    || was
                        .iter()
                        .zip(&desired)
                        .any(|(a, b)| a.status != b.status || a.reason != b.reason)
            });
            *current = Some(desired);
            news
        });
    }
}

/// A watched process is stuck in uninterruptible sleep past the threshold.
pub const PROCESS_HUNG: &str = crds::node::PROCESS_HUNG_CONDITION;
/// The nbd driver logged errors recently.
pub const NBD_DEVICE_ERROR: &str = "NbdDeviceError";
/// Every condition type the agent owns, and the only ones it may write.
pub const CONDITION_TYPES: [&str; 2] = [PROCESS_HUNG, NBD_DEVICE_ERROR];

/// `ProcessHung` reason: a `qemu-nbd` thread is stuck.
pub const REASON_QEMU_NBD_HUNG: &str = "QemuNbdHung";
/// `ProcessHung` reason: a watched thread that holds an nbd device open is stuck.
pub const REASON_NBD_CLIENT_HUNG: &str = "NbdClientHung";
/// `ProcessHung` reason: another watched thread is stuck.
pub const REASON_WATCHED_PROCESS_HUNG: &str = "WatchedProcessHung";
/// `ProcessHung` reason when False.
pub const REASON_NO_PROCESS_HUNG: &str = "NoProcessHung";
/// `NbdDeviceError` reason when True.
pub const REASON_NBD_ERRORS: &str = "NbdErrorsLogged";
/// `NbdDeviceError` reason when False.
pub const REASON_NO_NBD_ERRORS: &str = "NoNbdErrors";

/// The Node annotation where the agent states its boot id (written with the conditions):
/// the operator orders reboots for a boot, and a new boot id closes the order.
pub use crds::node::BOOT_ID_ANNOTATION;

/// At most this many threads are named in a `ProcessHung` message.
pub const MAX_THREADS_NAMED: usize = 8;
/// Messages are cut to this many characters.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// A watched thread stuck in `D` past the threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HungThread {
    /// The process id (thread group).
    pub pid: u32,
    /// The thread id.
    pub tid: u32,
    /// The thread's name.
    pub comm: String,
    /// How long it has been blocked, in whole seconds.
    pub blocked_seconds: u64,
    /// Where it sleeps (`/proc/PID/task/TID/wchan`), when the kernel says.
    pub wchan: Option<String>,
    /// The nbd devices the process holds open (`nbd0`).
    pub nbd_devices: Vec<String>,
}

/// One condition as the agent wants it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The condition type (one of [`CONDITION_TYPES`]).
    pub type_: &'static str,
    /// True or False.
    pub status: bool,
    /// The CamelCase reason.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

/// The `ProcessHung` condition for the threads stuck now. The message names the threads
/// stuck longest first, each as
/// `COMM pid PID tid TID: D for Ns, wchan WCHAN[, holds nbdN[,nbdM]]`, joined by `; `, and
/// ends with `; and N more` when more than [`MAX_THREADS_NAMED`] are stuck.
pub fn process_hung(threads: &[HungThread]) -> Desired {
    if threads.is_empty() {
        return Desired {
            type_: PROCESS_HUNG,
            status: false,
            reason: REASON_NO_PROCESS_HUNG,
            message: "no watched process is stuck in uninterruptible sleep".into(),
        };
    }
    let reason = if threads.iter().any(|t| t.comm == "qemu-nbd") {
        REASON_QEMU_NBD_HUNG
    } else if threads.iter().any(|t| !t.nbd_devices.is_empty()) {
        REASON_NBD_CLIENT_HUNG
    } else {
        REASON_WATCHED_PROCESS_HUNG
    };
    let mut sorted: Vec<&HungThread> = threads.iter().collect();
    sorted.sort_by(|a, b| {
        b.blocked_seconds
            .cmp(&a.blocked_seconds)
            .then(a.tid.cmp(&b.tid))
    });
    let mut parts: Vec<String> = sorted
        .iter()
        .take(MAX_THREADS_NAMED)
        .map(|t| {
            let mut part = format!(
                "{} pid {} tid {}: D for {}s, wchan {}",
                t.comm,
                t.pid,
                t.tid,
                t.blocked_seconds,
                t.wchan.as_deref().unwrap_or("?")
            );
            if !t.nbd_devices.is_empty() {
                part.push_str(&format!(", holds {}", t.nbd_devices.join(",")));
            }
            part
        })
        .collect();
    if sorted.len() > MAX_THREADS_NAMED {
        parts.push(format!("and {} more", sorted.len() - MAX_THREADS_NAMED));
    }
    Desired {
        type_: PROCESS_HUNG,
        status: true,
        reason,
        message: cut(parts.join("; ")),
    }
}

/// The nbd errors seen in the kernel log, per device (µs on the monotonic clock).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NbdErrors {
    by_device: BTreeMap<String, DeviceErrors>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DeviceErrors {
    count: u64,
    last_usec: u64,
    last_meaning: String,
}

impl NbdErrors {
    /// None seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes an error on `device` logged at `at_usec`.
    pub fn note(&mut self, device: &str, meaning: &str, at_usec: u64) {
        // The devices are named by the kernel, but bound the map against a flood anyway.
        if !self.by_device.contains_key(device) && self.by_device.len() >= 256 {
            return;
        }
        let entry = self
            .by_device
            .entry(device.to_owned())
            .or_insert(DeviceErrors {
                count: 0,
                last_usec: at_usec,
                last_meaning: String::new(),
            });
        entry.count += 1;
        if at_usec >= entry.last_usec {
            entry.last_usec = at_usec;
            entry.last_meaning = meaning.to_owned();
        }
    }

    /// The `NbdDeviceError` condition at `now_usec`: True when an error was logged within
    /// `window`. Devices quiet for a whole window are forgotten. The message names each
    /// device as `nbdN: K errors, last Ss ago: MEANING`, joined by `; `.
    pub fn condition(&mut self, now_usec: u64, window: Duration) -> Desired {
        let window_usec = window.as_micros() as u64;
        self.by_device
            .retain(|_, e| now_usec.saturating_sub(e.last_usec) < window_usec);
        if self.by_device.is_empty() {
            return Desired {
                type_: NBD_DEVICE_ERROR,
                status: false,
                reason: REASON_NO_NBD_ERRORS,
                message: format!("no nbd error logged in the last {}s", window.as_secs()),
            };
        }
        let parts: Vec<String> = self
            .by_device
            .iter()
            .map(|(device, e)| {
                format!(
                    "{device}: {} errors, last {}s ago: {}",
                    e.count,
                    now_usec.saturating_sub(e.last_usec) / 1_000_000,
                    e.last_meaning
                )
            })
            .collect();
        Desired {
            type_: NBD_DEVICE_ERROR,
            status: true,
            reason: REASON_NBD_ERRORS,
            message: cut(parts.join("; ")),
        }
    }
}

fn cut(mut text: String) -> String {
    if text.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(tid: u32, comm: &str, secs: u64, nbd: &[&str]) -> HungThread {
        HungThread {
            pid: 100,
            tid,
            comm: comm.into(),
            blocked_seconds: secs,
            wchan: Some("nbd_queue_rq".into()),
            nbd_devices: nbd.iter().map(|d| (*d).to_owned()).collect(),
        }
    }

    #[test]
    fn reasons_follow_what_is_stuck() {
        assert_eq!(process_hung(&[]).reason, REASON_NO_PROCESS_HUNG);
        assert!(!process_hung(&[]).status);
        assert_eq!(
            process_hung(&[thread(1, "dd", 5, &[])]).reason,
            REASON_WATCHED_PROCESS_HUNG
        );
        assert_eq!(
            process_hung(&[thread(1, "dd", 5, &["nbd0"])]).reason,
            REASON_NBD_CLIENT_HUNG
        );
        assert_eq!(
            process_hung(&[thread(1, "dd", 5, &["nbd0"]), thread(2, "qemu-nbd", 1, &[])]).reason,
            REASON_QEMU_NBD_HUNG
        );
    }

    #[test]
    fn many_threads_make_a_bounded_message_longest_first() {
        let threads: Vec<HungThread> = (0..20)
            .map(|i| thread(i, "qemu-nbd", u64::from(i), &[]))
            .collect();
        let hung = process_hung(&threads);
        assert!(
            hung.message
                .starts_with("qemu-nbd pid 100 tid 19: D for 19s")
        );
        assert!(hung.message.ends_with("; and 12 more"), "{}", hung.message);
        let long = thread(1, &"x".repeat(5000), 1, &[]);
        assert!(process_hung(&[long]).message.len() <= MAX_MESSAGE_LEN);
    }

    #[test]
    fn nbd_errors_clear_after_a_quiet_window() {
        const S: u64 = 1_000_000;
        let window = Duration::from_secs(600);
        let mut errors = NbdErrors::new();
        assert!(!errors.condition(10 * S, window).status);
        errors.note("nbd0", "the server did not answer", 100 * S);
        errors.note("nbd0", "the server did not answer", 130 * S);
        let set = errors.condition(140 * S, window);
        assert!(set.status);
        assert_eq!(
            set.message,
            "nbd0: 2 errors, last 10s ago: the server did not answer"
        );
        assert!(errors.condition(729 * S, window).status);
        let cleared = errors.condition(730 * S, window);
        assert!(!cleared.status);
        assert_eq!(cleared.reason, REASON_NO_NBD_ERRORS);
    }
}
