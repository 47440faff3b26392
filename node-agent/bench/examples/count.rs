//! Parses and recognises one benchmark's records a fixed number of times, for counters that
//! do not depend on the machine's load: `perf stat -e instructions:u,task-clock
//! target/release/examples/count public-corpus 2000` (also `segfault-storm`).

#[path = "../benches/records/mod.rs"]
mod records;

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "public-corpus".into());
    let rounds: usize = args
        .next()
        .map_or(1000, |n| n.parse().expect("a number of rounds"));
    let records = match which.as_str() {
        "public-corpus" => records::public_records(),
        "segfault-storm" => records::storm_records(),
        other => panic!("unknown record set {other}"),
    };
    let found: usize = (0..rounds)
        .map(|_| records::parse_and_recognise(std::hint::black_box(&records)))
        .sum();
    println!(
        "{which}: {} records x {rounds} rounds, {found} found",
        records.len()
    );
}
