//! `/dev/kmsg` records and the recogniser: NUL separates records (each `read(2)` of
//! `/dev/kmsg` returns one); the same bytes are also recognised as pasted text, the path
//! of `crashwatch-agent explain`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_agent::kmsg::parse_record;
use node_agent::recognise::{LogLine, Recogniser, recognise_text};

fuzz_target!(|data: &[u8]| {
    let mut recogniser = Recogniser::new();
    for record in data.split(|&b| b == 0) {
        if let Ok(record) = parse_record(record) {
            recogniser.feed(LogLine::from_record(&record));
        }
    }
    recogniser.flush();
    recognise_text(&String::from_utf8_lossy(data));
});
