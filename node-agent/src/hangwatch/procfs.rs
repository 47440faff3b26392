//! Parsing `/proc/PID/task/TID/{stat,sched,status}` (pure).

/// What one task's `stat` says that the watcher needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStat {
    /// The task name (between the first `(` and the last `)`: it may contain both).
    pub comm: String,
    /// The one-letter state (`R`, `S`, `D`, `T`, `Z`, …).
    pub state: char,
    /// The CPU it last ran on (field 39).
    pub cpu: Option<usize>,
}

/// Parses `/proc/PID/task/TID/stat`.
pub fn parse_stat(text: &str) -> Option<TaskStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut fields = text.get(close + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4 to 38 come between the state (3) and the processor (39).
    let cpu = fields.nth(35).and_then(|f| f.parse().ok());
    Some(TaskStat { comm, state, cpu })
}

/// The time the task last ran, in microseconds on the scheduler's task clock (`se.exec_start`
/// in `/proc/PID/task/TID/sched`, printed in milliseconds); available with `CONFIG_SCHED_DEBUG`.
pub fn parse_last_ran_usec(sched: &str) -> Option<u64> {
    let line = sched.lines().find(|l| l.starts_with("se.exec_start"))?;
    let millis: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    (millis.is_finite() && millis >= 0.0).then_some((millis * 1000.0) as u64)
}

/// The total context switches from `/proc/PID/task/TID/status`: when it changes, the task ran.
pub fn parse_context_switches(status: &str) -> Option<u64> {
    let mut total = None;
    for line in status.lines() {
        for key in ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"] {
            if let Some(value) = line.strip_prefix(key) {
                total = Some(total.unwrap_or(0) + value.trim().parse::<u64>().ok()?);
            }
        }
    }
    total
}

/// The frames of `/proc/PID/task/TID/stack` (`[<0>] folio_wait_bit+0xd6/0x220`).
pub fn parse_stack(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_once("] ").map(|(_, frame)| frame.trim().to_owned()))
        .filter(|f| !f.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_comm() {
        let s = parse_stat("22229 (qemu-nbd) D 1 22182 2651 0 -1 4194304 158 0 0 0").unwrap();
        assert_eq!(
            s,
            TaskStat {
                cpu: None,
                comm: "qemu-nbd".into(),
                state: 'D'
            }
        );
        let s = parse_stat("7 (a) b (c)) S 1 2").unwrap();
        assert_eq!(s.cpu, None, "a short line has no processor field");
        assert_eq!((s.comm.as_str(), s.state), ("a) b (c)", 'S'));
        assert!(parse_stat("garbage").is_none());
        // A real line of this machine's (cat, last run on CPU 1).
        let real = "12227 (cat) R 12225 12225 1464 0 -1 4194304 124 0 0 0 0 0 0 0 20 0 1 0 663156 \
                    3133440 387 18446744073709551615 94169311723520 94169311743401 140736521035616 \
                    0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94169311759408";
        assert_eq!(parse_stat(real).unwrap().cpu, Some(1));
    }

    #[test]
    fn sched_status_and_stack() {
        assert_eq!(
            parse_last_ran_usec(
                "head (2647, #threads: 1)\n---\nse.exec_start                                :        161654.834316\n"
            ),
            Some(161_654_834)
        );
        assert_eq!(
            parse_context_switches(
                "State:\tD (disk sleep)\nvoluntary_ctxt_switches:\t1\nnonvoluntary_ctxt_switches:\t2\n"
            ),
            Some(3)
        );
        assert_eq!(parse_context_switches("State: D"), None);
        assert_eq!(
            parse_stack("[<0>] folio_wait_bit+0xd6/0x220\n[<0>] folio_wait_writeback+0x2a/0x90\n"),
            [
                "folio_wait_bit+0xd6/0x220",
                "folio_wait_writeback+0x2a/0x90"
            ]
        );
    }
}
