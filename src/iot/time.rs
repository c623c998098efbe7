//! Wall-clock helpers. The protocol carries time as Unix seconds (SAS `se`) and as ISO-8601 UTC
//! strings (twin metadata, DPS results); callers pass `SystemTime` in so the rest stays pure.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 for times before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The `SystemTime` at a Unix-seconds instant.
pub fn from_unix_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, the form IoT Hub uses in `$metadata` and DPS results.
pub fn iso8601(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The placeholder IoT Hub shows for "never": `0001-01-01T00:00:00Z`.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_with_millis() {
        let t = from_unix_secs(1_700_000_000) + Duration::from_millis(7);
        assert_eq!(iso8601(t), "2023-11-14T22:13:20.007Z");
        assert_eq!(unix_secs(t), 1_700_000_000);
    }
}
