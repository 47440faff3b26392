//! Bounds on everything a CrashReport holds, so that no crash, however odd, makes an object
//! the API server refuses (etcd's limit is 1.5 MiB) or that is costly to list.
//!
//! The agent cuts every event to these bounds before it publishes it ([`bound_event`]); the
//! CRD schema states the same numbers, so the server refuses what an agent that ignores them
//! would write. String bounds are in bytes, which also bounds the characters the schema's
//! `maxLength` counts. With these values a whole spec stays under 512 KiB.

use crate::event::CrashEvent;

/// Kernel lines kept in `raw` (a hung task with its stack takes about 30, an oops about 60).
pub const MAX_RAW_LINES: usize = 100;
/// Bytes of one kernel line (`raw`, an occurrence's `line`): the kernel's own record limit
/// (1 KiB with its prefix).
pub const MAX_LINE_BYTES: usize = 1024;
/// Source frames kept in `frames`.
pub const MAX_FRAMES: usize = 64;
/// Kernel stack entries kept in `kernelStack`.
pub const MAX_KERNEL_STACK: usize = 64;
/// Entries of `errorBits` (the decoders produce at most 8).
pub const MAX_ERROR_BITS: usize = 16;
/// Bytes of a name: `module`, `device`, `wchan`, `timestamp`, an `errorBits` entry, an
/// occurrence's `time`.
pub const MAX_NAME_BYTES: usize = 256;
/// Bytes of a process name (`comm`, `victimComm`): the schema's bound. The kernel prints at
/// most 15; a longer one is pasted text.
pub const MAX_COMM_BYTES: usize = crate::bounds::COMM_LEN;
/// Bytes of a path: `binaryPath`, a frame's `file`.
pub const MAX_PATH_BYTES: usize = 1024;
/// Bytes of a symbol or expression: a frame's `function`, a `kernelStack` entry, the
/// `access` pointer and member.
pub const MAX_SYMBOL_BYTES: usize = 1024;
/// Bytes of a text: `explanation`, `instruction`, `code`, `location`.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Occurrences kept in a report's `status.recent`.
pub const MAX_RECENT_OCCURRENCES: usize = crate::report::RECENT_OCCURRENCES;

/// What replaces the end of a string cut to its bound.
const ELLIPSIS: &str = "…";

/// Cuts `text` to at most `max_bytes` bytes at a character boundary, ending it with `…` when
/// something was cut.
pub fn bound_string(text: &mut String, max_bytes: usize) {
    if text.len() <= max_bytes {
        return;
    }
    let mut end = max_bytes.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    if text.len() + ELLIPSIS.len() <= max_bytes {
        text.push_str(ELLIPSIS);
    }
}

/// [`bound_string`] for an optional string.
pub fn bound_string_option(text: &mut Option<String>, max_bytes: usize) {
    if let Some(text) = text {
        bound_string(text, max_bytes);
    }
}

/// Keeps at most `max` lines of `lines`, each cut to [`MAX_LINE_BYTES`]. When lines are
/// left out (`omitted` before this call plus any beyond `max`), the last kept line is
/// replaced by `[N more lines omitted]`, so the list says that it is incomplete.
pub fn bound_lines(lines: &mut Vec<String>, max: usize, omitted: usize) {
    let omitted = omitted + lines.len().saturating_sub(max);
    lines.truncate(max);
    if omitted > 0
        && let Some(last) = lines.last_mut()
    {
        // The replaced line is omitted too.
        *last = format!("[{} more lines omitted]", omitted + 1);
    }
    for line in lines.iter_mut() {
        bound_string(line, MAX_LINE_BYTES);
    }
}

/// Cuts every list and string of `event` to the bounds above.
pub fn bound_event(event: &mut CrashEvent) {
    bound_string_option(&mut event.comm, MAX_COMM_BYTES);
    bound_string_option(&mut event.victim_comm, MAX_COMM_BYTES);
    for name in [
        &mut event.module,
        &mut event.device,
        &mut event.wchan,
        &mut event.timestamp,
    ] {
        bound_string_option(name, MAX_NAME_BYTES);
    }
    // A build-id cut short would name another file (and break the schema's hex pattern):
    // one longer than any real one is dropped.
    if event
        .build_id
        .as_ref()
        .is_some_and(|id| id.len() > crate::bounds::BUILD_ID_LEN)
    {
        event.build_id = None;
    }
    bound_string_option(&mut event.binary_path, MAX_PATH_BYTES);
    for text in [
        &mut event.explanation,
        &mut event.instruction,
        &mut event.code,
    ] {
        bound_string_option(text, MAX_TEXT_BYTES);
    }
    event.error_bits.truncate(MAX_ERROR_BITS);
    for bit in &mut event.error_bits {
        bound_string(bit, MAX_NAME_BYTES);
    }
    event.kernel_stack.truncate(MAX_KERNEL_STACK);
    for entry in &mut event.kernel_stack {
        bound_string(entry, MAX_SYMBOL_BYTES);
    }
    event.frames.truncate(MAX_FRAMES);
    for frame in &mut event.frames {
        bound_string_option(&mut frame.function, MAX_SYMBOL_BYTES);
        bound_string_option(&mut frame.file, MAX_PATH_BYTES);
    }
    if let Some(access) = &mut event.access {
        bound_string_option(&mut access.pointer, MAX_SYMBOL_BYTES);
        bound_string_option(&mut access.member, MAX_SYMBOL_BYTES);
    }
    bound_lines(&mut event.raw, MAX_RAW_LINES, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bounds;
    use crate::event::{EventKind, Frame};

    #[test]
    fn a_bounded_event_fits_the_crd_schemas_bounds() {
        let long = "é".repeat(10_000);
        let mut event = CrashEvent::new(EventKind::OomKill);
        for field in [
            &mut event.comm,
            &mut event.victim_comm,
            &mut event.module,
            &mut event.device,
            &mut event.wchan,
            &mut event.timestamp,
            &mut event.binary_path,
            &mut event.explanation,
            &mut event.instruction,
            &mut event.code,
        ] {
            *field = Some(long.clone());
        }
        event.build_id = Some("ab".repeat(100));
        event.error_bits = vec![long.clone(); 100];
        event.kernel_stack = vec![long.clone(); 1000];
        event.raw = vec![long.clone(); 1000];
        event.frames = vec![
            Frame {
                function: Some(long.clone()),
                file: Some(long.clone()),
                ..Frame::default()
            };
            1000
        ];
        bound_event(&mut event);
        let chars = |s: &Option<String>| s.as_ref().map_or(0, |s| s.chars().count());
        assert!(chars(&event.comm) <= bounds::COMM_LEN);
        assert!(chars(&event.victim_comm) <= bounds::COMM_LEN);
        assert!(chars(&event.module) <= bounds::PATH_LEN);
        for word in [&event.device, &event.wchan, &event.timestamp] {
            assert!(chars(word) <= bounds::WORD_LEN);
        }
        assert!(chars(&event.binary_path) <= bounds::PATH_LEN);
        for text in [&event.explanation, &event.instruction, &event.code] {
            assert!(chars(text) <= bounds::TEXT_LEN);
        }
        assert_eq!(
            event.build_id, None,
            "a 200-digit build-id is dropped, not cut"
        );
        assert!(event.error_bits.len() <= bounds::ERROR_BITS);
        assert!(
            event
                .error_bits
                .iter()
                .all(|b| b.chars().count() <= bounds::WORD_LEN)
        );
        assert!(event.kernel_stack.len() <= bounds::KERNEL_STACK_FRAMES);
        assert!(
            event
                .kernel_stack
                .iter()
                .all(|l| l.chars().count() <= bounds::LINE_LEN)
        );
        assert!(event.raw.len() <= bounds::RAW_LINES);
        assert!(
            event
                .raw
                .iter()
                .all(|l| l.chars().count() <= bounds::LINE_LEN)
        );
        assert!(event.frames.len() <= bounds::FRAMES);
        for frame in &event.frames {
            assert!(chars(&frame.function) <= bounds::TEXT_LEN);
            assert!(chars(&frame.file) <= bounds::PATH_LEN);
        }
        // And it was cut, not emptied: the bounds keep what fits.
        assert!(chars(&event.comm) > bounds::COMM_LEN / 4);
    }

    #[test]
    fn strings_are_cut_at_a_character_boundary_and_marked() {
        let mut ascii = "x".repeat(300);
        bound_string(&mut ascii, 256);
        assert_eq!(ascii.len(), 256);
        assert!(ascii.ends_with('…'));
        // 'é' is two bytes: a cut through one must back off to its start.
        let mut accents = "é".repeat(200);
        bound_string(&mut accents, 255);
        assert!(accents.len() <= 255, "{}", accents.len());
        assert!(accents.ends_with('…'));
        let mut short = String::from("qemu-nbd");
        bound_string(&mut short, 256);
        assert_eq!(short, "qemu-nbd", "within the bound: untouched");
    }

    #[test]
    fn lines_beyond_the_bound_are_counted_in_the_last_one() {
        let mut lines: Vec<String> = (0..250).map(|i| format!("line {i}")).collect();
        bound_lines(&mut lines, 100, 0);
        assert_eq!(lines.len(), 100);
        assert_eq!(lines[98], "line 98");
        // 250 lines, 99 kept as they were: 151 left out.
        assert_eq!(lines[99], "[151 more lines omitted]");
        let mut few = vec!["a".to_owned(), "b".to_owned()];
        bound_lines(&mut few, 100, 0);
        assert_eq!(few, ["a", "b"]);
        let mut already_cut = vec!["a".to_owned(), "b".to_owned()];
        bound_lines(&mut already_cut, 100, 7);
        assert_eq!(already_cut, ["a", "[8 more lines omitted]"]);
    }

    #[test]
    fn every_list_and_string_of_an_event_is_bounded() {
        let mut event = CrashEvent::new(EventKind::HungTask);
        let long = "y".repeat(100_000);
        event.comm = Some(long.clone());
        event.binary_path = Some(long.clone());
        event.explanation = Some(long.clone());
        event.kernel_stack = vec![long.clone(); 5000];
        event.frames = vec![
            Frame {
                function: Some(long.clone()),
                file: Some(long.clone()),
                ..Frame::default()
            };
            5000
        ];
        event.raw = vec![long.clone(); 5000];
        bound_event(&mut event);
        assert!(event.comm.as_ref().unwrap().len() <= 256);
        assert!(event.binary_path.as_ref().unwrap().len() <= 1024);
        assert!(event.explanation.as_ref().unwrap().len() <= 4096);
        assert_eq!(event.kernel_stack.len(), 64);
        assert!(event.kernel_stack.iter().all(|e| e.len() <= 1024));
        assert_eq!(event.frames.len(), 64);
        assert_eq!(event.raw.len(), 100);
        assert!(event.raw.iter().all(|l| l.len() <= 1024));
        let size = serde_json::to_vec(&event).unwrap().len();
        assert!(size < 512 << 10, "{size} bytes");
    }
}
