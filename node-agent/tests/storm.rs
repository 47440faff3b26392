//! Crash storms on the real kernel: thousands of real segfaults with the printk rate limit
//! off (restored afterwards). The agent's accounting of what it saw, lost and was told was
//! suppressed must add up exactly against the kernel's sequence numbers.
//!
//! Needs root and `/dev/kmsg`. `CRASHWATCH_STORM_CRASHES` sets the storm's size (default
//! 2000). The CPU and memory figures it prints are reported in BENCHMARKS.md; they are not
//! asserted here.

mod support;

use std::time::{Duration, Instant};

use crds::EventKind;
use support::{
    Agent, KernelTest, crash_storm, crashy, newest_kmsg_seq, start_at_the_end_of_the_log,
};

fn storm_size() -> u64 {
    std::env::var("CRASHWATCH_STORM_CRASHES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000)
}

#[test]
fn a_storm_of_thousands_of_real_crashes_is_accounted_for_exactly() {
    let Some(test) = KernelTest::begin() else {
        return;
    };
    start_at_the_end_of_the_log(test.state.path());
    let cursor = newest_kmsg_seq();
    let binary = crashy().to_str().unwrap();
    let mut agent = Agent::start(test.state.path(), &["--binary", binary]);
    std::thread::sleep(Duration::from_secs(1));
    let (idle_cpu, idle_rss) = agent.resources();

    let crashes = storm_size();
    let started = Instant::now();
    let mut peak_rss = idle_rss;
    for _ in 0..crashes / 100 {
        crash_storm(100);
        peak_rss = peak_rss.max(agent.resources().1);
    }
    crash_storm(crashes % 100);
    let storm = started.elapsed();
    let newest = newest_kmsg_seq();
    let records = newest - cursor;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut seen, mut lost) = (0.0, 0.0);
    while Instant::now() < deadline {
        seen = agent.counter("crashwatch_kmsg_records_total");
        lost = agent.counter("crashwatch_kmsg_records_lost_total");
        if seen + lost >= records as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.drain_for(Duration::from_secs(1));
    let (busy_cpu, busy_rss) = agent.resources();
    peak_rss = peak_rss.max(busy_rss);
    let suppressed = agent.counter("crashwatch_crashes_suppressed_total");
    let events = agent
        .seen
        .iter()
        .filter(|e| e.kind == EventKind::Segfault && e.comm.as_deref() == Some("crashy"))
        .count() as u64;
    eprintln!(
        "storm: {crashes} crashes in {storm:?}, {records} kernel records: seen {seen}, lost {lost}, suppressed {suppressed}; \
         agent CPU {:?} over the storm, RSS idle {} KiB, peak {} KiB",
        busy_cpu - idle_cpu,
        idle_rss / 1024,
        peak_rss / 1024
    );

    assert_eq!(
        seen + lost,
        records as f64,
        "every record is either seen or counted lost"
    );
    assert_eq!(
        suppressed, 0.0,
        "with printk_ratelimit=0 the kernel suppresses nothing"
    );
    if lost == 0.0 {
        assert_eq!(events, crashes, "nothing lost: every crash is one event");
    } else {
        // A lost record hides at most one crash.
        assert!(
            events <= crashes && events + lost as u64 >= crashes,
            "{events} events, {lost} lost"
        );
    }
    assert_eq!(
        agent.process_counter("crashwatch_crashes_total", "crashy"),
        events as f64,
        "the counter agrees with the events printed"
    );
}
