//! Records parsed per second on one core: `/dev/kmsg` record parsing and recognition, over
//! real kernel lines (the public corpus, each made a kmsg record as the kernel writes it),
//! and over a storm of real segfault records as this machine's kernel printed them.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
mod records;

use records::{parse_and_recognise, public_records, storm_records};

fn records_per_second(c: &mut Criterion) {
    let mut group = c.benchmark_group("kmsg");
    for (name, records) in [
        ("public-corpus", public_records()),
        ("segfault-storm", storm_records()),
    ] {
        assert!(parse_and_recognise(&records) > 0, "{name} contains events");
        group.throughput(Throughput::Elements(records.len() as u64));
        group.bench_function(name, |b| b.iter(|| parse_and_recognise(&records)));
    }
    group.finish();
}

criterion_group!(benches, records_per_second);
criterion_main!(benches);
