//! The telemetry sequence stamp shared by the fleet (which writes it) and the emulator (which
//! counts gaps and duplicates from it): the application property `fleetsim-seq` = `RUN:N`, a run
//! id chosen when the fleet starts and a per-identity number from 1.

pub const PROPERTY: &str = "fleetsim-seq";

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
    }
}
