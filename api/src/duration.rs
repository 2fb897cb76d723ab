//! Go-style durations (`"24h"`, `"1h30m"`, `"500ms"`) as the API's duration
//! fields (`reattestationInterval`) and the components' flags write them.

use std::time::Duration;

/// Parses a Go-style duration: one or more `<number><unit>` with units
/// `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`. Returns `None` for anything else.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * factor;
    }
    Duration::try_from_secs_f64(total).ok()
}

/// [`parse_duration`] as a command-line value parser (clap's
/// `value_parser = confidential_api::duration::parse_flag`): the error says
/// what a duration looks like.
pub fn parse_flag(text: &str) -> Result<Duration, String> {
    parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration like 500ms, 30s, 5m or 1h30m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations_and_refuses_others() {
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        for bad in ["", "10", "5d", "h", "1.2.3s", "-1s"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
            assert!(parse_flag(bad).unwrap_err().contains("is not a duration"));
        }
    }
}
