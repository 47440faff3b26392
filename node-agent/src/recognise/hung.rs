//! Hung-task reports from khungtaskd (pure).

/// The header of a hung-task report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HungHeader {
    /// The task name.
    pub comm: String,
    /// The thread id.
    pub pid: u32,
    /// How long the task had been blocked (measured by the kernel, not the configured timeout).
    pub blocked_seconds: u64,
}

/// Parses `INFO: task NAME:PID blocked for more than N seconds.` and the newest wording,
/// `INFO: task NAME:PID blocked in I/O wait for more than N seconds.` (the final period may be
/// lost when a line is cut or pasted).
pub fn parse_header(message: &str) -> Option<HungHeader> {
    let rest = message.strip_prefix("INFO: task ")?;
    let (at, anchor) = [
        (
            anchor_rev!(" blocked for more than "),
            " blocked for more than ".len(),
        ),
        (
            anchor_rev!(" blocked in I/O wait for more than "),
            " blocked in I/O wait for more than ".len(),
        ),
    ]
    .iter()
    .filter_map(|(finder, len)| finder.rfind(rest.as_bytes()).map(|at| (at, *len)))
    .max()?;
    let tail = rest[at + anchor..].trim_end();
    let seconds = tail
        .strip_suffix('.')
        .unwrap_or(tail)
        .strip_suffix(" seconds")?;
    let (comm, pid) = rest[..at].rsplit_once(':')?;
    Some(HungHeader {
        comm: comm.to_owned(),
        pid: pid.parse().ok()?,
        blocked_seconds: seconds.parse().ok()?,
    })
}

/// Parses `INFO: task A:PID <writer> blocked on an rw-semaphore likely owned by task B:PID <writer>`
/// (and the mutex and semaphore variants) into a plain sentence about the owner.
pub fn parse_blocker(message: &str) -> Option<String> {
    let rest = message.strip_prefix("INFO: task ")?;
    let (_, on) = rest.split_once(" blocked on ")?;
    let (lock, owner) = on.split_once(" likely owned by task ")?;
    let owner = owner.split(" <").next().unwrap_or(owner);
    Some(format!("blocked on {lock} likely owned by task {owner}"))
}

/// The blocked task of a lock-owner line: `INFO: task NAME:PID <writer> blocked on …`.
pub fn parse_blocked_task(message: &str) -> Option<(String, u32)> {
    let rest = message.strip_prefix("INFO: task ")?;
    let (task, _) = rest.split_once(" blocked on ")?;
    let task = task.split(" <").next().unwrap_or(task);
    let (comm, pid) = task.rsplit_once(':')?;
    Some((comm.to_owned(), pid.parse().ok()?))
}

/// Whether a record continues a hung-task report (banner, state line, call trace, registers).
pub fn is_report_continuation(message: &str) -> bool {
    message.starts_with(' ')
        || message.starts_with("task:")
        || message.starts_with("Call Trace:")
        || message.starts_with("Call trace:")
        || message.starts_with("Workqueue: ")
        || message.starts_with("Backtrace:")
        || message.starts_with("[<")
        || message.starts_with("\"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\"")
        || message.starts_with("INFO: task ") && message.contains(" blocked on ")
        || is_register_line(message)
        || is_old_state_line(message)
        || is_stack_words(message)
}

/// Raw stack words (`ffff882fd0627c70 0000000000000086 …`) whose leading space syslog dropped.
fn is_stack_words(message: &str) -> bool {
    let mut words = message.split_whitespace().peekable();
    words.peek().is_some()
        && words.all(|w| matches!(w.len(), 8 | 16) && w.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `RIP: 0033:0x7fa0e70e42ad`, `RSP: …`, `RAX: …` … `R15: …`.
fn is_register_line(message: &str) -> bool {
    let Some(at) = anchor!(": ").find(message.as_bytes()) else {
        return false;
    };
    let name = &message[..at];
    name.len() == 3 && name.starts_with('R') && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Old kernels' `NAME D ffff88003fc13780 0 1234 2 0x00000000` state line.
fn is_old_state_line(message: &str) -> bool {
    let words: Vec<&str> = message.split_whitespace().collect();
    words.len() >= 5
        && words
            .iter()
            .rev()
            .take(4)
            .all(|w| w.bytes().all(|b| b.is_ascii_alphanumeric()))
        && words.contains(&"D")
}

/// A reliable kernel stack frame (`name+0x…/0x…`, optionally `[<addr>]`-prefixed), or None for
/// banners, registers and the `?`-marked guesses.
pub fn stack_frame(message: &str) -> Option<&str> {
    let frame = message.trim_start();
    let frame = match frame.strip_prefix("[<") {
        Some(rest) => &rest[anchor!(">] ").find(rest.as_bytes())? + 3..],
        None => frame,
    };
    let symbol = frame.split_whitespace().next()?;
    let offsets = &symbol[anchor!("+0x").find(symbol.as_bytes())? + 3..];
    (!frame.starts_with('?') && anchor!("/0x").find(offsets.as_bytes()).is_some()).then_some(frame)
}

/// `Future hung task reports are suppressed, see sysctl kernel.hung_task_warnings`.
pub fn is_suppression_notice(message: &str) -> bool {
    message.starts_with("Future hung task reports are suppressed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header() {
        let h = parse_header("INFO: task qemu-nbd:31114 blocked for more than 2 seconds.").unwrap();
        assert_eq!(
            h,
            HungHeader {
                comm: "qemu-nbd".into(),
                pid: 31114,
                blocked_seconds: 2
            }
        );
        let h =
            parse_header("INFO: task jbd2/loop1-8:29924 blocked for more than 6 seconds.").unwrap();
        assert_eq!(h.comm, "jbd2/loop1-8");
        let h = parse_header("INFO: task a:b c:7 blocked for more than 120 seconds.").unwrap();
        assert_eq!((h.comm.as_str(), h.pid), ("a:b c", 7));
        let h = parse_header(
            "INFO: task kworker/u8:0:5 blocked in I/O wait for more than 122 seconds.",
        )
        .unwrap();
        assert_eq!(
            (h.comm.as_str(), h.pid, h.blocked_seconds),
            ("kworker/u8:0", 5, 122)
        );
        assert!(parse_header("INFO: task x:1 blocked for more than 12 minutes.").is_none());
        assert!(
            parse_header(
                "INFO: task x:1 blocked on an rw-semaphore likely owned by task dd:2 <writer>"
            )
            .is_none()
        );
    }

    #[test]
    fn blocker() {
        let b = parse_blocker("INFO: task qemu-nbd:24894 <writer> blocked on an rw-semaphore likely owned by task dd:24893 <writer>").unwrap();
        assert_eq!(
            b,
            "blocked on an rw-semaphore likely owned by task dd:24893"
        );
    }

    #[test]
    fn continuation_and_frames() {
        for line in [
            "      Not tainted 6.18.44-fc-v669 #1",
            "\"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\" disables this message.",
            "task:qemu-nbd        state:D stack:0     pid:645   tgid:645   ppid:584    task_flags:0x400000 flags:0x00080001",
            "Call Trace:",
            " <TASK>",
            " folio_wait_bit+0xd6/0x220",
            "RIP: 0033:0x7fe35d664c20",
            "R13: 0000000000000000 R14: 0000000000000001 R15: 0000000000000001",
            "qemu-nbd        D ffff88003fc13780     0  1234      2 0x00000000",
            "ffff882fd0627c70 0000000000000086 ffff880844fe8fb0 ffff882fd0627fd8",
            "Call trace:",
        ] {
            assert!(is_report_continuation(line), "{line}");
        }
        assert!(!is_report_continuation(
            "crashy[1]: segfault at 0 ip 0 sp 0 error 4"
        ));
        assert!(!is_report_continuation("deadbeef is not a stack"));
        assert_eq!(
            stack_frame(" folio_wait_bit+0xd6/0x220"),
            Some("folio_wait_bit+0xd6/0x220")
        );
        assert_eq!(
            stack_frame(" [<ffffffff8150b9f5>] schedule+0x35/0x80"),
            Some("schedule+0x35/0x80")
        );
        assert_eq!(stack_frame(" ? srso_alias_return_thunk+0x5/0xfbef5"), None);
        assert_eq!(stack_frame(" <TASK>"), None);
        assert_eq!(stack_frame("RIP: 0033:0x7fe35d664c20"), None);
    }
}
