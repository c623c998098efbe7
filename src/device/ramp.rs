//! The connection ramp: a fleet-wide limit on how fast identities (re)connect, so thousands of
//! devices never stampede the hub (IoT Hub throttles new connections, protocol.md §7.2). Slots
//! are handed out on an absolute schedule, so the rate does not drift with scheduling delays.
//! Reconnects after faults take slots too, so a reconnect storm is held to the same rate.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A rate that can change after some time: `(after, connections per second)`, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule(pub Vec<(Duration, f64)>);

impl Schedule {
    pub fn constant(rate: f64) -> Schedule {
        Schedule(vec![(Duration::ZERO, rate)])
    }

    fn rate_at(&self, elapsed: Duration) -> f64 {
        self.0.iter().take_while(|(after, _)| *after <= elapsed).last().map_or(self.0[0].1, |(_, r)| *r)
    }
}

pub struct Ramp {
    schedule: Schedule,
    started: Instant,
    next_slot: Mutex<Instant>,
}

impl Ramp {
    pub fn new(schedule: Schedule) -> Ramp {
        let now = Instant::now();
        Ramp { schedule, started: now, next_slot: Mutex::new(now) }
    }

    /// Reserves the next connection slot and returns when it is due.
    pub fn reserve(&self) -> Instant {
        let mut next = self.next_slot.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let slot = (*next).max(now);
        let rate = self.schedule.rate_at(slot.saturating_duration_since(self.started)).max(0.001);
        *next = slot + Duration::from_secs_f64(1.0 / rate);
        slot
    }

    /// Waits for a slot; false if `cancel` fired first.
    pub async fn acquire(&self, cancel: &tokio_util::sync::CancellationToken) -> bool {
        let slot = self.reserve();
        tokio::select! {
            _ = tokio::time::sleep_until(slot) => true,
            _ = cancel.cancelled() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_rate_and_its_schedule() {
        let ramp = Ramp::new(Schedule(vec![(Duration::ZERO, 10.0), (Duration::from_secs(1), 100.0)]));
        let t0 = ramp.started;
        let slots: Vec<Duration> = (0..12).map(|_| ramp.reserve().saturating_duration_since(t0)).collect();
        // Ten slots 100 ms apart fill the first second, then 10 ms apart.
        assert!(slots[9] >= Duration::from_millis(899) && slots[9] <= Duration::from_millis(950), "{slots:?}");
        assert!(slots[11] - slots[10] <= Duration::from_millis(11), "{slots:?}");
    }
}
