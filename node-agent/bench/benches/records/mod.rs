//! The records the recognition benchmarks feed: shared by `benches/kmsg.rs` and
//! `examples/count.rs`.

use node_agent::kmsg::parse_record;
use node_agent::recognise::{LogLine, Recogniser};

/// The public corpus as kmsg records: `PRI,SEQ,USEC,FLAGS;MESSAGE\n`.
pub fn public_records() -> Vec<Vec<u8>> {
    let corpus = include_str!("../../../tests/data/public-kernel-lines.txt");
    corpus
        .lines()
        .filter(|l| !l.starts_with("##") && !l.trim().is_empty())
        .map(|l| match l.split_once("] ") {
            Some((stamp, message)) if l.starts_with('[') => (stamp, message),
            _ => ("", l),
        })
        .enumerate()
        .map(|(seq, (_, message))| format!("6,{seq},{},-;{message}\n", seq * 1000).into_bytes())
        .collect()
}

/// 1000 crashes as the kernel prints them: the segfault line, then `Code:`.
pub fn storm_records() -> Vec<Vec<u8>> {
    (0..1000)
        .flat_map(|i| {
            [
                format!(
                    "6,{},{},-;crashy[{}]: segfault at 100 ip 000055d0c8a4c1c7 sp 00007ffd5d1e3c00 error 4 in crashy[1c7,55d0c8a4c000+1000] likely on CPU 1 (core 1, socket 0)\n",
                    2 * i, i * 1000, 4000 + i
                ),
                format!(
                    "6,{},{},c;Code: 00 00 00 00 00 00 00 55 48 89 e5 48 89 7d f8 48 8b 45 f8 <48> 8b 80 00 01 00 00 5d c3 55 48 89 e5 48 83 ec 10 89 7d fc\n",
                    2 * i + 1, i * 1000 + 1
                ),
            ]
        })
        .map(String::into_bytes)
        .collect()
}

/// Parses and recognises every record once; returns how many events and notices came out.
pub fn parse_and_recognise(records: &[Vec<u8>]) -> usize {
    let mut recogniser = Recogniser::new();
    let mut found = 0;
    for bytes in records {
        let record = parse_record(bytes).expect("a well-formed record");
        found += recogniser.feed(LogLine::from_owned_record(record)).len();
    }
    found + recogniser.flush().map_or(0, |_| 1)
}
