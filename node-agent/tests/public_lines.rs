//! The recogniser against real kernel lines collected from public bug reports, mailing lists
//! and Q&A pages (`tests/data/public-kernel-lines.txt`). Each block records its source URL, the
//! kernel version when known, the log format, and the facts a person read off the line by hand.

use std::collections::BTreeMap;

use node_agent::recognise::{Recognised, recognise_text};

struct Sample {
    source: String,
    expect: BTreeMap<String, String>,
    text: String,
}

fn samples() -> Vec<Sample> {
    let data = include_str!("data/public-kernel-lines.txt");
    let mut samples = Vec::new();
    for block in data.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut sample = Sample {
            source: String::new(),
            expect: BTreeMap::new(),
            text: String::new(),
        };
        for line in block.lines() {
            if let Some(source) = line.strip_prefix("## source: ") {
                sample.source = source.to_owned();
            } else if let Some(facts) = line.strip_prefix("## expect: ") {
                sample.expect = parse_facts(facts);
            } else if !line.starts_with("## ") {
                sample.text.push_str(line);
                sample.text.push('\n');
            }
        }
        assert!(
            !sample.source.is_empty() && sample.expect.contains_key("kind"),
            "malformed block:\n{block}"
        );
        samples.push(sample);
    }
    samples
}

/// `key=value key="value with spaces"`
fn parse_facts(text: &str) -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=').expect("key=value");
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => quoted.split_once('"').expect("closing quote"),
            None => after.split_once(' ').unwrap_or((after, "")),
        };
        facts.insert(key.to_owned(), value.to_owned());
        rest = after.trim_start();
    }
    facts
}

#[test]
fn every_public_sample_is_recognised_with_the_facts_read_by_hand() {
    let samples = samples();
    assert!(samples.len() >= 45, "only {} samples", samples.len());
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
    let kind = sample.expect["kind"].as_str();
    match kind {
        "Suppressed" => {
            let expected: u64 = sample.expect["suppressed"].parse().unwrap();
            return match items.first() {
                Some(Recognised::CrashesSuppressed(n)) if *n == expected => Ok(()),
                other => Err(format!("expected {expected} suppressed, got {other:?}")),
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
    if events.len() != 1 {
        return Err(format!(
            "expected exactly one event, got {}: {events:?}",
            events.len()
        ));
    }
    let json = serde_json::to_value(&events[0]).unwrap();
    for (key, expected) in &sample.expect {
        let actual = match &json[key.as_str()] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => "<absent>".to_owned(),
            other => other.to_string(),
        };
        if &actual != expected {
            return Err(format!("{key}: expected {expected:?}, got {actual:?}"));
        }
    }
    Ok(())
}
