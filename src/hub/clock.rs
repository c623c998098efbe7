//! The hub's one clock. Monotonic time is tokio's `Instant`, so a test runtime with paused time
//! (`#[tokio::test(start_paused = true)]`) moves every deadline the hub keeps: keep-alive, token
//! expiry, C2D locks and TTLs, DPS assignment delays, fault windows. Wall time (token expiry
//! checks, `$metadata` stamps, enqueued times) is derived from it: the wall time read once, plus
//! the monotonic time elapsed since, so a paused clock moves it too, and both never disagree
//! within the process. Every other file of the hub reads the time through here.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

pub use tokio::time::Instant;

/// The monotonic time now (tokio's: paused and advanced in tests).
pub fn now() -> Instant {
    Instant::now()
}

/// Where wall time was read, and the monotonic time it was read at.
fn anchor() -> &'static (Instant, SystemTime) {
    static ANCHOR: OnceLock<(Instant, SystemTime)> = OnceLock::new();
    ANCHOR.get_or_init(|| (Instant::now(), SystemTime::now()))
}

/// The wall time now: the anchor's wall time moved by the monotonic time since the anchor. A
/// monotonic instant from before the anchor (a paused test clock frozen earlier) moves it back.
pub fn wall() -> SystemTime {
    wall_at(now())
}

/// The wall time at monotonic instant `at`.
pub fn wall_at(at: Instant) -> SystemTime {
    let (base, base_wall) = *anchor();
    if at >= base {
        base_wall.checked_add(at.duration_since(base)).unwrap_or(base_wall)
    } else {
        base_wall.checked_sub(base.duration_since(at)).unwrap_or(base_wall)
    }
}

/// `now + d`, or `None` when that is past what the clock can count (treat it as never).
pub fn after(d: Duration) -> Option<Instant> {
    now().checked_add(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wall_time_follows_a_paused_clock() {
        let (t0, w0) = (now(), wall());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(now() - t0, Duration::from_secs(3600));
        assert_eq!(wall().duration_since(w0).unwrap(), Duration::from_secs(3600));
        assert_eq!(wall_at(t0), w0);
    }

    #[test]
    fn the_hub_reads_time_only_here() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/hub");
        let mut stack = vec![root];
        let mut offenders = Vec::new();
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("clock.rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for needle in
                        ["SystemTime::now()", "std::time::Instant", "std::time::{Instant", "tokio::time::Instant"]
                    {
                        if text.contains(needle) {
                            offenders.push(format!("{}: {needle}", path.display()));
                        }
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "read the time through hub::clock:\n{}", offenders.join("\n"));
    }
}
