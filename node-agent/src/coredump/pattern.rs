//! `kernel.core_pattern`: the pattern crashwatch installs, and the expansion of the pattern it
//! replaced, so that every dump still reaches the previous handler (systemd-coredump, apport,
//! a file) as the kernel would have delivered it. Pure string work.

use serde::{Deserialize, Serialize};

/// The kernel's limit on `core_pattern` (`CORENAME_MAX_SIZE` is 128, with the NUL).
pub const MAX_PATTERN_LEN: usize = 127;

/// The specifiers crashwatch's pattern passes to the handler, in this order: everything a
/// previous handler's pattern may use that `/proc` cannot tell after the fact. `%e` is last
/// because a task name may hold spaces.
pub const HANDLER_ARGS: &str = "%P %I %p %i %s %t %c %d %u %g %h %e";

/// The `core_pattern` that pipes dumps into `binary` (its path on the host).
pub fn handler_pattern(binary: &str) -> Result<String, String> {
    let pattern = format!("|{binary} coredump {HANDLER_ARGS}");
    if binary.contains(char::is_whitespace) {
        return Err(format!("the handler's path {binary:?} holds whitespace"));
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "the core_pattern {pattern:?} is {} bytes, over the kernel's {MAX_PATTERN_LEN}: use a shorter state dir",
            pattern.len()
        ));
    }
    Ok(pattern)
}

/// Whether `pattern` is one crashwatch installed (for any path of its handler).
pub fn is_ours(pattern: &str) -> bool {
    pattern
        .trim_end()
        .strip_prefix('|')
        .and_then(|rest| rest.split_whitespace().nth(1))
        == Some("coredump")
        && pattern.trim_end().ends_with(HANDLER_ARGS)
}

/// What the kernel's settings were before crashwatch installed its handler.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Previous {
    /// `kernel.core_pattern`.
    pub pattern: String,
    /// `kernel.core_pipe_limit`.
    pub pipe_limit: u32,
}

/// The values of a dump's `%` specifiers, as the kernel gave them to crashwatch's handler.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Specifiers {
    /// `%P`: the pid in the initial pid namespace.
    pub global_pid: String,
    /// `%I`: the tid in the initial pid namespace.
    pub global_tid: String,
    /// `%p`: the pid in the process's own pid namespace.
    pub pid: String,
    /// `%i`: the tid in the process's own pid namespace.
    pub tid: String,
    /// `%s`: the signal.
    pub signal: String,
    /// `%t`: the time of the dump, in seconds since the epoch.
    pub time: String,
    /// `%c`: the soft `RLIMIT_CORE`.
    pub core_limit: String,
    /// `%d`: the dump mode (`suid_dumpable`'s value for this process).
    pub dump_mode: String,
    /// `%u`: the real uid.
    pub uid: String,
    /// `%g`: the real gid.
    pub gid: String,
    /// `%h`: the hostname of the process's UTS namespace.
    pub hostname: String,
    /// `%e`: the task name.
    pub comm: String,
    /// `%E`: the executable's path with `/` as `!`.
    pub exe_path: String,
    /// `%f`: the executable's file name.
    pub exe_name: String,
}

impl Specifiers {
    /// The values from the handler's arguments, in [`HANDLER_ARGS`] order; the task name
    /// is what remains, joined by spaces.
    pub fn from_args(args: &[String]) -> Result<Specifiers, String> {
        if args.len() < 12 {
            return Err(format!(
                "the handler takes 12 arguments ({HANDLER_ARGS}), got {}",
                args.len()
            ));
        }
        let a = |i: usize| args[i].clone();
        Ok(Specifiers {
            global_pid: a(0),
            global_tid: a(1),
            pid: a(2),
            tid: a(3),
            signal: a(4),
            time: a(5),
            core_limit: a(6),
            dump_mode: a(7),
            uid: a(8),
            gid: a(9),
            hostname: a(10),
            comm: args[11..].join(" "),
            exe_path: String::new(),
            exe_name: String::new(),
        })
    }

    fn value(&self, specifier: char) -> Option<&str> {
        Some(match specifier {
            'P' => &self.global_pid,
            'I' => &self.global_tid,
            'p' => &self.pid,
            'i' => &self.tid,
            's' => &self.signal,
            't' => &self.time,
            'c' => &self.core_limit,
            'd' => &self.dump_mode,
            'u' => &self.uid,
            'g' => &self.gid,
            'h' => &self.hostname,
            'e' => &self.comm,
            'E' => &self.exe_path,
            'f' => &self.exe_name,
            '%' => "%",
            _ => return None,
        })
    }

    /// `template` with its specifiers replaced, as the kernel's `format_corename` does:
    /// unknown specifiers give nothing, and so does a lone trailing `%`.
    pub fn expand(&self, template: &str) -> String {
        let mut out = String::new();
        let mut chars = template.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            if let Some(value) = chars.next().and_then(|s| self.value(s)) {
                out.push_str(value);
            }
        }
        out
    }
}

/// Where the kernel would have sent a dump under the previous pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Nothing: an empty pattern, or crashwatch's own (never chain to ourselves).
    Nowhere,
    /// A pipe to a program: its argv.
    Pipe(Vec<String>),
    /// A file, relative to the crashed process's working directory unless absolute.
    File(String),
}

/// The destination of `previous` for a dump with `specifiers`; `uses_pid` is
/// `kernel.core_uses_pid`.
pub fn destination(previous: &str, specifiers: &Specifiers, uses_pid: bool) -> Destination {
    let previous = previous.trim_end_matches('\n');
    if previous.is_empty() || is_ours(previous) {
        return Destination::Nowhere;
    }
    if let Some(command) = previous.strip_prefix('|') {
        // Since Linux 5.3 the command is split at spaces first, then each word expanded.
        let argv: Vec<String> = command
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(|w| specifiers.expand(w))
            .collect();
        return if argv.is_empty() {
            Destination::Nowhere
        } else {
            Destination::Pipe(argv)
        };
    }
    let mut path = specifiers.expand(previous);
    if uses_pid && !previous.contains("%p") {
        path.push('.');
        path.push_str(&specifiers.pid);
    }
    Destination::File(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specifiers() -> Specifiers {
        let args: Vec<String> = "4242 4243 7 8 11 1700000000 0 1 1000 1000 checkout-7d9f my crashy"
            .split(' ')
            .map(str::to_owned)
            .collect();
        let mut s = Specifiers::from_args(&args).unwrap();
        s.exe_path = "!usr!bin!crashy".into();
        s.exe_name = "crashy".into();
        s
    }

    #[test]
    fn systemd_coredumps_pattern_is_expanded_word_by_word() {
        // Debian 12's systemd-coredump pattern (50-coredump.conf).
        let previous = "|/lib/systemd/systemd-coredump %P %u %g %s %t %c %h";
        assert_eq!(
            destination(previous, &specifiers(), false),
            Destination::Pipe(
                "/lib/systemd/systemd-coredump 4242 1000 1000 11 1700000000 0 checkout-7d9f"
                    .split(' ')
                    .map(str::to_owned)
                    .collect()
            )
        );
        // apport's, whose %E and %F this handler has (%F, a pidfd, it cannot pass on).
        let apport = "|/usr/share/apport/apport -p%p -s%s -c%c -d%d -P%P -u%u -g%g -F%F -- %E";
        let Destination::Pipe(argv) = destination(apport, &specifiers(), false) else {
            panic!("a pipe");
        };
        assert_eq!(argv[1], "-p7");
        assert_eq!(argv[8], "-F");
        assert_eq!(argv[10], "!usr!bin!crashy");
    }

    #[test]
    fn a_task_name_with_spaces_stays_one_argument() {
        assert_eq!(specifiers().comm, "my crashy");
        assert_eq!(
            destination("|/bin/save %e", &specifiers(), false),
            Destination::Pipe(vec!["/bin/save".into(), "my crashy".into()])
        );
    }

    #[test]
    fn file_patterns_follow_core_uses_pid() {
        let s = specifiers();
        assert_eq!(
            destination("core", &s, false),
            Destination::File("core".into())
        );
        assert_eq!(
            destination("core", &s, true),
            Destination::File("core.7".into())
        );
        assert_eq!(
            destination("/var/crash/core.%e.%p.%%", &s, true),
            Destination::File("/var/crash/core.my crashy.7.%".into())
        );
        assert_eq!(destination("", &s, true), Destination::Nowhere);
    }

    #[test]
    fn our_pattern_fits_the_kernel_and_is_never_chained_to() {
        let ours = handler_pattern("/var/lib/crashwatch/bin/crashwatch-agent").unwrap();
        assert!(ours.len() <= MAX_PATTERN_LEN, "{ours}");
        assert!(is_ours(&ours));
        assert!(is_ours(&format!("{ours}\n")));
        assert!(!is_ours(
            "|/lib/systemd/systemd-coredump %P %u %g %s %t %c %h"
        ));
        assert_eq!(
            destination(&ours, &specifiers(), false),
            Destination::Nowhere
        );
        assert!(handler_pattern(&format!("/{}", "x".repeat(100))).is_err());
        assert!(handler_pattern("/with space/agent").is_err());
    }
}
