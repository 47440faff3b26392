//! Go-style durations (`90s`, `10m`, `1h30m`, `1.5h`, `500ms`), as the CRD's fields are written.

use std::time::Duration;

/// A duration string that is not a Go-style duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration such as 90s, 10m or 1h30m")]
pub struct InvalidDuration(pub String);

/// Parses a Go-style duration: one or more `<number><unit>` parts, units `ms`, `s`, `m`, `h`.
pub fn parse_duration(text: &str) -> Result<Duration, InvalidDuration> {
    let invalid = || InvalidDuration(text.to_owned());
    let mut rest = text;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let (number, tail) = rest.split_at(number_len);
        let value: f64 = number.parse().map_err(|_| invalid())?;
        let (unit_seconds, unit_len) = if tail.starts_with("ms") {
            (0.001, 2)
        } else if tail.starts_with('s') {
            (1.0, 1)
        } else if tail.starts_with('m') {
            (60.0, 1)
        } else if tail.starts_with('h') {
            (3600.0, 1)
        } else {
            return Err(invalid());
        };
        total = total
            .checked_add(Duration::try_from_secs_f64(value * unit_seconds).map_err(|_| invalid())?)
            .ok_or_else(invalid)?;
        rest = &tail[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_the_crd_allows() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_what_go_would_reject() {
        for bad in ["", "10", "m", "10x", "1h 30m", "-1s", "1..5s", "1e9999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
