//! The CI run's timeline: how the run went second by second, for the HTML report's charts and
//! for `fleetsim report merge`. A sampler reads the fleet's counters once a second (connected
//! identities, messages generated, acknowledged and dropped, reconnects, the embedded emulator's
//! injected faults, and the PUBACK latency histogram's buckets) and keeps what changed in each
//! interval. The timeline is bounded to `MAX_POINTS` points: when a long soak fills it, pairs
//! of neighbouring intervals are merged and the step doubles, so a 24 h run keeps between 360 and
//! 720 points (2 min each) and its report stays under ~150 KB. More points than that would not
//! show anyway: a chart about 1,000 pixels wide has room for about one point per pixel.
//!
//! How intervals combine, over time (downsampling) and across shards (`merge`): counts (messages,
//! reconnects, faults) and the PUBACK bucket counts add up, so rates and percentiles stay exact
//! at the coarser step (percentiles are read from the summed buckets, as the report's own are);
//! `connected` is the lowest sample of the interval (a dip shows), and across shards the sum of
//! each shard's lowest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::{DeviceState, FleetMetrics};

/// The most points a timeline keeps (see the module comment for why).
pub const MAX_POINTS: usize = 720;

/// How often the sampler reads the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Bounds on what a report file may say, so a hostile one cannot make `merge` loop or
/// allocate without end: a step from 1 s to about 4 months, times within about 30 years.
const MAX_STEP_SECS: f64 = 1e7;
const MAX_SECS: f64 = 1e9;

/// One interval: what changed in it (counts) and the lowest `connected` sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Start of the interval, seconds since the run started.
    pub t: f64,
    pub connected: u64,
    pub generated: u64,
    pub acked: u64,
    pub dropped: u64,
    pub reconnects: u64,
    /// `None` when not measured (faults are counted only by an embedded emulator).
    pub faults: Option<u64>,
    /// PUBACKs received in the interval per bucket of `Timeline::puback_bounds_ms`, the last
    /// entry above the last bound.
    pub puback: Vec<u64>,
}

fn add_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
    }
}

impl Point {
    // Saturating: the counts of a report file are input, and no input may panic.
    fn add_counts(&mut self, o: &Point) {
        self.generated = self.generated.saturating_add(o.generated);
        self.acked = self.acked.saturating_add(o.acked);
        self.dropped = self.dropped.saturating_add(o.dropped);
        self.reconnects = self.reconnects.saturating_add(o.reconnects);
        self.faults = add_opt(self.faults, o.faults);
        if self.puback.len() < o.puback.len() {
            self.puback.resize(o.puback.len(), 0);
        }
        for (a, b) in self.puback.iter_mut().zip(&o.puback) {
            *a = a.saturating_add(*b);
        }
    }

    /// The next interval of the same series folded into this one.
    fn absorb(&mut self, later: &Point) {
        self.connected = self.connected.min(later.connected);
        self.add_counts(later);
    }

    /// Another shard's interval at the same time.
    fn add(&mut self, other: &Point) {
        self.connected = self.connected.saturating_add(other.connected);
        self.add_counts(other);
    }
}

/// A run's timeline: points at `step_secs` (the last may be shorter: it ends at `end_secs`).
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    /// Wall-clock start of the run, milliseconds since the Unix epoch (to line shards up).
    pub started_unix_ms: u64,
    pub step_secs: f64,
    /// Seconds since the start of the last sample.
    pub end_secs: f64,
    /// Upper bounds (ms) of the PUBACK latency buckets (the fleet's Prometheus histogram).
    pub puback_bounds_ms: Vec<f64>,
    pub points: Vec<Point>,
    /// When the run's time was up and the settle period began (faults lifted, no more
    /// readings), seconds since the start; merged, the latest shard's.
    pub settle_from_secs: Option<f64>,
}

/// The `q` quantile of one interval's buckets by nearest rank: the upper bound of the bucket
/// holding the sample of rank ceil(q n); `None` with no samples. Above the last bound it is the
/// last bound (Prometheus keeps no maximum), so it reads "at least".
pub fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let n: u64 = counts.iter().fold(0u64, |a, c| a.saturating_add(*c));
    if n == 0 {
        return None;
    }
    let rank = ((n as f64 * q).ceil() as u64).clamp(1, n);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen = c.saturating_add(seen);
        if seen >= rank {
            return bounds.get(i).or(bounds.last()).copied();
        }
    }
    bounds.last().copied()
}

impl Timeline {
    pub fn new(started_unix_ms: u64, puback_bounds_ms: Vec<f64>) -> Timeline {
        Timeline {
            started_unix_ms,
            step_secs: SAMPLE_EVERY.as_secs_f64(),
            end_secs: 0.0,
            puback_bounds_ms,
            points: vec![],
            settle_from_secs: None,
        }
    }

    fn cell(&self, t: f64) -> u64 {
        // A sample a few ms late still belongs to the interval it was taken for.
        (t / self.step_secs + 1e-6).floor().max(0.0) as u64
    }

    /// Adds the interval that ends at `end`: folded into the last point if it falls in the
    /// same step, then halved if the timeline is over its bound.
    pub fn push(&mut self, p: Point, end: f64) {
        self.end_secs = self.end_secs.max(end);
        let (cell, step) = (self.cell(p.t), self.step_secs);
        match self.points.last_mut() {
            Some(last) if (last.t / step + 1e-6).floor() as u64 == cell => last.absorb(&p),
            _ => self.points.push(p),
        }
        while self.points.len() > MAX_POINTS && self.step_secs < MAX_STEP_SECS {
            self.coarsen();
        }
    }

    /// Doubles the step: points regridded on it, neighbours folded together.
    fn coarsen(&mut self) {
        self.step_secs *= 2.0;
        let mut out: Vec<Point> = Vec::with_capacity(self.points.len() / 2 + 1);
        for p in std::mem::take(&mut self.points) {
            let cell = self.cell(p.t);
            match out.last_mut() {
                Some(last) if self.cell(last.t) == cell => last.absorb(&p),
                _ => out.push(Point { t: cell as f64 * self.step_secs, ..p }),
            }
        }
        self.points = out;
    }

    /// The report's `timeline` section: one array per column, as the charts read them, plus
    /// the PUBACK percentiles of each interval (ms).
    pub fn to_json(&self) -> Value {
        let col = |f: &dyn Fn(&Point) -> Value| Value::Array(self.points.iter().map(f).collect());
        let q = |q: f64| col(&|p| json!(quantile(&self.puback_bounds_ms, &p.puback, q)));
        json!({
            "started_unix_ms": self.started_unix_ms,
            "step_secs": self.step_secs,
            "end_secs": self.end_secs,
            "max_points": MAX_POINTS,
            "settle_from_secs": self.settle_from_secs,
            "puback_bounds_ms": self.puback_bounds_ms,
            "t": col(&|p| json!(p.t)),
            "connected": col(&|p| json!(p.connected)),
            "generated": col(&|p| json!(p.generated)),
            "acked": col(&|p| json!(p.acked)),
            "dropped": col(&|p| json!(p.dropped)),
            "reconnects": col(&|p| json!(p.reconnects)),
            "faults": col(&|p| json!(p.faults)),
            "puback_counts": col(&|p| json!(p.puback)),
            "puback_p50_ms": q(0.5),
            "puback_p90_ms": q(0.9),
            "puback_p99_ms": q(0.99),
        })
    }

    /// Reads a report's `timeline` section back; the error names the field.
    pub fn from_json(v: &Value) -> Result<Timeline, String> {
        let num =
            |k: &str| v[k].as_f64().filter(|x| x.is_finite()).ok_or_else(|| format!("timeline.{k} is not a number"));
        let step_secs = num("step_secs")?;
        if !(1.0..=MAX_STEP_SECS).contains(&step_secs) {
            return Err(format!("timeline.step_secs {step_secs} is out of range"));
        }
        let end_secs = num("end_secs")?.clamp(0.0, MAX_SECS);
        let started_unix_ms =
            v["started_unix_ms"].as_u64().ok_or_else(|| "timeline.started_unix_ms is not a number".to_owned())?;
        let bounds: Vec<f64> = serde_json::from_value(v["puback_bounds_ms"].clone())
            .map_err(|e| format!("timeline.puback_bounds_ms: {e}"))?;
        let arr = |k: &str| v[k].as_array().ok_or_else(|| format!("timeline.{k} is not an array"));
        let t = arr("t")?;
        let n = t.len();
        let u64s = |k: &str| -> Result<Vec<Option<u64>>, String> {
            let a = arr(k)?;
            if a.len() != n {
                return Err(format!("timeline.{k} has {} entries, timeline.t {n}", a.len()));
            }
            a.iter()
                .map(|x| match x {
                    Value::Null => Ok(None),
                    x => x.as_u64().map(Some).ok_or_else(|| format!("timeline.{k} holds {x}, not a count")),
                })
                .collect()
        };
        let need = |k: &str| -> Result<Vec<u64>, String> {
            u64s(k)?.into_iter().map(|x| x.ok_or_else(|| format!("timeline.{k} has a null"))).collect()
        };
        let (connected, generated, acked) = (need("connected")?, need("generated")?, need("acked")?);
        let (dropped, reconnects, faults) = (need("dropped")?, need("reconnects")?, u64s("faults")?);
        let buckets = arr("puback_counts")?;
        if buckets.len() != n {
            return Err(format!("timeline.puback_counts has {} entries, timeline.t {n}", buckets.len()));
        }
        let mut points = Vec::with_capacity(n);
        for i in 0..n {
            let t = t[i]
                .as_f64()
                .filter(|x| (0.0..=MAX_SECS).contains(x))
                .ok_or_else(|| format!("timeline.t[{i}] is not a time in seconds"))?;
            let puback: Vec<u64> =
                serde_json::from_value(buckets[i].clone()).map_err(|e| format!("timeline.puback_counts[{i}]: {e}"))?;
            if puback.len() > bounds.len() + 1 {
                return Err(format!("timeline.puback_counts[{i}] has more buckets than puback_bounds_ms"));
            }
            points.push(Point {
                t,
                connected: connected[i],
                generated: generated[i],
                acked: acked[i],
                dropped: dropped[i],
                reconnects: reconnects[i],
                faults: faults[i],
                puback,
            });
        }
        let settle_from_secs = v["settle_from_secs"].as_f64().filter(|x| (0.0..=MAX_SECS).contains(x));
        Ok(Timeline { started_unix_ms, step_secs, end_secs, puback_bounds_ms: bounds, points, settle_from_secs })
    }
}

/// One timeline for shards that ran side by side: lined up by wall-clock start on the coarsest
/// shard's step, counts and buckets summed, `connected` the sum of each shard's lowest sample
/// in the interval (see the module comment). The PUBACK buckets must be the same.
pub fn merge(parts: &[Timeline]) -> Result<Option<Timeline>, String> {
    let Some(first) = parts.first() else { return Ok(None) };
    if parts.iter().any(|p| p.puback_bounds_ms != first.puback_bounds_ms) {
        return Err("timelines with different PUBACK buckets cannot be merged".into());
    }
    let origin = parts.iter().map(|p| p.started_unix_ms).min().unwrap_or(0);
    let step = parts.iter().map(|p| p.step_secs).fold(SAMPLE_EVERY.as_secs_f64(), f64::max);
    let offset = |p: &Timeline| p.started_unix_ms.saturating_sub(origin) as f64 / 1e3;
    let mut cells: BTreeMap<u64, Point> = BTreeMap::new();
    for part in parts {
        let mut mine: BTreeMap<u64, Point> = BTreeMap::new();
        for p in &part.points {
            let cell = ((offset(part) + p.t) / step + 1e-6).floor() as u64;
            match mine.get_mut(&cell) {
                Some(c) => c.absorb(p),
                None => {
                    mine.insert(cell, Point { t: cell as f64 * step, ..p.clone() });
                }
            }
        }
        for (cell, p) in mine {
            match cells.get_mut(&cell) {
                Some(c) => c.add(&p),
                None => {
                    cells.insert(cell, p);
                }
            }
        }
    }
    let mut out = Timeline {
        started_unix_ms: origin,
        step_secs: step,
        end_secs: parts.iter().map(|p| offset(p) + p.end_secs).fold(0.0, f64::max).min(MAX_SECS),
        puback_bounds_ms: first.puback_bounds_ms.clone(),
        points: cells.into_values().collect(),
        settle_from_secs: parts.iter().filter_map(|p| p.settle_from_secs.map(|s| offset(p) + s)).reduce(f64::max),
    };
    while out.points.len() > MAX_POINTS && out.step_secs < MAX_STEP_SECS {
        out.coarsen();
    }
    Ok(Some(out))
}

/// What the sampler reads of the emulator: faults injected so far (every kind).
pub type FaultCount = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The running sampler.
pub struct Sampler {
    stop: CancellationToken,
    handle: JoinHandle<Timeline>,
}

/// Cumulative counters at one instant.
struct Reading {
    generated: u64,
    acked: u64,
    dropped: u64,
    reconnects: u64,
    faults: Option<u64>,
    /// Cumulative PUBACK bucket counts, the last one the total.
    puback: Vec<u64>,
}

fn read(m: &FleetMetrics, faults: Option<&FaultCount>) -> Reading {
    use prometheus::core::Collector;
    let mut puback = Vec::new();
    for family in m.puback_seconds.collect() {
        for metric in family.get_metric() {
            let h = metric.get_histogram();
            puback.extend(h.get_bucket().iter().map(|b| b.cumulative_count()));
            puback.push(h.get_sample_count());
        }
    }
    Reading {
        generated: m.telemetry_generated.get(),
        acked: m.telemetry_acked.get(),
        dropped: m.dropped_count(),
        reconnects: m.reconnect_counts().values().filter_map(Value::as_u64).sum(),
        faults: faults.map(|f| f()),
        puback,
    }
}

fn puback_bounds_ms(m: &FleetMetrics) -> Vec<f64> {
    use prometheus::core::Collector;
    let mut out = Vec::new();
    for family in m.puback_seconds.collect() {
        for metric in family.get_metric() {
            out.extend(metric.get_histogram().get_bucket().iter().map(|b| b.upper_bound() * 1e3));
        }
    }
    out
}

/// Per-bucket counts of what arrived between two cumulative readings.
fn bucket_deltas(now: &[u64], before: &[u64]) -> Vec<u64> {
    let d: Vec<u64> = now.iter().zip(before).map(|(a, b)| a.saturating_sub(*b)).collect();
    // Cumulative to per bucket: each bucket less the one below it.
    (0..d.len()).map(|i| if i == 0 { d[0] } else { d[i].saturating_sub(d[i - 1]) }).collect()
}

impl Sampler {
    /// Starts sampling `m` once a second; `faults` reads the embedded emulator's count.
    pub fn start(m: Arc<FleetMetrics>, faults: Option<FaultCount>) -> Sampler {
        let stop = CancellationToken::new();
        let started_unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let handle = tokio::spawn(sample(m, faults, started_unix_ms, stop.clone()));
        Sampler { stop, handle }
    }

    /// Takes a last sample and returns the timeline.
    pub async fn finish(self) -> Option<Timeline> {
        self.stop.cancel();
        self.handle.await.ok()
    }
}

async fn sample(
    m: Arc<FleetMetrics>,
    faults: Option<FaultCount>,
    started_unix_ms: u64,
    stop: CancellationToken,
) -> Timeline {
    let t0 = tokio::time::Instant::now();
    let mut timeline = Timeline::new(started_unix_ms, puback_bounds_ms(&m));
    let mut before = read(&m, faults.as_ref());
    let mut from = 0.0;
    let mut tick = tokio::time::interval_at(t0 + SAMPLE_EVERY, SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        let now = read(&m, faults.as_ref());
        let at = t0.elapsed().as_secs_f64();
        let point = Point {
            t: from,
            connected: m.state_count(DeviceState::Connected).max(0) as u64,
            generated: now.generated.saturating_sub(before.generated),
            acked: now.acked.saturating_sub(before.acked),
            dropped: now.dropped.saturating_sub(before.dropped),
            reconnects: now.reconnects.saturating_sub(before.reconnects),
            faults: now.faults.map(|f| f.saturating_sub(before.faults.unwrap_or(0))),
            puback: bucket_deltas(&now.puback, &before.puback),
        };
        timeline.push(point, at);
        (before, from) = (now, at);
        if last {
            return timeline;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t: f64, connected: u64, generated: u64) -> Point {
        Point {
            t,
            connected,
            generated,
            acked: generated,
            dropped: 0,
            reconnects: 1,
            faults: Some(2),
            puback: vec![generated, 0, 0],
        }
    }

    #[test]
    fn a_long_run_is_downsampled_within_the_bound_and_nothing_is_lost() {
        let mut tl = Timeline::new(0, vec![1.0, 2.0]);
        let secs = 24 * 3600;
        for s in 0..secs {
            // A dip in connections for one second in the middle of the run.
            let connected = if s == secs / 2 { 3 } else { 10 };
            tl.push(point(s as f64, connected, 5), s as f64 + 1.0);
        }
        assert!(tl.points.len() <= MAX_POINTS && tl.points.len() >= MAX_POINTS / 2, "{}", tl.points.len());
        assert_eq!(tl.step_secs, 128.0, "doubled until 24 h fit: 86,400 s / 128 s = 675 points");
        // Counts are summed, never lost or invented.
        assert_eq!(tl.points.iter().map(|p| p.generated).sum::<u64>(), 5 * secs as u64);
        assert_eq!(tl.points.iter().map(|p| p.faults.unwrap()).sum::<u64>(), 2 * secs as u64);
        assert_eq!(tl.points.iter().map(|p| p.puback[0]).sum::<u64>(), 5 * secs as u64);
        // The dip survives as the lowest sample of its interval.
        assert_eq!(tl.points.iter().map(|p| p.connected).min(), Some(3));
        assert_eq!(tl.points.iter().filter(|p| p.connected == 3).count(), 1);
        // Points lie on the grid, in order.
        assert!(tl.points.windows(2).all(|w| w[1].t - w[0].t == tl.step_secs));
        assert_eq!(tl.end_secs, secs as f64);
        // The JSON stays small: a 24 h run's timeline in well under 150 KB.
        let text = tl.to_json().to_string();
        assert!(text.len() < 150_000, "{} bytes", text.len());
    }

    #[test]
    fn a_short_run_keeps_every_second() {
        let mut tl = Timeline::new(0, vec![1.0]);
        for s in 0..10 {
            // Ticks run a few milliseconds late.
            tl.push(point(s as f64 + 0.003, 10, 1), s as f64 + 1.003);
        }
        assert_eq!((tl.points.len(), tl.step_secs), (10, 1.0));
    }

    #[test]
    fn the_json_reads_back_and_hostile_files_are_refused() {
        let mut tl = Timeline::new(1_700_000_000_000, vec![1.0, 2.5]);
        for s in 0..5 {
            tl.push(point(s as f64, 4, 3), s as f64 + 1.0);
        }
        tl.settle_from_secs = Some(4.5);
        let v = tl.to_json();
        assert_eq!(Timeline::from_json(&v).unwrap(), tl);
        assert_eq!(v["puback_p99_ms"][0], 1.0);
        let mut bad = v.clone();
        bad["connected"] = json!([1]);
        assert!(Timeline::from_json(&bad).unwrap_err().contains("timeline.connected has 1 entries"));
        let mut bad = v.clone();
        bad["step_secs"] = json!(0);
        assert!(Timeline::from_json(&bad).is_err());
        let mut bad = v.clone();
        bad["t"][2] = json!(-5);
        assert!(Timeline::from_json(&bad).unwrap_err().contains("timeline.t[2]"));
        assert!(Timeline::from_json(&json!("x")).is_err());
    }

    #[test]
    fn shards_merge_on_the_wall_clock_with_counts_summed() {
        let mut a = Timeline::new(10_000, vec![1.0, 2.0]);
        let mut b = Timeline::new(12_000, vec![1.0, 2.0]);
        for s in 0..6 {
            a.push(point(s as f64, 10, 4), s as f64 + 1.0);
            b.push(point(s as f64, 5, 1), s as f64 + 1.0);
        }
        let m = merge(&[a.clone(), b.clone()]).unwrap().unwrap();
        assert_eq!(m.started_unix_ms, 10_000);
        assert_eq!(m.end_secs, 8.0, "b started 2 s later and ran 6 s");
        assert_eq!(m.points.len(), 8);
        assert_eq!(m.points.iter().map(|p| p.generated).sum::<u64>(), 6 * 4 + 6);
        // Seconds 2 to 5 have both shards; 0 and 1 only a; 6 and 7 only b.
        assert_eq!(m.points.iter().map(|p| p.connected).collect::<Vec<_>>(), [10, 10, 15, 15, 15, 15, 5, 5]);
        assert_eq!(m.points[3].puback, vec![5, 0, 0]);
        // A coarser shard sets the step.
        let mut c = b.clone();
        c.coarsen();
        let m = merge(&[a.clone(), c]).unwrap().unwrap();
        assert_eq!(m.step_secs, 2.0);
        assert_eq!(m.points.iter().map(|p| p.generated).sum::<u64>(), 6 * 4 + 6);
        let other = Timeline::new(0, vec![5.0]);
        assert!(merge(&[a, other]).is_err());
        assert_eq!(merge(&[]).unwrap(), None);
    }

    #[test]
    fn interval_percentiles_come_from_the_buckets() {
        let bounds = [1.0, 2.5, 5.0];
        assert_eq!(quantile(&bounds, &[90, 9, 1, 0], 0.5), Some(1.0));
        assert_eq!(quantile(&bounds, &[90, 9, 1, 0], 0.99), Some(2.5));
        assert_eq!(quantile(&bounds, &[0, 0, 0, 3], 0.5), Some(5.0), "above the last bound: at least it");
        assert_eq!(quantile(&bounds, &[0, 0, 0, 0], 0.5), None);
        assert_eq!(bucket_deltas(&[5, 7, 9, 10], &[1, 1, 2, 2]), vec![4, 2, 1, 1]);
        // Counts from a hostile file saturate rather than overflow.
        assert_eq!(quantile(&bounds, &[u64::MAX, u64::MAX, 0, 0], 0.99), Some(1.0));
    }
}
