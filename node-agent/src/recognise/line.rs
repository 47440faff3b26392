//! One kernel log line, from a `/dev/kmsg` record or from pasted text in any common format.

use crate::kmsg::{KmsgRecord, Level, parse_record};

/// A kernel message with whatever metadata its source carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The kernel's message text, all prefixes removed.
    pub message: String,
    /// Whether the line is known to come from user space rather than the kernel
    /// (a kmsg facility other than 0, or a syslog tag other than `kernel`).
    pub from_user_space: bool,
    /// The syslog level, when the source carried it.
    pub level: Option<Level>,
    /// The kmsg sequence number, for records read from `/dev/kmsg`.
    pub seq: Option<u64>,
    /// Microseconds since boot, when the source carried it (kmsg, dmesg).
    pub monotonic_usec: Option<u64>,
    /// The line exactly as it was read, when that is more than `message` (pasted text with
    /// its prefixes); None when the message is the whole line, as for a kmsg record, so that
    /// the message is not copied. [`LogLine::raw_text`] reads either.
    pub raw: Option<String>,
}

impl LogLine {
    /// A line from a parsed `/dev/kmsg` record.
    pub fn from_record(record: &KmsgRecord) -> Self {
        LogLine {
            message: record.message.clone(),
            from_user_space: !record.is_from_kernel(),
            level: Some(record.level),
            seq: Some(record.seq),
            monotonic_usec: Some(record.timestamp_usec),
            raw: None,
        }
    }

    /// A line from a parsed `/dev/kmsg` record, taking its message rather than copying it.
    pub fn from_owned_record(record: KmsgRecord) -> Self {
        LogLine {
            from_user_space: !record.is_from_kernel(),
            level: Some(record.level),
            seq: Some(record.seq),
            monotonic_usec: Some(record.timestamp_usec),
            raw: None,
            message: record.message,
        }
    }

    /// The line exactly as it was read (for kmsg, the message alone).
    pub fn raw_text(&self) -> &str {
        self.raw.as_deref().unwrap_or(&self.message)
    }

    /// The line exactly as it was read, taken out of the line.
    pub(crate) fn take_raw_text(&mut self) -> String {
        self.raw
            .take()
            .unwrap_or_else(|| std::mem::take(&mut self.message))
    }

    /// A bare message with no metadata.
    pub fn bare(message: &str) -> Self {
        LogLine {
            message: message.to_owned(),
            from_user_space: false,
            level: None,
            seq: None,
            monotonic_usec: None,
            raw: None,
        }
    }

    /// Parses one line of pasted text: raw kmsg (`6,346,605503265,-;…`), `<6>…`, `dmesg`
    /// (`[  605.503265] …`), `dmesg -T` (`[Tue Nov 24 20:50:35 2026] …`), `dmesg -x`
    /// (`kern  :info  : …`), syslog or `journalctl` (`Nov 24 20:50:35 host kernel: …`),
    /// ISO timestamps (`2026-11-24T20:50:35.1+00:00 host kernel: …`), or a bare message.
    pub fn parse_text(text: &str) -> Self {
        let text = text.trim_end_matches(['\r', '\n']);
        // Lines quoted in a mail or a Markdown block (`> `, `>> `) from the first column.
        let text = if text.starts_with('>') {
            text.trim_start_matches(['>', ' '])
        } else {
            text
        };
        if let Some(rest) = strip_grep_prefix(text) {
            let mut line = LogLine::parse_text(rest);
            line.raw = Some(text.to_owned());
            return line;
        }
        if looks_like_kmsg_header(text)
            && let Ok(record) = parse_record(text.as_bytes())
        {
            let mut line = LogLine::from_record(&record);
            line.raw = Some(text.to_owned());
            return line;
        }
        let mut line = LogLine::bare(text);
        let mut rest = text;
        if let Some((after, from_kernel)) = strip_syslog_header(rest) {
            rest = after;
            line.from_user_space = from_kernel == Some(false);
        }
        if let Some((after, level)) = strip_dmesg_decode(rest) {
            rest = after;
            line.level = Some(level);
        }
        if let Some((after, level)) = strip_angle_level(rest) {
            rest = after;
            line.level = Some(level);
        }
        if let Some((after, usec)) = strip_bracket_timestamp(rest) {
            rest = strip_caller_id(after);
            line.monotonic_usec = usec;
            // journalctl -o short-monotonic: "[  605.503265] host kernel: message"
            if let Some((after, true)) = strip_host_tag(rest) {
                rest = after;
            }
        }
        // printk's caller id with no timestamp before it: `[  T817] INFO: task …`.
        rest = strip_caller_id(rest);
        // `rest` ends where `text` does: it is all of it when no prefix was removed.
        if rest.len() != text.len() {
            line.raw = Some(text.to_owned());
        }
        line.message = rest.to_owned();
        line
    }
}

fn looks_like_kmsg_header(text: &str) -> bool {
    let Some((header, _)) = text.split_once(';') else {
        return false;
    };
    let mut fields = header.split(',');
    let numeric =
        |f: Option<&str>| f.is_some_and(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    numeric(fields.next()) && numeric(fields.next()) && numeric(fields.next())
}

/// `Nov 24 20:50:35 host TAG: ` (any month names, optional fractional seconds) or
/// `2026-11-24T20:50:35… host TAG: `; returns the rest and, when a tag was present, whether it
/// is the kernel.
fn strip_syslog_header(text: &str) -> Option<(&str, Option<bool>)> {
    if let Some(rest) = strip_logread_header(text) {
        return Some(match strip_host_tag_less(rest) {
            Some((rest, from_kernel)) => (rest, Some(from_kernel)),
            None => (rest, None),
        });
    }
    let (first, rest) = text.split_once(' ')?;
    let after_time = if is_month_name(first) {
        let rest = rest.trim_start_matches(' ');
        let (day, rest) = rest.split_once(' ')?;
        let (clock, rest) = rest.split_once(' ')?;
        let day_ok = (1..=2).contains(&day.len()) && day.bytes().all(|b| b.is_ascii_digit());
        (day_ok && is_clock(clock)).then_some(rest)?
    } else {
        let bytes = first.as_bytes();
        let iso = bytes.len() >= 19
            && bytes[..4].iter().all(u8::is_ascii_digit)
            && bytes[4] == b'-'
            && bytes[7] == b'-'
            && bytes[10] == b'T'
            && first.get(11..19).is_some_and(is_clock);
        iso.then_some(rest)?
    };
    let after_time = after_time.trim_start_matches(' ');
    if after_time.starts_with('[') {
        return Some((after_time, None)); // a dmesg timestamp follows, no host or tag
    }
    if let Some(rest) = after_time.strip_prefix("kernel: ") {
        return Some((rest, Some(true))); // a tag and no host
    }
    // A remote syslog server writes the sender's address and, for kernel lines relayed by
    // netconsole, no tag: `10.20.22.1 [139221.203949][  T817] INFO: task …`.
    if let Some((host, rest)) = after_time.split_once(' ')
        && is_address(host)
        && (rest.starts_with('[') || !has_program_tag(rest))
    {
        return Some((rest, None));
    }
    Some(match strip_host_tag(after_time) {
        Some((rest, from_kernel)) => (rest, Some(from_kernel)),
        None => (after_time, None),
    })
}

/// OpenWrt's `logread`: `Sat Apr 26 10:18:56 2025 kern.info ` (weekday, month, day, clock,
/// year, facility.level); returns what follows.
fn strip_logread_header(text: &str) -> Option<&str> {
    let mut words = text.splitn(6, ' ').filter(|w| !w.is_empty());
    let weekday = words.next()?;
    let month = words.next()?;
    (is_month_name(weekday) && is_month_name(month)).then_some(())?;
    let rest = text[weekday.len()..].trim_start();
    let rest = rest[month.len()..].trim_start();
    let (day, rest) = rest.split_once(' ')?;
    let (clock, rest) = rest.split_once(' ')?;
    let (year, rest) = rest.split_once(' ')?;
    let (facility, rest) = rest.split_once(' ')?;
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ok = numeric(day)
        && is_clock(clock)
        && year.len() == 4
        && numeric(year)
        && facility.split_once('.').is_some_and(|(f, l)| {
            f.bytes().all(|b| b.is_ascii_lowercase()) && l.bytes().all(|b| b.is_ascii_lowercase())
        });
    ok.then_some(rest)
}

/// `TAG: ` with no host before it (OpenWrt's `logread`); whether TAG is `kernel`.
fn strip_host_tag_less(text: &str) -> Option<(&str, bool)> {
    let (tag, rest) = text.split_once(": ")?;
    (!tag.is_empty() && !tag.contains(' ')).then_some((rest, tag == "kernel"))
}

/// A prefix `grep` adds (`kern.log:`, `1412:`, `kern.log:1412:`) in front of a syslog, dmesg
/// or kmsg line; returns the line without it.
fn strip_grep_prefix(text: &str) -> Option<&str> {
    let (file, rest) = text.split_once(':')?;
    if file.is_empty() || file.contains([' ', '[', '<']) {
        return None;
    }
    let rest = match rest.split_once(':') {
        Some((number, after))
            if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) =>
        {
            after
        }
        _ => rest,
    };
    let known = strip_syslog_header(rest).is_some()
        || strip_bracket_timestamp(rest).is_some_and(|(_, usec)| usec.is_some())
        || looks_like_kmsg_header(rest);
    known.then_some(rest)
}

/// An IPv4 or IPv6 address, as remote syslog servers write the sending host.
fn is_address(host: &str) -> bool {
    let v4 = host.split('.').count() == 4
        && host
            .split('.')
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    let v6 = host.contains(':') && host.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
    v4 || v6
}

/// Whether a line starts with a program's syslog tag (`sshd[12]: `, `kernel: `) rather than
/// with a kernel message's own prefix (`INFO: task`, `BUG: `, `traps: `).
fn has_program_tag(text: &str) -> bool {
    let Some((tag, _)) = text.split_once(": ") else {
        return false;
    };
    let name = tag.split('[').next().unwrap_or(tag);
    !tag.contains(' ') && name != "traps" && name.starts_with(|c: char| c.is_ascii_lowercase())
}

/// A month name or abbreviation in any language (`Nov`, `vas.`, `may`).
fn is_month_name(word: &str) -> bool {
    let word = word.strip_suffix('.').unwrap_or(word);
    (2..=5).contains(&word.chars().count()) && word.chars().all(char::is_alphabetic)
}

/// `host TAG: ` where TAG may carry `[pid]`; returns the rest and whether TAG is `kernel`.
fn strip_host_tag(text: &str) -> Option<(&str, bool)> {
    let (host, rest) = text.split_once(' ')?;
    if host.is_empty() || host.contains(':') {
        return None;
    }
    let (tag, rest) = rest
        .split_once(": ")
        .or_else(|| rest.strip_suffix(':').map(|t| (t, "")))?;
    if tag.is_empty() || tag.contains(' ') {
        return None;
    }
    Some((rest, tag == "kernel"))
}

/// `HH:MM:SS`, optionally followed by `.fraction`.
fn is_clock(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() >= 8
        && b[2] == b':'
        && b[5] == b':'
        && [0, 1, 3, 4, 6, 7].iter().all(|&i| b[i].is_ascii_digit())
        && (b.len() == 8 || b[8] == b'.' && b[9..].iter().all(u8::is_ascii_digit))
}

/// printk's caller id after the timestamp: `[   T44] ` (task) or `[    C1] ` (CPU).
fn strip_caller_id(text: &str) -> &str {
    let Some(inner_and_rest) = text.strip_prefix('[') else {
        return text;
    };
    let Some((inner, rest)) = inner_and_rest.split_once(']') else {
        return text;
    };
    let id = inner.trim_start();
    let is_id = id.len() >= 2
        && matches!(id.as_bytes()[0], b'T' | b'C')
        && id[1..].bytes().all(|b| b.is_ascii_digit());
    if is_id {
        rest.strip_prefix(' ').unwrap_or(rest)
    } else {
        text
    }
}

/// `dmesg -x`: `kern  :info  : `.
fn strip_dmesg_decode(text: &str) -> Option<(&str, Level)> {
    let (facility, rest) = text.split_once(':')?;
    if facility.trim_end() != "kern" {
        return None;
    }
    let (level, rest) = rest.split_once(':')?;
    let level = match level.trim() {
        "emerg" => Level::Emerg,
        "alert" => Level::Alert,
        "crit" => Level::Crit,
        "err" => Level::Err,
        "warn" => Level::Warning,
        "notice" => Level::Notice,
        "info" => Level::Info,
        "debug" => Level::Debug,
        _ => return None,
    };
    Some((rest.strip_prefix(' ').unwrap_or(rest), level))
}

/// `<6>message` as printk and `/dev/kmsg` writers use it.
fn strip_angle_level(text: &str) -> Option<(&str, Level)> {
    let rest = text.strip_prefix('<')?;
    let (digits, rest) = rest.split_once('>')?;
    let priority: u32 = digits.parse().ok().filter(|_| digits.len() <= 3)?;
    Some((rest, Level::from_priority(priority)))
}

/// `[  605.503265] ` (dmesg) or `[Tue Nov 24 20:50:35 2026] ` (dmesg -T).
fn strip_bracket_timestamp(text: &str) -> Option<(&str, Option<u64>)> {
    // A paste that lost the opening bracket: `22734.139015] INFO: …`.
    let inner_and_rest = text.strip_prefix('[').or_else(|| {
        let first = text.bytes().next()?;
        let close = text.find("] ")?;
        (first.is_ascii_digit() && text[..close].contains('.')).then_some(text)
    })?;
    let (inner, rest) = inner_and_rest.split_once(']')?;
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let inner = inner.trim();
    if let Some((secs, frac)) = inner.split_once('.')
        && !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && frac.len() <= 9
        && frac.bytes().all(|b| b.is_ascii_digit())
    {
        let secs: u64 = secs.parse().ok()?;
        let micros: u64 = format!("{frac:0<6}")[..6].parse().ok()?;
        return Some((
            rest,
            Some(secs.saturating_mul(1_000_000).saturating_add(micros)),
        ));
    }
    // dmesg -T in any locale: "Tue Nov 24 20:50:35 2026", "lun may  5 18:11:41 2025"
    let words: Vec<&str> = inner.split_whitespace().collect();
    let human = words.len() == 5
        && is_clock(words[3])
        && words[4].len() == 4
        && words[4].bytes().all(|b| b.is_ascii_digit());
    human.then_some((rest, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &str = "qemu-nbd[13647]: segfault at 100 ip 0000561c8817d1c7 sp 00007fc8f1ce9c00 error 4 in qemu-nbd[561c88107000+155000]";

    /// Found by `cargo fuzz` (kmsg_records): a multi-byte character where an ISO timestamp's
    /// clock should end made the header check slice inside the character and panic.
    #[test]
    fn fuzz_regression_a_timestamp_cut_by_a_multibyte_character_is_plain_text() {
        let bytes =
            b"2023-01-28T13:02:1\xe66.434346+01:00   [  ( 6.159403] #PF: supervisor read access";
        let text = String::from_utf8_lossy(bytes);
        let line = LogLine::parse_text(&text);
        assert_eq!(
            line.message, text,
            "not a syslog header: the whole line is the message"
        );
    }

    #[test]
    fn every_format_yields_the_same_message() {
        let cases = [
            (MSG.to_owned(), None, None),
            (
                format!("6,346,605503265,-;{MSG}"),
                Some(Level::Info),
                Some(605_503_265),
            ),
            (format!("<6>{MSG}"), Some(Level::Info), None),
            (format!("[  605.503265] {MSG}"), None, Some(605_503_265)),
            (format!("[Tue Nov 24 20:50:35 2026] {MSG}"), None, None),
            (
                format!("kern  :info  : [  605.503265] {MSG}"),
                Some(Level::Info),
                Some(605_503_265),
            ),
            (format!("Nov 24 20:50:35 node-7 kernel: {MSG}"), None, None),
            (
                format!("Nov  4 20:50:35 node-7 kernel: [  605.503265] {MSG}"),
                None,
                Some(605_503_265),
            ),
            (
                format!("2026-11-24T20:50:35.123456+00:00 node-7 kernel: {MSG}"),
                None,
                None,
            ),
            (
                format!("2026-11-24T20:50:35+0000 node-7 kernel: {MSG}"),
                None,
                None,
            ),
            (
                format!("[  605.503265] node-7 kernel: {MSG}"),
                None,
                Some(605_503_265),
            ),
            (format!("May 17 18:48:11 kernel: {MSG}"), None, None),
            (
                format!("Aug 30 05:34:55 10.20.22.1 [139221.203949][  T817] {MSG}"),
                None,
                Some(139_221_203_949),
            ),
            (format!("[  T817] {MSG}"), None, None),
            (
                format!("Sat Apr 26 10:18:56 2025 kern.info kernel: [ 5479.109560] {MSG}"),
                None,
                Some(5_479_109_560),
            ),
            (
                format!("messages-20150510:May  9 23:40:38 localhost kernel: {MSG}"),
                None,
                None,
            ),
            (
                format!("kern.log:1412:[  605.503265] {MSG}"),
                None,
                Some(605_503_265),
            ),
        ];
        for (text, level, usec) in cases {
            let line = LogLine::parse_text(&text);
            assert_eq!(line.message, MSG, "from {text:?}");
            assert_eq!(line.level, level, "level from {text:?}");
            assert_eq!(line.monotonic_usec, usec, "timestamp from {text:?}");
            assert!(!line.from_user_space, "{text:?}");
            assert_eq!(line.raw_text(), text);
        }
    }

    #[test]
    fn an_owned_record_makes_the_same_line_as_a_borrowed_one() {
        for raw in [
            format!("6,346,605503265,-;{MSG}\n"),
            "14,1,2,c;user\\x20space\n SUBSYSTEM=block\n".to_owned(),
        ] {
            let record = parse_record(raw.as_bytes()).unwrap();
            assert_eq!(
                LogLine::from_owned_record(record.clone()),
                LogLine::from_record(&record)
            );
        }
    }

    #[test]
    fn a_remote_syslog_line_with_no_tag_is_the_kernel_s() {
        let line = LogLine::parse_text(
            "Aug 30 05:34:55 10.20.22.1 INFO: task pppd:6009 blocked for more than 122 seconds.",
        );
        assert_eq!(
            line.message,
            "INFO: task pppd:6009 blocked for more than 122 seconds."
        );
        assert!(!line.from_user_space);
    }

    #[test]
    fn user_space_sources_are_marked() {
        let line = LogLine::parse_text(&format!("14,8265,1,-;{MSG}"));
        assert!(line.from_user_space);
        let line = LogLine::parse_text(&format!("Nov 24 20:50:35 node-7 evil[99]: {MSG}"));
        assert!(line.from_user_space);
        assert_eq!(line.message, MSG);
        let line = LogLine::parse_text(&format!("Nov 24 20:50:35 10.0.0.9 evil[99]: {MSG}"));
        assert!(
            line.from_user_space,
            "a remote program's tag still marks it"
        );
    }

    #[test]
    fn a_message_that_merely_looks_like_a_prefix_is_left_alone() {
        for text in [
            "[9]: segfault at 100",
            "<not a level> x",
            "kern: y",
            "1,2;x",
        ] {
            assert_eq!(LogLine::parse_text(text).message, text);
        }
    }
}
