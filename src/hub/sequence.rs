//! End-to-end loss measurement. A fleet may stamp each telemetry message with a sequence number
//! (`iot::sequence`). The hub keeps, per identity and run, which numbers arrived, so that loss is counted where messages land rather
//! than assumed from the sender's bookkeeping: a number never seen below the highest one seen is a
//! gap, a number seen twice a duplicate (QoS 1 redelivery after a lost PUBACK).

use std::collections::BTreeSet;

/// Gaps remembered exactly per identity; beyond that they are only counted (and can no longer be
/// filled by a late arrival), which keeps a badly lossy device from growing without bound.
const MAX_MISSING: usize = 4096;

/// What one arrival turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First time this number was seen; `skipped` numbers before it are now missing.
    New {
        skipped: u64,
    },
    /// A missing number arrived late.
    Filled,
    Duplicate,
}

/// One identity's stream within one run.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    pub run: String,
    pub highest: u64,
    pub unique: u64,
    pub duplicates: u64,
    /// Unique arrivals the hub's IoT Edge routes sent only to module inputs: at the hub, and by
    /// design never on the Event Hubs-compatible endpoint (a back end's books leave them out).
    pub routed_away: u64,
    missing: BTreeSet<u64>,
    /// Gaps past `MAX_MISSING`, counted but not remembered.
    forgotten: u64,
}

impl Tracker {
    pub fn new(run: &str) -> Tracker {
        Tracker { run: run.to_owned(), ..Default::default() }
    }

    pub fn gaps(&self) -> u64 {
        self.missing.len() as u64 + self.forgotten
    }

    pub fn record(&mut self, n: u64) -> Arrival {
        if n > self.highest {
            let skipped = n - self.highest - 1;
            for m in self.highest + 1..n {
                if self.missing.len() >= MAX_MISSING {
                    self.forgotten += n - m;
                    break;
                }
                self.missing.insert(m);
            }
            self.highest = n;
            self.unique += 1;
            Arrival::New { skipped }
        } else if self.missing.remove(&n) {
            self.unique += 1;
            Arrival::Filled
        } else {
            self.duplicates += 1;
            Arrival::Duplicate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_unique_duplicates_and_gaps() {
        let mut t = Tracker::new("r");
        assert_eq!(t.record(1), Arrival::New { skipped: 0 });
        assert_eq!(t.record(2), Arrival::New { skipped: 0 });
        assert_eq!(t.record(2), Arrival::Duplicate);
        assert_eq!(t.record(5), Arrival::New { skipped: 2 });
        assert_eq!((t.unique, t.duplicates, t.gaps()), (3, 1, 2));
        assert_eq!(t.record(3), Arrival::Filled);
        assert_eq!(t.record(3), Arrival::Duplicate);
        assert_eq!((t.unique, t.duplicates, t.gaps(), t.highest), (4, 2, 1, 5));
    }

    #[test]
    fn a_huge_jump_is_counted_not_stored() {
        let mut t = Tracker::new("r");
        t.record(1_000_000);
        assert_eq!(t.gaps(), 999_999);
        assert_eq!(t.missing.len(), MAX_MISSING);
        assert_eq!(t.record(2), Arrival::Filled);
        assert_eq!(t.gaps(), 999_998);
    }
}
