//! The telemetry sequence stamp shared by the fleet (which writes it) and the emulator (which
//! counts gaps and duplicates from it): the application property `fleetsim-seq` = `RUN:N`, a run
//! id chosen when the fleet starts and a per-identity number from 1.

pub const PROPERTY: &str = "fleetsim-seq";

/// Beside the sequence stamp: when the device created the message, in milliseconds since the
/// Unix epoch (decimal text), so a back end reading the hub's Event Hubs-compatible endpoint can
/// measure end-to-end latency. Buffering and resends are part of that latency: the stamp is taken
/// once, when the reading is queued.
pub const SENT_PROPERTY: &str = "fleetsim-sent";

/// Parses a `fleetsim-sent` value.
pub fn parse_sent(value: &str) -> Option<i64> {
    value.parse::<i64>().ok().filter(|ms| *ms > 0)
}

pub fn stamp(run: &str, n: u64) -> String {
    format!("{run}:{n}")
}

/// Parses `RUN:N`.
pub fn parse(value: &str) -> Option<(&str, u64)> {
    let (run, n) = value.split_once(':')?;
    let n: u64 = n.parse().ok()?;
    (!run.is_empty() && n > 0).then_some((run, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_stamps_and_nothing_else() {
        assert_eq!(parse(&stamp("a1b2", 17)), Some(("a1b2", 17)));
        for bad in ["17", ":17", "a:0", "a:x", "a:-1", ""] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(parse_sent("1764460800123"), Some(1_764_460_800_123));
        for bad in ["", "0", "-5", "12.5", "x"] {
            assert_eq!(parse_sent(bad), None, "{bad}");
        }
    }
}
