//! Fault injection: the failures a real IoT Hub and DPS produce under load or during incidents,
//! made on purpose so that a fleet (ours, or anyone's SDK) can be shown to survive them. Set at
//! start from the `[faults]` table of the hub config and changed at run time through
//! `/emulator/faults`. Every fault is off by default; rates are probabilities per event.

use std::sync::{Mutex, RwLock};
use std::time::Duration;

use crate::hub::clock::Instant;
use serde::{Deserialize, Serialize};

/// How an injected connection drop looks to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DropMode {
    /// The hub closes the TCP connection (the device sees end of stream at once).
    #[default]
    Close,
    /// The hub stops answering and keeps the socket open, as a vanished NAT mapping does: only
    /// the device's own keep-alive can notice.
    Silent,
}

/// Every fault knob. Serialized as the body of `GET /emulator/faults`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Every `drop_every_secs`, close this fraction of live device connections (0 to 1).
    pub drop_fraction: f64,
    pub drop_every_secs: u64,
    pub drop_mode: DropMode,
    /// Every this many seconds, close every device connection at once (a reconnect storm).
    pub storm_every_secs: u64,
    /// Every `outage_every_secs`, refuse new connections for `outage_secs` (CONNACK 3).
    pub outage_every_secs: u64,
    pub outage_secs: u64,
    /// Accepted device connects per second, hub-wide, like an S1 unit's throttle; the excess is
    /// refused with CONNACK 3. 0 is unlimited.
    pub connects_per_sec: u32,
    /// Each telemetry PUBACK is held back this long.
    pub puback_delay_ms: u64,
    /// Fraction of twin GETs and reported PATCHes answered with `twin_error_status` instead.
    pub twin_error_rate: f64,
    pub twin_error_status: u16,
    /// Fraction of direct method requests never passed to the device (the caller times out).
    pub method_drop_rate: f64,
    /// Fraction of DPS register and poll requests answered 429 with `dps_retry_after_secs`.
    pub dps_throttle_rate: f64,
    pub dps_retry_after_secs: u64,
    /// Overrides the DPS assignment delay (slow assignments); `None` keeps the configured one.
    pub dps_assignment_delay_ms: Option<u64>,
    /// Connections are closed as expired this long after CONNECT whatever the token says,
    /// forcing devices to renew early. 0 is off.
    pub token_lifetime_secs: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            drop_fraction: 0.0,
            drop_every_secs: 60,
            drop_mode: DropMode::Close,
            storm_every_secs: 0,
            outage_every_secs: 0,
            outage_secs: 0,
            connects_per_sec: 0,
            puback_delay_ms: 0,
            twin_error_rate: 0.0,
            twin_error_status: 429,
            method_drop_rate: 0.0,
            dps_throttle_rate: 0.0,
            dps_retry_after_secs: 2,
            dps_assignment_delay_ms: None,
            token_lifetime_secs: 0,
        }
    }
}

impl FaultConfig {
    /// Every problem, one per line.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for (name, v) in [
            ("drop_fraction", self.drop_fraction),
            ("twin_error_rate", self.twin_error_rate),
            ("method_drop_rate", self.method_drop_rate),
            ("dps_throttle_rate", self.dps_throttle_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                problems.push(format!("faults.{name} must be between 0 and 1"));
            }
        }
        if self.drop_fraction > 0.0 && self.drop_every_secs == 0 {
            problems.push("faults.drop_every_secs must be above 0 when drop_fraction is set".to_owned());
        }
        if self.outage_every_secs > 0 && self.outage_secs >= self.outage_every_secs {
            problems.push("faults.outage_secs must be shorter than outage_every_secs".to_owned());
        }
        if !(self.twin_error_status == 429 || (500..=599).contains(&self.twin_error_status)) {
            problems.push("faults.twin_error_status must be 429 or a 5xx status".to_owned());
        }
        const DAY: u64 = 86_400;
        for (name, v, max) in [
            ("drop_every_secs", self.drop_every_secs, 30 * DAY),
            ("storm_every_secs", self.storm_every_secs, 30 * DAY),
            ("outage_every_secs", self.outage_every_secs, 30 * DAY),
            ("outage_secs", self.outage_secs, MAX_OUTAGE_SECS),
            ("puback_delay_ms", self.puback_delay_ms, 600_000),
            ("dps_retry_after_secs", self.dps_retry_after_secs, 3600),
            ("dps_assignment_delay_ms", self.dps_assignment_delay_ms.unwrap_or(0), 3_600_000),
            ("token_lifetime_secs", self.token_lifetime_secs, 365 * DAY),
        ] {
            if v > max {
                problems.push(format!("faults.{name} must be from 0 to {max}"));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
    }
}

/// The longest outage, scheduled or asked for through `/emulator/faults/outage`: one day.
pub const MAX_OUTAGE_SECS: u64 = 86_400;

/// A connection the hub turns away before authenticating it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refuse {
    Outage,
    Throttled,
}

/// The live fault settings and the state the scheduled ones need.
pub struct Faults {
    config: RwLock<FaultConfig>,
    /// New connections are refused until then (an outage started by schedule or by hand).
    outage_until: Mutex<Option<Instant>>,
    /// Connect throttle: the current one-second window and how many it admitted.
    window: Mutex<(Instant, u32)>,
}

fn chance(rate: f64) -> bool {
    rate > 0.0 && rand::random::<f64>() < rate
}

impl Faults {
    pub fn new(config: FaultConfig) -> Faults {
        Faults {
            config: RwLock::new(config),
            outage_until: Mutex::new(None),
            window: Mutex::new((crate::hub::clock::now(), 0)),
        }
    }

    pub fn get(&self) -> FaultConfig {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, c: FaultConfig) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = c;
    }

    fn with<T>(&self, f: impl FnOnce(&FaultConfig) -> T) -> T {
        f(&self.config.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Refuses new connections for `d` from now (callers bound `d` by [`MAX_OUTAGE_SECS`]; a
    /// longer one, should it come, lasts as long as the clock can count).
    pub fn start_outage(&self, d: Duration) {
        let until = crate::hub::clock::now().checked_add(d).unwrap_or_else(crate::sys::far_future);
        *self.outage_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
    }

    /// Seconds left in the current outage.
    pub fn outage_left(&self) -> Option<Duration> {
        let until = (*self.outage_until.lock().unwrap_or_else(|p| p.into_inner()))?;
        let left = until.saturating_duration_since(crate::hub::clock::now());
        (!left.is_zero()).then_some(left)
    }

    /// Whether a device connect should be turned away, and why. Counts it against the throttle
    /// when it is admitted.
    pub fn admit_connect(&self) -> Result<(), Refuse> {
        if self.outage_left().is_some() {
            return Err(Refuse::Outage);
        }
        let limit = self.with(|c| c.connects_per_sec);
        if limit == 0 {
            return Ok(());
        }
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::hub::clock::now();
        if now.duration_since(w.0) >= Duration::from_secs(1) {
            *w = (now, 0);
        }
        if w.1 >= limit {
            return Err(Refuse::Throttled);
        }
        w.1 += 1;
        Ok(())
    }

    pub fn puback_delay(&self) -> Option<Duration> {
        let ms = self.with(|c| c.puback_delay_ms);
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// The status to answer a twin request with instead of serving it.
    pub fn twin_error(&self) -> Option<u16> {
        self.with(|c| chance(c.twin_error_rate).then_some(c.twin_error_status))
    }

    pub fn drop_method(&self) -> bool {
        self.with(|c| chance(c.method_drop_rate))
    }

    /// `Retry-After` seconds when this DPS request is to be throttled.
    pub fn dps_throttle(&self) -> Option<u64> {
        self.with(|c| chance(c.dps_throttle_rate).then_some(c.dps_retry_after_secs))
    }

    pub fn dps_assignment_delay(&self) -> Option<Duration> {
        self.with(|c| c.dps_assignment_delay_ms.map(Duration::from_millis))
    }

    /// When a connection made now must end, whatever its token says.
    pub fn token_deadline(&self) -> Option<Instant> {
        let secs = self.with(|c| c.token_lifetime_secs);
        (secs > 0).then(|| crate::hub::clock::now().checked_add(Duration::from_secs(secs))).flatten()
    }

    pub fn drop_mode(&self) -> DropMode {
        self.with(|c| c.drop_mode)
    }
}

/// What the scheduler decided to do this second.
#[derive(Debug, PartialEq)]
pub enum Scheduled {
    Drop(f64),
    Storm,
    Outage(Duration),
}

/// Which scheduled faults fall due at `elapsed` whole seconds since the hub started.
pub fn due(c: &FaultConfig, elapsed: u64) -> Vec<Scheduled> {
    let every = |n: u64| n > 0 && elapsed > 0 && elapsed.is_multiple_of(n);
    let mut out = Vec::new();
    if every(c.storm_every_secs) {
        out.push(Scheduled::Storm);
    } else if c.drop_fraction > 0.0 && every(c.drop_every_secs) {
        out.push(Scheduled::Drop(c.drop_fraction));
    }
    if every(c.outage_every_secs) && c.outage_secs > 0 {
        out.push(Scheduled::Outage(Duration::from_secs(c.outage_secs)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_inject_nothing() {
        let f = Faults::new(FaultConfig::default());
        assert_eq!(f.admit_connect(), Ok(()));
        assert!(f.puback_delay().is_none() && f.twin_error().is_none() && !f.drop_method());
        assert!(f.dps_throttle().is_none() && f.token_deadline().is_none());
        assert!((0..10_000).all(|s| due(&FaultConfig::default(), s).is_empty()));
        FaultConfig::default().validate().unwrap();
    }

    #[test]
    fn the_throttle_admits_its_rate_per_second() {
        let f = Faults::new(FaultConfig { connects_per_sec: 3, ..Default::default() });
        let admitted = (0..10).filter(|_| f.admit_connect().is_ok()).count();
        assert_eq!(admitted, 3);
        assert_eq!(f.admit_connect(), Err(Refuse::Throttled));
    }

    #[test]
    fn an_outage_refuses_until_it_ends() {
        let f = Faults::new(FaultConfig::default());
        f.start_outage(Duration::from_secs(30));
        assert_eq!(f.admit_connect(), Err(Refuse::Outage));
        f.start_outage(Duration::ZERO);
        assert_eq!(f.admit_connect(), Ok(()));
    }

    #[test]
    fn rates_are_probabilities() {
        let f = Faults::new(FaultConfig { twin_error_rate: 1.0, twin_error_status: 503, ..Default::default() });
        assert_eq!(f.twin_error(), Some(503));
        let half = Faults::new(FaultConfig { method_drop_rate: 0.5, ..Default::default() });
        let dropped = (0..10_000).filter(|_| half.drop_method()).count();
        assert!((4_000..6_000).contains(&dropped), "{dropped}");
    }

    #[test]
    fn schedules_fire_on_their_period_and_a_storm_outranks_a_drop() {
        let c = FaultConfig {
            drop_fraction: 0.1,
            drop_every_secs: 10,
            storm_every_secs: 30,
            outage_every_secs: 45,
            outage_secs: 5,
            ..Default::default()
        };
        assert_eq!(due(&c, 10), [Scheduled::Drop(0.1)]);
        assert_eq!(due(&c, 30), [Scheduled::Storm]);
        assert_eq!(due(&c, 45), [Scheduled::Outage(Duration::from_secs(5))]);
        assert!(due(&c, 0).is_empty() && due(&c, 11).is_empty());
    }

    #[test]
    fn validation_names_each_bad_field() {
        let c = FaultConfig {
            drop_fraction: 2.0,
            twin_error_status: 404,
            outage_every_secs: 5,
            outage_secs: 5,
            ..Default::default()
        };
        let err = c.validate().unwrap_err();
        assert_eq!(err.lines().count(), 3, "{err}");
        assert!(err.contains("faults.drop_fraction") && err.contains("faults.twin_error_status"));
    }
}
