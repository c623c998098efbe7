//! The console's time series: one sample a second of the fleet's rates and latency percentiles and
//! of the emulator's connections, telemetry and faults, kept for the last ten minutes in a bounded ring and pushed to every
//! open stream (server-sent events). One task samples; nothing here runs per message.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::Histogram;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::Console;
use crate::metrics::DeviceState;

/// Samples kept: ten minutes at one a second.
pub const CAPACITY: usize = 600;
/// How often a sample is taken.
pub const PERIOD: Duration = Duration::from_secs(1);
/// The window latency percentiles of a sample are computed over (the last five seconds).
const WINDOW: usize = 5;

/// One second of the fleet and the emulator. Rates are per second over the last period; latencies
/// are in milliseconds over the last five seconds (`None` when nothing was measured), estimated
/// from the Prometheus histograms' buckets by linear interpolation. On a standalone emulator the
/// fleet's figures are 0 (latencies `None`); without an emulator its figures are `None` (faults 0).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// Unix milliseconds.
    pub t: u64,
    pub identities: usize,
    pub connected: i64,
    pub generated_per_sec: f64,
    pub acked_per_sec: f64,
    pub dropped_per_sec: f64,
    pub retransmits_per_sec: f64,
    pub reconnects_per_sec: f64,
    pub puback_p50_ms: Option<f64>,
    pub puback_p99_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
    /// The emulator's fault knobs that are on now (an outage in progress counts as one); 0
    /// without an embedded emulator.
    pub faults_active: u32,
    /// What the fault injector did in the period: injections, refused connects, forced closes.
    pub fault_events_per_sec: f64,
    /// Device and module MQTT connections (TLS and WebSockets) the emulator holds now.
    pub hub_connections: Option<i64>,
    /// Device-to-cloud messages the emulator accepted in the period.
    pub hub_telemetry_per_sec: Option<f64>,
}

/// The ring and the stream.
pub struct Series {
    ring: Mutex<VecDeque<Arc<Sample>>>,
    tx: broadcast::Sender<Arc<Sample>>,
}

impl Default for Series {
    fn default() -> Self {
        Series { ring: Mutex::new(VecDeque::with_capacity(CAPACITY)), tx: broadcast::channel(16).0 }
    }
}

impl Series {
    /// Every kept sample, oldest first.
    pub fn all(&self) -> Vec<Arc<Sample>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    pub fn latest(&self) -> Option<Arc<Sample>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).back().cloned()
    }

    /// New samples as they are taken.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Sample>> {
        self.tx.subscribe()
    }

    fn push(&self, s: Sample) {
        let s = Arc::new(s);
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == CAPACITY {
                ring.pop_front();
            }
            ring.push_back(s.clone());
        }
        // No subscriber is not an error.
        let _ = self.tx.send(s);
    }
}

/// A histogram's cumulative bucket counts by upper bound (seconds), `+Inf` last.
pub fn buckets(h: &Histogram) -> Vec<(f64, u64)> {
    use prometheus::core::Collector;
    let mut out = Vec::new();
    for family in h.collect() {
        for m in family.get_metric() {
            let hist = m.get_histogram();
            for b in hist.get_bucket() {
                out.push((b.upper_bound(), b.cumulative_count()));
            }
            out.push((f64::INFINITY, hist.get_sample_count()));
        }
    }
    out
}

/// The `q` quantile in seconds of what was observed between `before` and `now` (cumulative
/// buckets of one histogram; `before` empty means since the start), interpolated linearly inside
/// its bucket; the `+Inf` bucket answers the largest finite bound.
pub fn quantile(now: &[(f64, u64)], before: &[(f64, u64)], q: f64) -> Option<f64> {
    let count = |i: usize| now[i].1.saturating_sub(before.get(i).map_or(0, |b| b.1));
    let total = count(now.len().checked_sub(1)?);
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0);
    let mut lower = 0.0;
    let mut below = 0u64;
    for (i, (bound, _)) in now.iter().enumerate() {
        let c = count(i);
        if c as f64 >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let inside = (c - below).max(1) as f64;
            return Some(lower + (bound - lower) * ((rank - below as f64) / inside).clamp(0.0, 1.0));
        }
        if bound.is_finite() {
            lower = *bound;
        }
        below = c;
    }
    Some(lower)
}

/// The emulator's fault knobs that are on now.
pub fn faults_active(hub: &crate::hub::state::HubState) -> u32 {
    let c = hub.faults.get();
    let on = [
        c.drop_fraction > 0.0,
        c.storm_every_secs > 0,
        c.outage_every_secs > 0,
        c.connects_per_sec > 0,
        c.puback_delay_ms > 0,
        c.twin_error_rate > 0.0,
        c.method_drop_rate > 0.0,
        c.dps_throttle_rate > 0.0,
        c.dps_assignment_delay_ms.is_some(),
        c.token_lifetime_secs > 0,
        hub.faults.outage_left().is_some(),
    ];
    on.iter().filter(|x| **x).count() as u32
}

fn fault_events(hub: &crate::hub::state::HubState) -> u64 {
    hub.metrics.faults_summary().values().filter_map(|v| v.as_u64()).sum()
}

/// Cumulative counts a sample's rates are differences of.
#[derive(Default, Clone, Copy)]
struct Totals {
    generated: u64,
    acked: u64,
    dropped: u64,
    retransmits: u64,
    reconnects: u64,
    fault_events: u64,
    hub_telemetry: u64,
}

fn totals(c: &Console) -> Totals {
    let mut t = Totals::default();
    if let Some(f) = &c.fleet {
        let m = &f.shared.metrics;
        t.generated = m.telemetry_generated.get();
        t.acked = m.telemetry_acked.get();
        t.dropped = m.dropped_count();
        t.retransmits = m.telemetry_retransmits.get();
        t.reconnects = m.reconnect_counts().values().filter_map(|v| v.as_u64()).sum();
    }
    if let Some(h) = c.hub.as_deref() {
        t.fault_events = fault_events(h);
        t.hub_telemetry = h.metrics.telemetry_received.get();
    }
    t
}

/// The fleet's latency histograms' buckets now (empty without a fleet).
fn latency_buckets(c: &Console) -> [Vec<(f64, u64)>; 2] {
    match &c.fleet {
        Some(f) => [buckets(&f.shared.metrics.puback_seconds), buckets(&f.shared.metrics.connect_seconds)],
        None => [Vec::new(), Vec::new()],
    }
}

/// Takes a sample every [`PERIOD`] until `stop`.
pub async fn run(console: Arc<Console>, stop: CancellationToken) {
    let mut last = totals(&console);
    let mut last_at = tokio::time::Instant::now();
    // The latency buckets of the last WINDOW samples, oldest first.
    let mut window: VecDeque<[Vec<(f64, u64)>; 2]> = VecDeque::from([latency_buckets(&console)]);
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = tokio::time::Instant::now();
        let secs = now.duration_since(last_at).as_secs_f64().max(0.001);
        let cur = totals(&console);
        let rate = |a: u64, b: u64| ((a.saturating_sub(b)) as f64 / secs * 10.0).round() / 10.0;
        let [p, c] = latency_buckets(&console);
        let [p_before, c_before] = window.front().cloned().unwrap_or_default();
        let ms = |v: Option<f64>| v.map(|s| (s * 10_000.0).round() / 10.0);
        let fleet = console.fleet.as_ref();
        let hub = console.hub.as_deref();
        let sample = Sample {
            t: super::unix_ms(SystemTime::now()),
            identities: fleet.map_or(0, |f| f.total.load(std::sync::atomic::Ordering::Relaxed)),
            connected: fleet.map_or(0, |f| f.shared.metrics.state_count(DeviceState::Connected)),
            generated_per_sec: rate(cur.generated, last.generated),
            acked_per_sec: rate(cur.acked, last.acked),
            dropped_per_sec: rate(cur.dropped, last.dropped),
            retransmits_per_sec: rate(cur.retransmits, last.retransmits),
            reconnects_per_sec: rate(cur.reconnects, last.reconnects),
            puback_p50_ms: ms(quantile(&p, &p_before, 0.5)),
            puback_p99_ms: ms(quantile(&p, &p_before, 0.99)),
            connect_p99_ms: ms(quantile(&c, &c_before, 0.99)),
            faults_active: hub.map_or(0, faults_active),
            fault_events_per_sec: rate(cur.fault_events, last.fault_events),
            hub_connections: hub.map(|h| h.metrics.connections_hub.get()),
            hub_telemetry_per_sec: hub.map(|_| rate(cur.hub_telemetry, last.hub_telemetry)),
        };
        console.series.push(sample);
        if window.len() == WINDOW {
            window.pop_front();
        }
        window.push_back([p, c]);
        last = cur;
        last_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 100 observations: 50 up to 10 ms, 40 more up to 20 ms, 10 above the last bound.
        let now = [(0.01, 50), (0.02, 90), (f64::INFINITY, 100)];
        assert_eq!(quantile(&now, &[], 0.5), Some(0.01));
        let p75 = quantile(&now, &[], 0.75).unwrap();
        assert!((p75 - 0.01625).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(&now, &[], 0.99), Some(0.02));
        // Only what happened since `before` counts.
        let before = [(0.01, 50), (0.02, 50), (f64::INFINITY, 50)];
        assert!(quantile(&now, &before, 0.5).unwrap() > 0.01);
        assert_eq!(quantile(&before, &before, 0.5), None);
        assert_eq!(quantile(&[], &[], 0.5), None);
    }
}
