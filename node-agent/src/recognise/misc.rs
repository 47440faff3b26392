//! One-line recognisers: nbd driver errors, OOM kills, kernel oops headers and rate-limit
//! notices (pure).

/// An nbd driver error, with the device and a plain-words summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdError {
    /// The device, for example `nbd0`.
    pub device: String,
    /// What the line means, in plain words.
    pub meaning: &'static str,
}

/// Recognises nbd driver errors: `block nbd0: …` messages (`nbd0: …` before 4.x, when the
/// driver printed the disk name itself), also behind console text printed on the same line,
/// and block-layer I/O errors on nbd.
pub fn parse_nbd(message: &str) -> Option<NbdError> {
    // Every nbd line names the device.
    anchor!("nbd").find(message.as_bytes())?;
    let block = anchor!("block nbd").find(message.as_bytes());
    for (marker, at) in [("block nbd", block), ("nbd", Some(0))] {
        let Some(at) = at else { continue };
        let Some(rest) = message[at..].strip_prefix(marker) else {
            continue;
        };
        let Some((number, text)) = rest.split_once(": ") else {
            continue;
        };
        let boundary = message[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric() && c != '_');
        if !boundary || number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some(meaning) = nbd_meaning(text) {
            return Some(NbdError {
                device: format!("nbd{number}"),
                meaning,
            });
        }
    }
    // "I/O error, dev nbd0, sector 0 op 0x0:(READ) …" with or without a
    // "blk_update_request: " / "print_req_error: " prefix, and "Buffer I/O error on dev nbd0, …".
    for (marker, marker_len, meaning) in [
        (
            anchor!("I/O error, dev nbd"),
            "I/O error, dev nbd".len(),
            "an I/O request to the NBD device failed",
        ),
        (
            anchor!("Buffer I/O error on dev nbd"),
            "Buffer I/O error on dev nbd".len(),
            "a buffered I/O request to the NBD device failed",
        ),
        (
            anchor!("Buffer I/O error on device nbd"),
            "Buffer I/O error on device nbd".len(),
            "a buffered I/O request to the NBD device failed",
        ),
    ] {
        if let Some(at) = marker.find(message.as_bytes()) {
            let number: String = message[at + marker_len..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if !number.is_empty() {
                return Some(NbdError {
                    device: format!("nbd{number}"),
                    meaning,
                });
            }
        }
    }
    None
}

/// The meaning of `block nbdN: shutting down sockets`, which an orderly disconnect prints too.
pub const NBD_SHUTDOWN: &str = "the driver is shutting down the connections to the NBD server";

/// The device of an orderly disconnect notice, `block nbd0: NBD_DISCONNECT` or
/// `block nbd0: Disconnected due to user request.`, after which the driver shuts the sockets
/// down with nothing having failed.
pub fn parse_nbd_disconnect(message: &str) -> Option<&str> {
    let at = anchor!("block nbd").find(message.as_bytes())?;
    let (device, text) = message[at + "block ".len()..].split_once(": ")?;
    let number = &device["nbd".len()..];
    let known = matches!(
        text.trim_end(),
        "NBD_DISCONNECT" | "Disconnected due to user request."
    );
    (known && !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())).then_some(device)
}

fn nbd_meaning(text: &str) -> Option<&'static str> {
    const MEANINGS: [(&str, &str); 14] = [
        (
            "Connection timed out",
            "the NBD server stopped answering and the request timed out",
        ),
        (
            "Possible stuck request",
            "a request to the NBD server has been outstanding for a long time",
        ),
        (
            "Receive control failed",
            "reading a reply from the NBD server failed",
        ),
        (
            "Send control failed",
            "sending a request to the NBD server failed",
        ),
        (
            "Request send failed",
            "sending a request to the NBD server failed",
        ),
        (
            "Dead connection, failed to find a fallback",
            "the connection to the NBD server died and no other connection is left",
        ),
        ("shutting down socket", NBD_SHUTDOWN),
        (
            "Other side returned error",
            "the NBD server answered a request with an error",
        ),
        (
            "Unexpected reply",
            "the NBD server sent a reply the driver did not expect",
        ),
        (
            "Attempted send on invalid socket",
            "the driver tried to use a connection that is gone",
        ),
        (
            "Double reply on req",
            "the NBD server answered one request twice",
        ),
        (
            "Attempted send on closed socket",
            "the driver tried to send a request on a connection that was already closed",
        ),
        (
            "Receive data failed",
            "reading the data of a reply from the NBD server failed",
        ),
        (
            "Send data failed",
            "sending the data of a request to the NBD server failed",
        ),
    ];
    MEANINGS
        .iter()
        .find(|(prefix, _)| {
            text.get(..prefix.len())
                .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
        })
        .map(|(_, meaning)| *meaning)
}

/// A process the OOM killer killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomVictim {
    /// The victim's pid.
    pub pid: u32,
    /// The victim's name.
    pub comm: String,
}

/// The reasons `oom_kill_process` prints before `: Killed process` (and before 5.x before
/// `: Kill process`), plus no reason at all for the `Killed process` line that followed.
const OOM_REASONS: [&str; 6] = [
    "",
    "Out of memory: ",
    "Out of Memory: ",
    "Memory cgroup out of memory: ",
    "Out of memory (oom_kill_allocating_task): ",
    "Memory cgroup out of memory (oom_kill_allocating_task): ",
];

/// Whether `prefix` is one of the reasons, or ends with one after other text (a Kubernetes
/// event's `Warning OOMKilling  ` in front of the kernel's message).
fn is_oom_reason(prefix: &str) -> bool {
    OOM_REASONS.contains(&prefix)
        || OOM_REASONS[1..].iter().any(|reason| {
            prefix.ends_with(reason) && prefix[..prefix.len() - reason.len()].ends_with(' ')
        })
}

/// The victim's cgroup path from the summary line kernels since 5.0 print,
/// `oom-kill:constraint=…,oom_memcg=…,task_memcg=PATH,task=NAME,pid=N,uid=N`.
pub fn parse_oom_task_memcg(message: &str) -> Option<&str> {
    let fields = message.strip_prefix("oom-kill:")?;
    let start = fields.find(",task_memcg=")? + ",task_memcg=".len();
    let path = &fields[start..];
    let path = &path[..path.find(",task=")?];
    path.starts_with('/').then_some(path)
}

/// Recognises `[Memory cgroup ]Out of memory: Killed process PID (NAME) total-vm:…` and the
/// older `Killed process PID (NAME)[, UID N,] total-vm:…` that followed `Kill process …`.
pub fn parse_oom_kill(message: &str) -> Option<OomVictim> {
    let at = anchor!("Killed process ").find(message.as_bytes())?;
    if !is_oom_reason(&message[..at]) {
        return None;
    }
    let rest = &message[at + "Killed process ".len()..];
    // RHEL 6 kernels: `Killed process PID, UID N, (NAME) total-vm:…`.
    let rhel = rest
        .split_once(", UID ")
        .filter(|(pid, _)| pid.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|(pid, after)| Some((pid, after.split_once(", (")?.1)));
    let (pid, rest) = match rhel {
        Some(split) => split,
        None => rest.split_once(" (")?,
    };
    let close = [") total-vm:", "), UID ", ") vsz:", ")."]
        .iter()
        .filter_map(|end| rest.find(end))
        .min()
        .or_else(|| rest.strip_suffix(')').map(str::len))?;
    Some(OomVictim {
        pid: pid.parse().ok()?,
        comm: rest[..close].to_owned(),
    })
}

/// Recognises the victim chosen by the OOM killer before 5.x:
/// `[Memory cgroup ]Out of memory: Kill process PID (NAME) score N or sacrifice child`
/// (before 2.6.36: `kill process PID (NAME) score N or a child`).
pub fn parse_oom_choice(message: &str) -> Option<OomVictim> {
    let at = anchor!("ill process ").find(message.as_bytes())?;
    let at = at
        .checked_sub(3)
        .filter(|&at| matches!(&message[at..at + 3], ": K" | ": k"))?;
    if !is_oom_reason(&message[..at + 2]) {
        return None;
    }
    let rest = &message[at + ": Kill process ".len()..];
    let (pid, rest) = rest.split_once(" (")?;
    let close = rest.rfind(") score ")?;
    let score = &rest[close + ") score ".len()..];
    let (score, child) = score.split_once(' ')?;
    let ok = !score.is_empty()
        && score.bytes().all(|b| b.is_ascii_digit())
        && matches!(child, "or sacrifice child" | "or a child");
    ok.then_some(())?;
    Some(OomVictim {
        pid: pid.parse().ok()?,
        comm: rest[..close].to_owned(),
    })
}

/// Recognises `NAME invoked oom-killer: gfp_mask=…`, the start of an OOM report.
pub fn parse_oom_invoker(message: &str) -> Option<&str> {
    anchor!(" invoked oom-killer: ")
        .find(message.as_bytes())
        .map(|at| &message[..at])
}

/// The texts a kernel oops report starts with.
pub(crate) const OOPS_HEADERS: [&str; 13] = [
    "BUG: unable to handle ",
    "BUG: kernel NULL pointer dereference",
    "general protection fault, ",
    "general protection fault: ",
    "Oops: ",
    "kernel BUG at ",
    "Unable to handle kernel ",
    "Internal error: Oops",
    "stack segment: ",
    "divide error: ",
    "invalid opcode: ",
    "double fault: ",
    "traps: PANIC: double fault",
];

/// Whether a line opens a kernel oops (a fault or BUG inside the kernel itself).
pub fn is_oops_header(message: &str) -> bool {
    OOPS_HEADERS.iter().any(|h| message.starts_with(h))
}

/// The faulting address a kernel oops header names, if any.
pub fn parse_oops_address(message: &str) -> Option<u64> {
    const PREFIXES: [&str; 7] = [
        "BUG: kernel NULL pointer dereference, address: ",
        "BUG: unable to handle page fault for address: ",
        "BUG: unable to handle kernel NULL pointer dereference at ",
        "BUG: unable to handle kernel paging request at ",
        "Unable to handle kernel NULL pointer dereference at virtual address ",
        "Unable to handle kernel paging request at virtual address ",
        "general protection fault, probably for non-canonical address ",
    ];
    let rest = PREFIXES
        .iter()
        .find_map(|p| message.strip_prefix(p))?
        .trim_start();
    let rest = rest.strip_prefix("0x").unwrap_or(rest);
    let digits: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    super::user_fault::hex(&digits)
}

/// Whether a line ends a kernel oops report.
pub fn is_oops_end(message: &str) -> bool {
    message.starts_with("---[ end trace") || message.starts_with("Kernel panic - not syncing")
}

/// `CPU: 1 PID: 123 Comm: insmod Tainted: …` (or `Not tainted`; 6.x+ adds ` UID: N`) inside
/// an oops or OOM report.
pub fn parse_oops_task(message: &str) -> Option<(u32, u32, String)> {
    let rest = message.strip_prefix("CPU: ")?;
    let at = anchor!(" PID: ").find(rest.as_bytes())?;
    let (cpu, rest) = (&rest[..at], &rest[at + " PID: ".len()..]);
    let cpu = anchor!(" UID: ")
        .find(cpu.as_bytes())
        .map_or(cpu, |at| &cpu[..at]);
    let at = anchor!(" Comm: ").find(rest.as_bytes())?;
    let (pid, rest) = (&rest[..at], &rest[at + " Comm: ".len()..]);
    let comm_end = [anchor!(" Tainted"), anchor!(" Not tainted")]
        .iter()
        .filter_map(|t| t.find(rest.as_bytes()))
        .min()
        .unwrap_or(rest.len());
    Some((
        cpu.trim().parse().ok()?,
        pid.trim().parse().ok()?,
        rest[..comm_end].to_owned(),
    ))
}

/// The faulting kernel location from `RIP: 0010:func+0x…/0x…` (x86) or `pc : func+0x…` (arm64).
pub fn parse_oops_location(message: &str) -> Option<&str> {
    if let Some(rest) = message.strip_prefix("RIP: 0010:") {
        return Some(rest.trim());
    }
    let rest = message.strip_prefix("pc : ")?;
    rest.contains('+').then(|| rest.trim())
}

/// The count from a rate-limit notice of the user-fault printers
/// (`show_signal_msg: 990 callbacks suppressed`, `show_signal: 10 callbacks suppressed`).
pub fn parse_crash_suppression(message: &str) -> Option<u64> {
    let before = message.strip_suffix(" callbacks suppressed")?;
    let (function, count) = before.split_once(": ")?;
    const CRASH_PRINTERS: [&str; 5] = [
        "show_signal_msg",
        "show_signal",
        "do_trap",
        "arm64_show_signal",
        "__do_user_fault",
    ];
    CRASH_PRINTERS.contains(&function).then_some(())?;
    count.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_errors() {
        let e = parse_nbd("block nbd0: Connection timed out").unwrap();
        assert_eq!(e.device, "nbd0");
        assert!(e.meaning.contains("timed out"));
        assert_eq!(
            parse_nbd("block nbd12: Receive control failed (result -104)")
                .unwrap()
                .device,
            "nbd12"
        );
        assert_eq!(
            parse_nbd("blk_update_request: I/O error, dev nbd3, sector 0 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 0").unwrap().device,
            "nbd3"
        );
        assert!(
            parse_nbd("Buffer I/O error on dev nbd0, logical block 0, async page read").is_some()
        );
        assert!(
            parse_nbd("block nbd0: NBD_DISCONNECT").is_none(),
            "not an error"
        );
        assert!(parse_nbd("I/O error, dev sda, sector 0").is_none());
        assert!(parse_nbd("block nbdx: Connection timed out").is_none());
        assert_eq!(
            parse_nbd("nbd3: Attempted send on closed socket")
                .unwrap()
                .device,
            "nbd3"
        );
        assert_eq!(
            parse_nbd("[  OK  ] Started x.block nbd1: Receive control failed (result -32)")
                .unwrap()
                .device,
            "nbd1"
        );
        assert!(parse_nbd("unblock nbd0: Connection timed out").is_none());
        assert!(parse_nbd("xnbd0: Connection timed out").is_none());
    }

    #[test]
    fn nbd_disconnect_notices() {
        assert_eq!(
            parse_nbd_disconnect("block nbd0: NBD_DISCONNECT"),
            Some("nbd0")
        );
        assert_eq!(
            parse_nbd_disconnect("block nbd12: Disconnected due to user request."),
            Some("nbd12")
        );
        assert_eq!(
            parse_nbd_disconnect("block nbd0: shutting down sockets"),
            None
        );
        assert_eq!(parse_nbd_disconnect("block nbdx: NBD_DISCONNECT"), None);
        assert_eq!(parse_nbd_disconnect("block nbd: NBD_DISCONNECT"), None);
    }

    #[test]
    fn oom_kills() {
        let v = parse_oom_kill("Out of memory: Killed process 1234 (qemu-nbd) total-vm:1000kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:1kB oom_score_adj:0").unwrap();
        assert_eq!(
            v,
            OomVictim {
                pid: 1234,
                comm: "qemu-nbd".into()
            }
        );
        let v =
            parse_oom_kill("Memory cgroup out of memory: Killed process 9 (a (b)) total-vm:1kB")
                .unwrap();
        assert_eq!(v.comm, "a (b)");
        assert_eq!(
            parse_oom_kill("Killed process 77 (java) total-vm:1kB")
                .unwrap()
                .pid,
            77
        );
        assert!(
            parse_oom_kill("Out of memory: Kill process 1 (x) score 9 or sacrifice child")
                .is_none()
        );
        assert_eq!(
            parse_oom_kill("Killed process 5 (tidb-server), UID 1000, total-vm:33kB").unwrap(),
            OomVictim {
                pid: 5,
                comm: "tidb-server".into()
            }
        );
        assert_eq!(
            parse_oom_kill("Killed process 7, UID 503, (redis-server) total-vm:9kB").unwrap(),
            OomVictim {
                pid: 7,
                comm: "redis-server".into()
            }
        );
        assert_eq!(
            parse_oom_choice("Out of memory: Kill process 1 (a) b) score 9 or sacrifice child"),
            Some(OomVictim {
                pid: 1,
                comm: "a) b".into()
            })
        );
        assert!(
            parse_oom_choice("Memory cgroup out of memory: Kill process 2 (x) score 0 or a child")
                .is_some()
        );
        assert!(parse_oom_choice("Kill process 1 (x) score 9 or sacrifice child").is_none());
        assert!(parse_oom_choice("Out of memory: Kill process 1 (x) score 9").is_none());
        assert!(parse_oom_kill("someone said Killed process 1 (x)").is_none());
        assert_eq!(
            parse_oom_invoker("qemu-nbd invoked oom-killer: gfp_mask=0x0"),
            Some("qemu-nbd")
        );
    }

    #[test]
    fn oopses() {
        assert!(is_oops_header(
            "BUG: kernel NULL pointer dereference, address: 0000000000000000"
        ));
        assert!(is_oops_header(
            "general protection fault, probably for non-canonical address 0xdead000000000100: 0000 [#1] SMP NOPTI"
        ));
        assert!(!is_oops_header(
            "traps: crashy[1] general protection fault ip:1 sp:2 error:0"
        ));
        assert_eq!(
            parse_oops_task("CPU: 1 PID: 4242 Comm: insmod Tainted: G           O      6.1.0 #1"),
            Some((1, 4242, "insmod".to_owned()))
        );
        assert_eq!(
            parse_oops_location("RIP: 0010:nbd_queue_rq+0x12/0x340 [nbd]"),
            Some("nbd_queue_rq+0x12/0x340 [nbd]")
        );
        assert_eq!(
            parse_oops_location("RIP: 0033:0x7f00"),
            None,
            "a user RIP is not a kernel location"
        );
    }

    #[test]
    fn crash_suppression_notices() {
        assert_eq!(
            parse_crash_suppression("show_signal_msg: 990 callbacks suppressed"),
            Some(990)
        );
        assert_eq!(
            parse_crash_suppression("show_signal: 10 callbacks suppressed"),
            Some(10)
        );
        assert_eq!(
            parse_crash_suppression("net_ratelimit: 5 callbacks suppressed"),
            None
        );
    }
}
