//! Running one service call on many identities with bounded concurrency, and the latency summary
//! a method storm or a desired-property sweep is judged by: p50/p90/p99/max, failures by status.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

/// The outcome of one call: Ok, or a failure label such as `hub_404` or `device_500`.
pub type Outcome = Result<(), String>;

#[derive(Debug, Default)]
pub struct Summary {
    pub calls: usize,
    pub ok: usize,
    pub failures: BTreeMap<String, usize>,
    /// Latencies of every call (failed ones too: a timeout is part of what the caller waits).
    pub latencies_ms: Vec<f64>,
    pub elapsed: Duration,
}

impl Summary {
    fn quantile(&self, q: f64) -> Option<f64> {
        crate::metrics::nearest_rank(&self.latencies_ms, q)
    }

    pub fn failed(&self) -> usize {
        self.calls - self.ok
    }

    pub fn to_json(&self) -> Value {
        json!({
            "calls": self.calls,
            "ok": self.ok,
            "failed": self.failed(),
            "failures": self.failures,
            "elapsed_secs": self.elapsed.as_secs_f64(),
            "per_sec": self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9),
            "latency_ms": {
                "p50": self.quantile(0.5),
                "p90": self.quantile(0.9),
                "p99": self.quantile(0.99),
                "max": self.latencies_ms.last(),
            },
        })
    }

    pub fn to_text(&self) -> String {
        let ms = |q: Option<f64>| q.map_or("-".to_owned(), |x| format!("{x:.1} ms"));
        let mut out = format!(
            "{} calls in {:.1} s ({:.0}/s): {} ok, {} failed\nlatency: p50 {}, p90 {}, p99 {}, max {}",
            self.calls,
            self.elapsed.as_secs_f64(),
            self.calls as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.ok,
            self.failed(),
            ms(self.quantile(0.5)),
            ms(self.quantile(0.9)),
            ms(self.quantile(0.99)),
            ms(self.latencies_ms.last().copied()),
        );
        for (label, n) in &self.failures {
            out.push_str(&format!("\n  {label}: {n}"));
        }
        out
    }
}

/// Calls `op` on every target, at most `concurrency` at a time.
pub async fn run<T, F, Fut>(targets: Vec<T>, concurrency: usize, op: F) -> Summary
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let t0 = Instant::now();
    let results: Vec<(Duration, Outcome)> = futures_util::stream::iter(targets)
        .map(|t| {
            let call = op(t);
            async move {
                let started = Instant::now();
                let r = call.await;
                (started.elapsed(), r)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut s = Summary { calls: results.len(), elapsed: t0.elapsed(), ..Default::default() };
    for (took, r) in results {
        s.latencies_ms.push(took.as_secs_f64() * 1e3);
        match r {
            Ok(()) => s.ok += 1,
            Err(label) => *s.failures.entry(label).or_default() += 1,
        }
    }
    s.latencies_ms.sort_by(f64::total_cmp);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_failures_by_label_and_bounds_concurrency() {
        let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s = run((0..50).collect(), 4, |i: u32| {
            let (live, peak) = (live.clone(), peak.clone());
            async move {
                let now = live.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                peak.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                tokio::task::yield_now().await;
                live.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                if i.is_multiple_of(10) { Err("hub_404".to_owned()) } else { Ok(()) }
            }
        })
        .await;
        assert_eq!((s.calls, s.ok, s.failed()), (50, 45, 5));
        assert_eq!(s.failures["hub_404"], 5);
        assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 4);
        assert!(s.to_text().contains("hub_404: 5"));
        assert_eq!(s.to_json()["failed"], 5);
    }
}
