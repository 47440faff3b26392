//! Records parsed per second on one core: `/dev/kmsg` record parsing and recognition, over
//! real kernel lines (the public corpus, each made a kmsg record as the kernel writes it),
//! and over a storm of real segfault records as this machine's kernel printed them.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use node_agent::kmsg::parse_record;
use node_agent::recognise::{LogLine, Recogniser};

/// The public corpus as kmsg records: `PRI,SEQ,USEC,FLAGS;MESSAGE\n`.
fn public_records() -> Vec<Vec<u8>> {
    let corpus = include_str!("../../tests/data/public-kernel-lines.txt");
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
fn storm_records() -> Vec<Vec<u8>> {
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

fn parse_and_recognise(records: &[Vec<u8>]) -> usize {
    let mut recogniser = Recogniser::new();
    let mut found = 0;
    for bytes in records {
        let record = parse_record(bytes).expect("a well-formed record");
        found += recogniser.feed(&LogLine::from_record(&record)).len();
    }
    found + recogniser.flush().map_or(0, |_| 1)
}

fn records_per_second(c: &mut Criterion) {
    let mut group = c.benchmark_group("kmsg");
    for (name, records) in [("public-corpus", public_records()), ("segfault-storm", storm_records())] {
        assert!(parse_and_recognise(&records) > 0, "{name} contains events");
        group.throughput(Throughput::Elements(records.len() as u64));
        group.bench_function(name, |b| b.iter(|| parse_and_recognise(&records)));
    }
    group.finish();
}

criterion_group!(benches, records_per_second);
criterion_main!(benches);
