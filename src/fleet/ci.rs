//! CI mode: run the fleet for a fixed time, then judge it. While it runs, a watcher notes when
//! every identity first connected and an optional probe invokes a direct method on random
//! identities from the service side (its latency is what a back end sees). At the end the faults
//! are lifted, devices stop taking readings, and the fleet gets a settle period to reconnect and
//! drain its buffers; then the devices stop, the hub is asked which sequence numbers arrived, and
//! every threshold is checked. With the end-to-end check (`e2e.rs`), a reader on the hub's Event
//! Hubs-compatible endpoint counts and times the messages that reached the back end, and is given
//! `[ci.end_to_end] drain` to catch up after the devices stop. The JSON report goes to stdout
//! (and a file); the exit status is the verdict.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::RunningFleet;
use crate::config::ci::{CiConfig, Probe};
use crate::metrics::{DeviceState, FleetMetrics, nearest_rank};
use crate::service::{ServiceClient, method_outcome};

/// An identity the method probe may call.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub device_id: Arc<str>,
    pub module_id: Option<Arc<str>>,
    pub behaviour: Arc<crate::scenario::model::Behaviour>,
}

#[derive(Default)]
struct ProbeStats {
    ok_ms: Vec<f64>,
    failures: std::collections::BTreeMap<String, u64>,
}

/// The verdict and the report.
pub struct Outcome {
    pub pass: bool,
    pub report: Value,
}

async fn watch_connected(m: Arc<FleetMetrics>, total: usize, stop: CancellationToken) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if m.ever_connected.get() as usize >= total {
            return Some(t0.elapsed());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.cancelled() => return None,
        }
    }
}

async fn run_probe(
    client: ServiceClient,
    probe: Probe,
    ids: Arc<Vec<ProbeTarget>>,
    stats: Arc<Mutex<ProbeStats>>,
    stop: CancellationToken,
) {
    let inflight = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tick = tokio::time::interval(probe.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        if ids.is_empty() {
            continue;
        }
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            *stats.lock().unwrap_or_else(|p| p.into_inner()).failures.entry("skipped_busy".into()).or_default() += 1;
            continue;
        };
        let target = ids[rand::random_range(0..ids.len())].clone();
        let (device, module) = (target.device_id, target.module_id);
        let (client, probe, stats) = (client.clone(), probe.clone(), stats.clone());
        calls.spawn(async move {
            let t0 = Instant::now();
            let r = client
                .invoke(
                    &device,
                    module.as_deref(),
                    &probe.method,
                    &probe.payload,
                    probe.response_timeout,
                    Duration::ZERO,
                )
                .await;
            let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
            match method_outcome(&r) {
                Ok(()) => s.ok_ms.push(t0.elapsed().as_secs_f64() * 1e3),
                Err(label) => *s.failures.entry(label).or_default() += 1,
            }
            drop(permit);
        });
    }
    while calls.join_next().await.is_some() {}
}

/// Where the messages the hub does not hold went missing. Every written message was either
/// acknowledged (PUBACK) or was still in doubt when the fleet stopped (`unacked_at_shutdown`);
/// the emulator counts the unique sequence numbers it holds. A message the hub acknowledged and
/// no longer holds was lost by the hub (it crashed, restarted with an empty memory, or the
/// identity was deleted and created again); one never acknowledged and not at the hub was lost
/// by the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    /// Written messages the hub does not hold: `by_fleet + by_hub`.
    pub missing: u64,
    pub by_fleet: u64,
    /// Acknowledged by the hub, then lost by the hub. From totals this is exact when nothing
    /// was in doubt at the end; otherwise in-doubt messages that did arrive can hide as many
    /// hub-side losses, which are then counted against the fleet (never the other way round).
    pub by_hub: u64,
    /// Written and never acknowledged when the fleet stopped.
    pub in_doubt: u64,
}

impl Loss {
    /// `written`: generated less what the buffer policy dropped unwritten; `acked`: messages
    /// with a PUBACK; `at_hub`: the emulator's unique arrivals for this run.
    pub fn split(written: u64, acked: u64, at_hub: u64) -> Loss {
        let missing = written.saturating_sub(at_hub);
        // Arrivals are acknowledged messages the hub kept plus in-doubt ones that made it, so
        // at least `acked - at_hub` acknowledged messages are gone from the hub.
        let by_hub = acked.saturating_sub(at_hub).min(missing);
        Loss { missing, by_fleet: missing - by_hub, by_hub, in_doubt: written.saturating_sub(acked) }
    }
}

struct Check {
    name: &'static str,
    value: Value,
    limit: Value,
    pass: Option<bool>,
}

/// Runs the fleet for the configured time, then stops it and judges it. `interrupted` ends the
/// run early (the report says so, and it fails).
pub async fn run(
    mut fleet: RunningFleet,
    ci: &CiConfig,
    interrupted: impl std::future::Future<Output = ()>,
) -> Outcome {
    let m = fleet.shared.metrics.clone();
    let total = fleet.identities();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let watcher = tokio::spawn(watch_connected(m.clone(), total, stop.clone()));
    let faults: Option<super::timeline::FaultCount> = fleet.hub.as_ref().map(|h| {
        let state = h.state.clone();
        Arc::new(move || state.metrics.faults_injected_total()) as super::timeline::FaultCount
    });
    let sampler = super::timeline::Sampler::start(m.clone(), faults);
    let stats = Arc::new(Mutex::new(ProbeStats::default()));
    // Nothing to count without sequence stamps.
    let e2e_config = if fleet.shared.settings.sequence_numbers {
        super::e2e::endpoint(&ci.end_to_end, fleet.hub_info.as_ref(), fleet.hub.is_some(), fleet.shared.tls.clone())
    } else {
        Ok(None)
    };
    let (e2e, e2e_problem) = match e2e_config {
        Ok(Some(c)) => (Some(super::e2e::Reader::start(c, fleet.shared.run_id.clone(), m.clone())), None),
        Ok(None) => (None, None),
        Err(why) => (None, Some(why)),
    };
    let probe = match (&ci.probe, fleet.shared.service.clone()) {
        (Some(p), Some(client)) => {
            // Only identities whose scenario answers the method: the probe measures the path, not
            // how often an unknown command is refused.
            let targets: Vec<ProbeTarget> = fleet
                .probe_targets()
                .into_iter()
                .filter(|t| t.behaviour.commands.iter().any(|c| c.name == p.method))
                .collect();
            if targets.is_empty() {
                tracing::warn!(method = %p.method, "no identity answers the probe's method");
            }
            Some(tokio::spawn(run_probe(client, p.clone(), Arc::new(targets), stats.clone(), stop.clone())))
        }
        (Some(_), None) => {
            tracing::warn!("no service connection string: the method probe is off");
            None
        }
        _ => None,
    };
    let finished = tokio::select! {
        _ = tokio::time::sleep(ci.duration) => true,
        _ = interrupted => false,
    };
    stop.cancel();
    if let Some(p) = probe {
        let _ = p.await;
    }
    let all_connected_after = watcher.await.ok().flatten();

    // Lift the faults, then give the fleet its settle period.
    if let Some(h) = &fleet.hub {
        h.state.set_faults(Default::default());
        h.state.faults.start_outage(Duration::ZERO);
    } else if let (true, Some(c)) = (ci.lift_faults, &fleet.shared.service) {
        // An emulator elsewhere; a real hub answers 404, which is fine.
        let _ = c.request(reqwest::Method::PUT, "/emulator/faults", Some(&json!({})), &[]).await;
        let _ = c.request(reqwest::Method::POST, "/emulator/faults/outage", Some(&json!({"seconds": 0})), &[]).await;
    }
    // Settle: no more readings; wait until every identity is connected and every buffered
    // message acknowledged. A connection the hub dropped silently still looks connected to its
    // device until keep-alive notices, but its messages stay unacknowledged, so an empty outbox
    // everywhere is what proves the fleet recovered.
    fleet.shared.quiesce.store(true, std::sync::atomic::Ordering::Relaxed);
    let settle_start = Instant::now();
    let settled =
        |m: &FleetMetrics| m.state_count(DeviceState::Connected) as usize >= total && m.telemetry_queued.get() == 0;
    while finished && !settled(&m) && settle_start.elapsed() < ci.settle {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained = settled(&m);
    let connected_at_end = m.state_count(DeviceState::Connected).max(0) as u64;
    let settled_in = settle_start.elapsed();
    // The timeline ends here: once the devices are told to stop, "connected" falls to zero,
    // which says nothing about the run. A settled fleet has nothing left to send.
    let timeline = sampler.finish().await.map(|mut t| {
        t.settle_from_secs = Some((settle_start - started).as_secs_f64());
        t
    });
    fleet.stop_identities().await;

    let generated = m.telemetry_generated.get();
    let acked = m.telemetry_acked.get();
    // The back end may lag the hub: let the reader catch up with what the hub acknowledged.
    let e2e = match e2e {
        Some(reader) => {
            let drain_start = Instant::now();
            while reader.running() && reader.unique() < acked && drain_start.elapsed() < ci.end_to_end.drain {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(reader.finish().await)
        }
        None => None,
    };
    let queued = m.telemetry_queued.get().max(0) as u64;
    let never_written = m.dropped("buffer_full") + m.dropped("shutdown");
    let dropped = m.dropped_count();
    let unaccounted = generated.saturating_sub(acked + dropped + queued);
    // Without sequence stamps the hub has nothing to count, and a summary of zero arrivals
    // would read as everything lost.
    let hub_side = match &fleet.shared.service {
        Some(c) if fleet.shared.settings.sequence_numbers => c.sequence_summary(&fleet.shared.run_id).await.ok(),
        _ => None,
    };
    let hub_unique = hub_side.as_ref().and_then(|h| h["unique"].as_u64());
    let written = generated.saturating_sub(never_written);
    let loss = hub_unique.map(|u| Loss::split(written, acked, u));
    // What reached the back end, split the same way: acknowledged and never read is the hub's
    // (or its endpoint's) loss. Against Azure this is the only count of arrivals there is.
    // What the emulator's IoT Edge routes sent only to module inputs never reaches the endpoint
    // by design, so it is not expected there (Azure has no such count: with fleet routing those
    // messages are never generated as telemetry).
    let routed_away = hub_side.as_ref().and_then(|h| h["routedAway"].as_u64()).unwrap_or(0);
    let backend_loss = e2e
        .as_ref()
        .filter(|s| s.error.is_none())
        .map(|s| Loss::split(written.saturating_sub(routed_away), acked.saturating_sub(routed_away), s.unique));
    let loss = loss.or(backend_loss);
    let lost = loss.map(|l| l.by_fleet);
    let lost_by_hub = loss.map(|l| l.by_hub);

    let (p50, p99, probes_ok, probe_failures, method_hist) = {
        let s = stats.lock().unwrap_or_else(|p| p.into_inner());
        let mut v = s.ok_ms.clone();
        v.sort_by(f64::total_cmp);
        let hist = super::report::Histogram::from_samples(super::report::method_bounds_ms(), &v);
        (nearest_rank(&v, 0.5), nearest_rank(&v, 0.99), v.len() as u64, s.failures.clone(), hist)
    };
    let probes_failed: u64 = probe_failures.iter().filter(|(k, _)| *k != "skipped_busy").map(|(_, n)| n).sum();
    let operations = generated + probes_ok + probes_failed;
    let error_rate =
        if operations == 0 { 0.0 } else { (m.dropped("buffer_full") + probes_failed) as f64 / operations as f64 };
    let stuck = (total as u64).saturating_sub(connected_at_end);

    let t = &ci.thresholds;
    let le = |v: Option<f64>, limit: Option<f64>| match (v, limit) {
        (_, None) => None,
        (None, Some(_)) => Some(false),
        (Some(v), Some(l)) => Some(v <= l),
    };
    let checks = [
        Check { name: "finished", value: json!(finished), limit: json!(true), pass: Some(finished) },
        Check {
            name: "lost",
            value: json!(lost),
            limit: json!(t.max_lost),
            // Only an emulator can count arrivals; against Azure this check cannot be made.
            pass: t.max_lost.and_then(|l| lost.map(|x| x <= l)),
        },
        Check {
            name: "lost_by_hub",
            value: json!(lost_by_hub),
            limit: json!(t.max_lost.filter(|_| ci.judge_hub_loss)),
            // The hub's own losses are the hub's, unless the config asks to judge them too.
            pass: t.max_lost.filter(|_| ci.judge_hub_loss).and_then(|l| lost_by_hub.map(|x| x <= l)),
        },
        Check {
            name: "unaccounted",
            value: json!(unaccounted),
            limit: json!(t.max_unaccounted),
            pass: t.max_unaccounted.map(|l| unaccounted <= l),
        },
        Check {
            name: "dropped",
            value: json!(dropped),
            limit: json!(t.max_dropped),
            pass: t.max_dropped.map(|l| dropped <= l),
        },
        Check { name: "stuck", value: json!(stuck), limit: json!(t.max_stuck), pass: t.max_stuck.map(|l| stuck <= l) },
        Check {
            name: "all_connected_secs",
            value: json!(all_connected_after.map(|d| d.as_secs_f64())),
            limit: json!(t.all_connected_within.map(|d| d.as_secs_f64())),
            pass: le(all_connected_after.map(|d| d.as_secs_f64()), t.all_connected_within.map(|d| d.as_secs_f64())),
        },
        Check {
            name: "method_p99_ms",
            value: json!(p99),
            limit: json!(t.method_p99.map(|d| d.as_secs_f64() * 1e3)),
            pass: le(p99, t.method_p99.map(|d| d.as_secs_f64() * 1e3)),
        },
        Check {
            name: "e2e_reader",
            value: json!(e2e_problem.clone().or_else(|| e2e.as_ref().and_then(|s| s.error.clone()))),
            limit: Value::Null,
            // Asked for (or on by default) and not reading: the run cannot be judged end to end.
            pass: (e2e.is_some() || e2e_problem.is_some())
                .then(|| e2e_problem.is_none() && e2e.as_ref().is_some_and(|s| s.error.is_none())),
        },
        Check {
            name: "e2e_missing",
            value: json!(backend_loss.map(|l| l.by_hub)),
            limit: json!(ci.end_to_end.max_missing.filter(|_| e2e.is_some())),
            pass: ci
                .end_to_end
                .max_missing
                .filter(|_| e2e.is_some())
                .map(|l| backend_loss.is_some_and(|b| b.by_hub <= l)),
        },
        Check {
            name: "e2e_enqueued_p99_ms",
            value: json!(e2e.as_ref().and_then(|s| s.enqueued_ms.quantile(0.99))),
            limit: json!(ci.end_to_end.enqueued_p99.map(|d| d.as_secs_f64() * 1e3)),
            pass: le(
                e2e.as_ref().and_then(|s| s.enqueued_ms.quantile(0.99)),
                ci.end_to_end.enqueued_p99.map(|d| d.as_secs_f64() * 1e3),
            ),
        },
        Check {
            name: "e2e_read_p99_ms",
            value: json!(e2e.as_ref().and_then(|s| s.read_ms.quantile(0.99))),
            limit: json!(ci.end_to_end.read_p99.map(|d| d.as_secs_f64() * 1e3)),
            pass: le(
                e2e.as_ref().and_then(|s| s.read_ms.quantile(0.99)),
                ci.end_to_end.read_p99.map(|d| d.as_secs_f64() * 1e3),
            ),
        },
        Check {
            name: "error_rate",
            value: json!(error_rate),
            limit: json!(t.max_error_rate),
            pass: t.max_error_rate.map(|l| error_rate <= l),
        },
    ];
    let pass = checks.iter().all(|c| c.pass != Some(false));
    let mut report = json!({
        "pass": pass,
        "run_id": &*fleet.shared.run_id,
        "duration_secs": started.elapsed().as_secs_f64(),
        "identities": total,
        "connected_at_end": connected_at_end,
        "settled_secs": settled_in.as_secs_f64(),
        "settled": drained,
        "telemetry": {
            "generated": generated,
            "acked": acked,
            "sent": m.telemetry_sent.get(),
            "retransmits": m.telemetry_retransmits.get(),
            "queued": queued,
            "paused": m.telemetry_paused.get(),
            "dropped": FleetMetrics::DROP_REASONS.iter().map(|r| (r.to_string(), json!(m.dropped(r)))).collect::<serde_json::Map<_, _>>(),
            "hub": hub_side.map(|h| json!({
                "unique": h["unique"], "duplicates": h["duplicates"], "gaps": h["gaps"], "identities": h["identities"],
                "routed_away": h["routedAway"],
            })),
            "lost": lost,
            "lost_by_hub": lost_by_hub,
            "missing_at_hub": loss.map(|l| l.missing),
            "in_doubt_at_end": loss.map(|l| l.in_doubt),
        },
        "end_to_end": e2e.as_ref().map(|s| {
            let mut v = s.to_json();
            if let Some(l) = backend_loss {
                v["missing"] = json!(l.missing);
                v["acked_not_read"] = json!(l.by_hub);
                v["never_acked_not_read"] = json!(l.by_fleet);
            }
            v
        }).or_else(|| e2e_problem.as_ref().map(|p| json!({"error": p}))),
        "methods": {
            "probes_ok": probes_ok,
            "failures": probe_failures,
            "p50_ms": p50,
            "p99_ms": p99,
        },
        "reconnects": m.reconnect_counts(),
        "hub_faults": fleet.hub.as_ref().map(|h| h.state.metrics.faults_summary()),
        "checks": checks.iter().map(|c| json!({
            "name": c.name, "value": c.value, "limit": c.limit,
            "result": match c.pass { Some(true) => "pass", Some(false) => "fail", None => "not checked" },
        })).collect::<Vec<_>>(),
    });
    report["errors"] = top_errors(&fleet.shared.failures, &report);
    report["timeline"] = timeline.map_or(Value::Null, |t| t.to_json());
    // The buckets behind the percentiles, so `fleetsim report merge` can compute fleet-wide ones.
    report["histograms"] = json!({
        "method_ms": method_hist,
        "puback_seconds": super::report::Histogram::from_prometheus(&m.puback_seconds),
        "e2e_enqueued_ms": e2e.as_ref().map(|s| &s.enqueued_ms),
        "e2e_read_ms": e2e.as_ref().map(|s| &s.read_ms),
    });
    fleet.shutdown().await;
    Outcome { pass, report }
}

/// How much of each error's first example the report keeps.
const EXAMPLE_CHARS: usize = 400;

/// Cuts `s` to at most `n` characters (never inside one).
pub fn shorten(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// The report's `errors`: what went wrong, most frequent first, as `{source, kind, count,
/// example, device}`: provisioning and connection failures by kind (with the first one's cause
/// and device), failed method probes by status, dropped telemetry by reason, and the end-to-end
/// reader's error. Causes never hold a key or token (`device::failures`).
fn top_errors(failures: &crate::device::failures::Failures, report: &Value) -> Value {
    let mut out: Vec<Value> = failures
        .totals()
        .into_iter()
        .map(|(kind, seen)| {
            json!({"source": seen.stage, "kind": kind, "count": seen.count,
                   "example": shorten(&seen.detail, EXAMPLE_CHARS), "device": seen.device})
        })
        .collect();
    for (kind, n) in report["methods"]["failures"].as_object().into_iter().flatten() {
        out.push(json!({"source": "method_probe", "kind": kind, "count": n}));
    }
    for (reason, n) in report["telemetry"]["dropped"].as_object().into_iter().flatten() {
        if n.as_u64().unwrap_or(0) > 0 {
            out.push(json!({"source": "telemetry", "kind": format!("dropped_{reason}"), "count": n}));
        }
    }
    if let Some(e) = report["end_to_end"]["error"].as_str() {
        out.push(json!({"source": "end_to_end", "kind": "reader", "count": 1, "example": shorten(e, EXAMPLE_CHARS)}));
    }
    super::report::sort_errors(&mut out);
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::Loss;

    #[test]
    fn errors_are_listed_most_frequent_first_and_examples_are_cut_on_a_character() {
        let f = crate::device::failures::Failures::default();
        for _ in 0..3 {
            f.report("t", "d1", "connect", crate::device::failures::connack(5, "refused".into()));
        }
        f.report("t", "d2", "provisioning", crate::device::failures::network("é".repeat(1000)));
        let report = serde_json::json!({
            "methods": {"failures": {"504": 7}},
            "telemetry": {"dropped": {"buffer_full": 2, "shutdown": 0}},
            "end_to_end": {"error": "refused"},
        });
        let e = super::top_errors(&f, &report);
        let kinds: Vec<&str> = e.as_array().unwrap().iter().map(|x| x["kind"].as_str().unwrap()).collect();
        // Equal counts by source: end_to_end before provisioning.
        assert_eq!(kinds, ["504", "connack_5", "dropped_buffer_full", "reader", "network"]);
        assert_eq!(e[1]["device"], "d1");
        assert_eq!(e[4]["example"].as_str().unwrap().chars().count(), super::EXAMPLE_CHARS + 3);
    }

    #[test]
    fn nothing_missing_is_nobodys_loss() {
        assert_eq!(Loss::split(1000, 1000, 1000), Loss { missing: 0, by_fleet: 0, by_hub: 0, in_doubt: 0 });
        // In doubt at the end, yet at the hub (the PUBACK was lost): not lost either.
        assert_eq!(Loss::split(1000, 990, 1000), Loss { missing: 0, by_fleet: 0, by_hub: 0, in_doubt: 10 });
    }

    #[test]
    fn what_a_crashed_hub_had_acknowledged_is_the_hubs_loss() {
        // The run: 962 acknowledged before the SIGKILL, everything since held.
        let l = Loss::split(5000, 5000, 5000 - 962);
        assert_eq!((l.missing, l.by_hub, l.by_fleet), (962, 962, 0));
    }

    #[test]
    fn what_was_never_acknowledged_and_never_arrived_is_the_fleets_loss() {
        let l = Loss::split(1000, 990, 990);
        assert_eq!((l.missing, l.by_hub, l.by_fleet, l.in_doubt), (10, 0, 10, 10));
    }

    #[test]
    fn both_at_once_split_and_doubt_counts_against_the_fleet() {
        // 100 acknowledged then lost by the hub, 10 in doubt of which none arrived.
        let l = Loss::split(1000, 990, 890);
        assert_eq!((l.missing, l.by_hub, l.by_fleet), (110, 100, 10));
        // The same, but 4 of the 10 in doubt did arrive: from totals 4 hub losses hide behind them.
        let l = Loss::split(1000, 990, 894);
        assert_eq!((l.missing, l.by_hub, l.by_fleet), (106, 96, 10));
        assert_eq!(l.by_hub + l.by_fleet, l.missing);
    }

    #[test]
    fn more_arrivals_than_writes_is_no_loss() {
        assert_eq!(Loss::split(10, 10, 12), Loss { missing: 0, by_fleet: 0, by_hub: 0, in_doubt: 0 });
    }
}
