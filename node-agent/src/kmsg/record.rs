//! Parsing one `/dev/kmsg` record (pure; see the kernel's `Documentation/ABI/testing/dev-kmsg`).
//!
//! A record is `PRI,SEQ,USEC,FLAG[,…];MESSAGE\n`, followed by zero or more dictionary lines
//! ` KEY=VALUE\n`. Non-printable bytes in the message and the dictionary are escaped as `\xNN`.

use thiserror::Error;

/// The facility the kernel uses for its own messages; everything else was written by user space.
pub const KERNEL_FACILITY: u8 = 0;

/// One decoded `/dev/kmsg` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsgRecord {
    /// The syslog facility (`PRI >> 3`); 0 for the kernel, 1 or more for lines user space wrote.
    pub facility: u8,
    /// The syslog level (`PRI & 7`).
    pub level: Level,
    /// The record's sequence number, gap-free per boot unless records were overwritten.
    pub seq: u64,
    /// Microseconds since boot (the kernel's `local_clock`).
    pub timestamp_usec: u64,
    /// Whether this record continues the previous one (`c` flag, old kernels only).
    pub continuation: bool,
    /// The message with `\xNN` escapes undone.
    pub message: String,
    /// `KEY=VALUE` dictionary entries (for example `SUBSYSTEM=block`, `DEVICE=b43:0`).
    pub dictionary: Vec<(String, String)>,
}

impl KmsgRecord {
    /// Whether the kernel itself wrote this record (only these are trusted).
    pub fn is_from_kernel(&self) -> bool {
        self.facility == KERNEL_FACILITY
    }
}

/// The eight syslog severities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// 0: system is unusable.
    Emerg,
    /// 1: action must be taken immediately.
    Alert,
    /// 2: critical conditions.
    Crit,
    /// 3: error conditions.
    Err,
    /// 4: warning conditions.
    Warning,
    /// 5: normal but significant condition.
    Notice,
    /// 6: informational.
    Info,
    /// 7: debug-level messages.
    Debug,
}

impl Level {
    /// The level encoded in the low three bits of a syslog priority.
    pub fn from_priority(priority: u32) -> Level {
        match priority & 7 {
            0 => Level::Emerg,
            1 => Level::Alert,
            2 => Level::Crit,
            3 => Level::Err,
            4 => Level::Warning,
            5 => Level::Notice,
            6 => Level::Info,
            _ => Level::Debug,
        }
    }
}

/// Why a record could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    /// The header has no `;` separating it from the message.
    #[error("kmsg record has no ';' after its header")]
    MissingSeparator,
    /// A header field is missing or not a decimal number.
    #[error("kmsg record header field {field} is missing or not a number: {text:?}")]
    BadHeaderField {
        /// Which field: `priority`, `sequence` or `timestamp`.
        field: &'static str,
        /// The offending text.
        text: String,
    },
}

/// Parses one record exactly as one `read(2)` of `/dev/kmsg` returns it.
pub fn parse_record(bytes: &[u8]) -> Result<KmsgRecord, RecordError> {
    let separator = memchr::memchr(b';', bytes).ok_or(RecordError::MissingSeparator)?;
    let (priority, seq, timestamp_usec, continuation) = match plain_header(&bytes[..separator]) {
        Some(header) => header,
        None => checked_header(&bytes[..separator])?,
    };

    let body = &bytes[separator + 1..];
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    // The message is the first line; dictionary entries (` KEY=value`) follow it.
    let (first, entries) = match memchr::memchr(b'\n', body) {
        Some(end) => (&body[..end], Some(&body[end + 1..])),
        None => (body, None),
    };
    let message = unescape(first);
    let dictionary = match entries {
        // Most records have none: no iterator to build.
        None => Vec::new(),
        Some(entries) => entries
            .split(|&b| b == b'\n')
            .filter_map(|line| line.strip_prefix(b" "))
            .filter_map(|entry| {
                let entry = unescape(entry);
                let (key, value) = entry.split_once('=')?;
                Some((key.to_owned(), value.to_owned()))
            })
            .collect(),
    };

    Ok(KmsgRecord {
        facility: (priority >> 3).min(u32::from(u8::MAX)) as u8,
        level: Level::from_priority(priority),
        seq,
        timestamp_usec,
        continuation,
        message,
        dictionary,
    })
}

/// The header fields `PRIORITY,SEQ,USEC,FLAGS…` when the first three are plain decimal digits
/// (what the kernel writes), read without building strings; None for anything else, which
/// [`checked_header`] then reads or rejects with its error.
fn plain_header(header: &[u8]) -> Option<(u32, u64, u64, bool)> {
    // A field of 1 to 19 digits from `from` (19 digits cannot overflow a u64; longer fields
    // take the checked path), and where it ends: at a comma or at the end of the header.
    let number = |from: usize| -> Option<(u64, usize)> {
        let mut value = 0u64;
        let mut at = from;
        while let Some(&b) = header.get(at) {
            if b == b',' {
                break;
            }
            let digit = b.wrapping_sub(b'0');
            if digit > 9 || at - from == 19 {
                return None;
            }
            value = value * 10 + u64::from(digit);
            at += 1;
        }
        (at > from).then_some((value, at))
    };
    let (priority, end) = number(0)?;
    let (seq, end) = number(end + 1)?;
    let (timestamp_usec, end) = number(end + 1)?;
    // The flags field ends at the next comma, if any.
    let flags = header.get(end + 1..).unwrap_or_default();
    let continuation = flags.iter().take_while(|&&b| b != b',').any(|&b| b == b'c');
    // Lossy decoding would change nothing then: the flags are compared as the text is.
    (flags.is_ascii()).then_some((
        u32::try_from(priority).ok()?,
        seq,
        timestamp_usec,
        continuation,
    ))
}

/// The header fields, parsed as text (a `+` sign is accepted, as `str::parse` does), or the
/// field that is missing or not a number.
fn checked_header(header: &[u8]) -> Result<(u32, u64, u64, bool), RecordError> {
    let header = String::from_utf8_lossy(header);
    let mut fields = header.split(',');
    let priority: u32 = header_number(fields.next(), "priority")?;
    let seq = header_number(fields.next(), "sequence")?;
    let timestamp_usec = header_number(fields.next(), "timestamp")?;
    let continuation = fields.next().is_some_and(|flags| flags.contains('c'));
    Ok((priority, seq, timestamp_usec, continuation))
}

fn header_number<T: std::str::FromStr>(
    field: Option<&str>,
    name: &'static str,
) -> Result<T, RecordError> {
    let text = field.unwrap_or_default();
    text.parse().map_err(|_| RecordError::BadHeaderField {
        field: name,
        text: text.to_owned(),
    })
}

/// Undoes the kernel's `\xNN` escaping; invalid UTF-8 becomes U+FFFD.
pub fn unescape(escaped: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(escaped.len());
    let mut rest = escaped;
    // Runs without a backslash are copied whole.
    while let Some(at) = memchr::memchr(b'\\', rest) {
        bytes.extend_from_slice(&rest[..at]);
        let escape = &rest[at..];
        if escape.get(1) == Some(&b'x') {
            let hex = escape.get(2..4).and_then(|h| std::str::from_utf8(h).ok());
            if let Some(value) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                bytes.push(value);
                rest = &escape[4..];
                continue;
            }
        }
        bytes.push(b'\\');
        rest = &escape[1..];
    }
    bytes.extend_from_slice(rest);
    match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-at-a-time unescaping the run-copying one replaced, as the reference.
    fn unescape_bytewise(escaped: &[u8]) -> String {
        let mut bytes = Vec::new();
        let mut i = 0;
        while i < escaped.len() {
            if escaped[i] == b'\\' && escaped.get(i + 1) == Some(&b'x') {
                let hex = escaped
                    .get(i + 2..i + 4)
                    .and_then(|h| std::str::from_utf8(h).ok());
                if let Some(value) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    bytes.push(value);
                    i += 4;
                    continue;
                }
            }
            bytes.push(escaped[i]);
            i += 1;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn plain_headers_read_as_the_checked_parser_reads_them() {
        let headers: [&[u8]; 12] = [
            b"6,346,605503265,-",
            b"4,1494,12345,c",
            b"6,1,2",
            b"30,18446744073709551615,0,-,caller=T1",
            b"4294967295,0,0,-",
            b"4294967296,0,0,-",
            b"+6,1,2,-",
            b"6,,2,-",
            b"6,1",
            b"6,1,2,\xc3c",
            b"06,0001,02,cc",
            b"",
        ];
        for header in headers {
            // Whenever the plain reading answers, it answers as the checked one.
            if let Some(plain) = plain_header(header) {
                assert_eq!(Some(plain), checked_header(header).ok(), "{header:?}");
            }
        }
        assert_eq!(
            plain_header(b"6,346,605503265,-"),
            Some((6, 346, 605_503_265, false))
        );
        assert_eq!(
            plain_header(b"4,1494,12345,c"),
            Some((4, 1494, 12345, true))
        );
        // Left to the checked parser: a sign, an empty field, 20 digits, a u32 overflow.
        for header in [
            &b"+6,1,2,-"[..],
            b"6,,2,-",
            b"30,18446744073709551615,0,-",
            b"4294967296,0,0,-",
        ] {
            assert_eq!(plain_header(header), None, "{header:?}");
        }
        assert!(checked_header(b"+6,1,2,-").is_ok());
        assert!(matches!(
            parse_record(b"6,,2,-;x"),
            Err(RecordError::BadHeaderField {
                field: "sequence",
                ..
            })
        ));
    }

    #[test]
    fn unescaping_equals_the_bytewise_reference() {
        // Inputs made of the characters that matter: backslashes, x, hex digits, a sign,
        // UTF-8 lead and continuation bytes, plain text.
        const ALPHABET: &[u8] = b"\\x0fA+g \xc3\xa9\xff";
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut compared = 0;
        for len in 0..40 {
            for _ in 0..200 {
                let input: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        ALPHABET[(state % ALPHABET.len() as u64) as usize]
                    })
                    .collect();
                assert_eq!(unescape(&input), unescape_bytewise(&input), "{input:?}");
                compared += 1;
            }
        }
        assert_eq!(compared, 8000);
        assert_eq!(unescape(b"a\\x41\\x+f\\xzz\\"), "aA\u{f}\\xzz\\");
    }

    #[test]
    fn parses_a_real_segfault_record() {
        let raw = b"6,346,605503265,-;crashy[10504]: segfault at 100 ip 0000564bc14194f0 sp 00007ffc75ee83d8 error 4 in crashy[14f0,564bc1419000+1000] likely on CPU 0 (core 0, socket 0)\n";
        let record = parse_record(raw).unwrap();
        assert_eq!(record.facility, 0);
        assert_eq!(record.level, Level::Info);
        assert_eq!(record.seq, 346);
        assert_eq!(record.timestamp_usec, 605_503_265);
        assert!(!record.continuation);
        assert!(record.message.starts_with("crashy[10504]: segfault at 100"));
        assert!(record.message.ends_with("socket 0)"));
        assert!(record.is_from_kernel());
    }

    #[test]
    fn user_written_records_carry_a_nonzero_facility() {
        let record = parse_record(b"14,8265,1,-;faultlab-fake[123]: segfault at 100\n").unwrap();
        assert_eq!((record.facility, record.level), (1, Level::Info));
        assert!(!record.is_from_kernel());
        let local7 = parse_record(b"191,9,1,-;x\n").unwrap();
        assert_eq!((local7.facility, local7.level), (23, Level::Debug));
    }

    #[test]
    fn every_priority_decodes() {
        for priority in 0u32..=191 {
            let raw = format!("{priority},1,2,-;m\n");
            let record = parse_record(raw.as_bytes()).unwrap();
            assert_eq!(u32::from(record.facility), priority / 8);
            assert_eq!(record.level as u32, priority % 8);
        }
    }

    #[test]
    fn dictionary_lines_attach_to_their_record() {
        let raw = b"3,777,42,-;block nbd0: Connection timed out\n SUBSYSTEM=block\n DEVICE=b43:0\n";
        let record = parse_record(raw).unwrap();
        assert_eq!(record.message, "block nbd0: Connection timed out");
        assert_eq!(
            record.dictionary,
            vec![
                ("SUBSYSTEM".to_owned(), "block".to_owned()),
                ("DEVICE".to_owned(), "b43:0".to_owned())
            ]
        );
    }

    #[test]
    fn escapes_are_undone() {
        let record = parse_record(b"6,1,1,-;tab\\x09here \\x5cx41 bad\\xZZ end\\x\n").unwrap();
        assert_eq!(record.message, "tab\there \\x41 bad\\xZZ end\\x");
        let utf8 = parse_record(b"6,1,1,-;caf\\xc3\\xa9\n").unwrap();
        assert_eq!(utf8.message, "café");
    }

    #[test]
    fn continuation_flag_is_read() {
        assert!(parse_record(b"6,1,1,c;more\n").unwrap().continuation);
        assert!(!parse_record(b"6,1,1,-,extra;x\n").unwrap().continuation);
    }

    #[test]
    fn malformed_headers_are_clear_errors() {
        assert_eq!(
            parse_record(b"6,1,1,-").unwrap_err(),
            RecordError::MissingSeparator
        );
        let err = parse_record(b"6,x,1,-;m").unwrap_err();
        assert_eq!(
            err,
            RecordError::BadHeaderField {
                field: "sequence",
                text: "x".into()
            }
        );
        assert!(matches!(
            parse_record(b";m").unwrap_err(),
            RecordError::BadHeaderField {
                field: "priority",
                ..
            }
        ));
        assert!(matches!(
            parse_record(b"6,1;m").unwrap_err(),
            RecordError::BadHeaderField {
                field: "timestamp",
                ..
            }
        ));
    }
}
