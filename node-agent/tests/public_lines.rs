//! The recogniser against real kernel lines collected from public bug reports, mailing lists
//! and Q&A pages (`tests/data/public-kernel-lines.txt`). Each block records its source URL, the
//! kernel version when known, the log format, and the facts a person read off the line by hand:
//! one `## expect:` line per event the block holds, in order.

use std::collections::BTreeMap;

use node_agent::recognise::{Recognised, recognise_text};

struct Sample {
    source: String,
    expect: Vec<BTreeMap<String, String>>,
    text: String,
}

fn samples() -> Vec<Sample> {
    let data = include_str!("data/public-kernel-lines.txt");
    let mut samples = Vec::new();
    for block in data.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut sample = Sample {
            source: String::new(),
            expect: Vec::new(),
            text: String::new(),
        };
        for line in block.lines() {
            if let Some(source) = line.strip_prefix("## source: ") {
                sample.source = source.to_owned();
            } else if let Some(facts) = line.strip_prefix("## expect: ") {
                sample.expect.push(parse_facts(facts));
            } else if !line.starts_with("## ") {
                sample.text.push_str(line);
                sample.text.push('\n');
            }
        }
        assert!(
            !sample.source.is_empty() && sample.expect.iter().all(|e| e.contains_key("kind")),
            "malformed block:\n{block}"
        );
        samples.push(sample);
    }
    samples
}

/// `key=value key="value with spaces" key='["JSON", "with quotes"]'`
fn parse_facts(text: &str) -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').expect("key=value");
        let (value, after) = if let Some(quoted) = after.strip_prefix('"') {
            quoted.split_once('"').expect("closing quote")
        } else if let Some(quoted) = after.strip_prefix('\'') {
            quoted.split_once('\'').expect("closing quote")
        } else {
            after.split_once(' ').unwrap_or((after, ""))
        };
        facts.insert(key.to_owned(), value.to_owned());
        rest = after.trim_start();
    }
    facts
}

#[test]
fn every_public_sample_is_recognised_with_the_facts_read_by_hand() {
    let samples = samples();
    assert!(samples.len() >= 240, "only {} samples", samples.len());
    let mut failures = Vec::new();
    for sample in &samples {
        if let Err(why) = check(sample) {
            failures.push(format!(
                "{}\n  {}\n  {why}",
                sample.source,
                sample.text.lines().next().unwrap_or_default()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} samples failed:\n{}",
        failures.len(),
        samples.len(),
        failures.join("\n")
    );
}

fn check(sample: &Sample) -> Result<(), String> {
    let items = recognise_text(&sample.text);
    let first = &sample.expect[0];
    match first["kind"].as_str() {
        "Suppressed" => {
            let expected: u64 = first["suppressed"].parse().unwrap();
            return match items.first() {
                Some(Recognised::CrashesSuppressed(n)) if *n == expected => Ok(()),
                other => Err(format!("expected {expected} suppressed, got {other:?}")),
            };
        }
        "NoUserCrash" => {
            // Context lines, register dumps, call traces and faults in kernel mode.
            return match items.iter().find_map(|item| match item {
                Recognised::Event(found) if found.event.kind.is_user_crash() => Some(found),
                _ => None,
            }) {
                None => Ok(()),
                Some(found) => Err(format!("a false user crash: {:?}", found.event)),
            };
        }
        "HungTaskReportsSuppressed" => {
            return match items.first() {
                Some(Recognised::HungTaskReportsSuppressed) => Ok(()),
                other => Err(format!(
                    "expected the hung-task suppression notice, got {other:?}"
                )),
            };
        }
        _ => {}
    }
    let events: Vec<_> = items
        .into_iter()
        .filter_map(|item| match item {
            Recognised::Event(found) => Some(found.event),
            _ => None,
        })
        .collect();
    if events.len() != sample.expect.len() {
        return Err(format!(
            "expected {} events, got {}: {events:?}",
            sample.expect.len(),
            events.len()
        ));
    }
    for (n, (event, expect)) in events.iter().zip(&sample.expect).enumerate() {
        let json = serde_json::to_value(event).unwrap();
        for (key, expected) in expect {
            let actual = match &json[key.as_str()] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "<absent>".to_owned(),
                other => other.to_string(),
            };
            if &actual != expected {
                return Err(format!(
                    "event {n}: {key}: expected {expected:?}, got {actual:?}"
                ));
            }
        }
    }
    Ok(())
}
