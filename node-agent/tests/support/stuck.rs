//! A real hung task to order: qemu-nbd serves a disk on a unix socket, nbdfuse turns it into
//! a FUSE file, qemu-nbd is stopped, and an O_DIRECT reader of that file (a copy of dd named
//! `qemu-nbd`, the process the agent watches by default) sleeps uninterruptibly and cannot be
//! killed until qemu-nbd continues. See the kernel fault lab, recipe 1.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{have, require, require_kernel, wait_until};

/// Root, FUSE, hung-task detection, qemu-nbd and nbdfuse.
pub fn require_nbd_lab() -> bool {
    require_kernel()
        && require("needs /dev/fuse", Path::new("/dev/fuse").exists())
        && require(
            "needs hung-task detection",
            Path::new("/proc/sys/kernel/hung_task_timeout_secs").exists(),
        )
        && require("needs qemu-nbd (qemu-utils)", have("qemu-nbd"))
        && require("needs nbdfuse (libnbd-bin)", have("nbdfuse"))
        && require("needs fusermount3 (fuse3)", have("fusermount3"))
}

/// A stopped qemu-nbd and a reader stuck on it; undone in the safe order when dropped.
pub struct StuckReader {
    dir: tempfile::TempDir,
    qemu_nbd: Child,
    nbdfuse: Child,
    reader: Option<Child>,
}

/// Starts `command` in a session of its own, with no standard streams.
pub fn spawn_in_new_session(command: &mut Command, what: &str) -> Child {
    // SAFETY: setsid is async-signal-safe. A session of its own keeps a stopped server
    // from receiving SIGHUP+SIGCONT when its process group is orphaned.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    }
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap_or_else(|e| panic!("start {what}: {e}"))
}

impl StuckReader {
    /// Starts the server, stops it, and returns once a reader named `qemu-nbd` is in `D`
    /// state.
    pub fn start() -> StuckReader {
        StuckReader::start_named("qemu-nbd")
    }

    /// As `start`, with a reader named `name`.
    pub fn start_named(name: &str) -> StuckReader {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        std::fs::File::create(path("disk.img"))
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        std::fs::create_dir(path("mnt")).unwrap();
        let qemu_nbd = spawn_in_new_session(
            Command::new("qemu-nbd")
                .args(["-f", "raw", "-t", "-k"])
                .arg(path("nbd.sock"))
                .arg(path("disk.img")),
            "qemu-nbd",
        );
        wait_until("the qemu-nbd socket", Duration::from_secs(10), || {
            path("nbd.sock").exists()
        });
        let nbdfuse = spawn_in_new_session(
            Command::new("nbdfuse")
                .arg(path("mnt"))
                .arg("--unix")
                .arg(path("nbd.sock")),
            "nbdfuse",
        );
        wait_until("the nbdfuse file", Duration::from_secs(10), || {
            path("mnt/nbd").exists()
        });
        std::fs::copy("/bin/dd", path(name)).unwrap();
        let mut stuck = StuckReader {
            dir,
            qemu_nbd,
            nbdfuse,
            reader: None,
        };
        signal(stuck.qemu_nbd.id(), libc::SIGSTOP);
        let reader = Command::new(stuck.path(name))
            .arg(format!("if={}", stuck.path("mnt/nbd").display()))
            .args([
                "of=/dev/null",
                "bs=4k",
                "count=1",
                "iflag=direct",
                "status=none",
            ])
            .spawn()
            .expect("start the reader");
        stuck.reader = Some(reader);
        let stat = format!("/proc/{}/stat", stuck.reader_pid());
        wait_until("the reader to block in D", Duration::from_secs(10), || {
            std::fs::read_to_string(&stat).is_ok_and(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('D'))
            })
        });
        stuck
    }

    /// A file in the lab's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The stuck reader's pid.
    pub fn reader_pid(&self) -> u32 {
        self.reader.as_ref().unwrap().id()
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, signal) };
}

impl Drop for StuckReader {
    fn drop(&mut self) {
        // 1. Continue qemu-nbd, so the pending read completes; 2. the reader exits;
        // 3. unmount, so nbdfuse exits; 4. stop qemu-nbd.
        signal(self.qemu_nbd.id(), libc::SIGCONT);
        if let Some(reader) = &mut self.reader {
            let _ = reader.wait();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(self.path("mnt"))
            .status();
        let _ = self.nbdfuse.wait();
        signal(self.qemu_nbd.id(), libc::SIGTERM);
        let _ = self.qemu_nbd.wait();
    }
}
