//! Why identities cannot get onto the hub, told so an operator can act without reading the
//! source: each failure is classified (DNS, TCP, TLS, an HTTP status, a CONNACK code), the first
//! of each kind per template is logged at WARN with its whole cause chain and what to check, and
//! every failure is counted by kind for the fleet's periodic progress line. Messages never carry
//! a key or token: they are built from errors and endpoints, which hold none.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

/// One classified failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Short and stable (a log field, a count's name): `dns`, `tcp_refused`, `tls_certificate`,
    /// `dps_401`, `connack_5` ...
    pub kind: String,
    /// What happened, with every cause: "https://h:443/...: error sending request ...: tcp
    /// connect error: Connection refused (os error 111)".
    pub detail: String,
    /// What to check.
    pub hint: &'static str,
}

/// Classifies a failure to reach an endpoint from its cause chain.
pub fn network(detail: String) -> Failure {
    let lower = detail.to_ascii_lowercase();
    let (kind, hint) = if lower.contains("lookup address")
        || lower.contains("dns error")
        || lower.contains("name or service not known")
        || lower.contains("no address associated")
    {
        ("dns", "the host name does not resolve: check hub.dps_host / hub.hub_host / hub.gateway_host and DNS")
    } else if lower.contains("connection refused") {
        ("tcp_refused", "nothing listens there: check the host and port (hub.mqtt_port, hub.https_port) and firewalls")
    } else if lower.contains("certificate") || lower.contains("unknownissuer") || lower.contains("notvalidforname") {
        (
            "tls_certificate",
            "the server's certificate is not trusted for that name: for an emulator or gateway set hub.ca_file \
             to its CA, and dial a name the certificate covers",
        )
    } else if lower.contains("tls") || lower.contains("handshake") || lower.contains("alert") {
        ("tls", "the TLS handshake failed: check the port speaks TLS and accepts TLS 1.2 or 1.3")
    } else if lower.contains("timed out") || lower.contains("timeout") || lower.contains("unreachable") {
        ("tcp_timeout", "no answer: check the host, the port, firewalls and proxies (outbound 8883 or 443)")
    } else {
        ("network", "check the endpoint and the network between this machine and it")
    };
    Failure { kind: kind.to_owned(), detail, hint }
}

/// A DPS answer other than an assignment.
pub fn dps_status(status: u16, detail: String) -> Failure {
    let hint = match status {
        401 | 403 | 404 => {
            "DPS refused the registration: check hub.id_scope, hub.group_key (the enrollment group's primary \
             key; devices derive theirs from it) and that the enrollment exists and is enabled"
        }
        429 => "DPS throttles: lower [ramp] rate or [device] provision_concurrency",
        _ => "DPS refused the request: the detail carries its message",
    };
    Failure { kind: format!("dps_{status}"), detail, hint }
}

/// A CONNACK refusal (MQTT 3.1.1 §3.2.2.3).
pub fn connack(code: u8, detail: String) -> Failure {
    let hint = match code {
        3 => "the hub is unavailable (outage or throttling): it will be retried with backoff",
        4 | 5 => {
            "the hub refused the credentials: the identity may not exist in this hub, be disabled, or have \
             another key (check hub.hub_host, the keys, and that DPS assigned this hub)"
        }
        _ => "the hub refused the connection",
    };
    Failure { kind: format!("connack_{code}"), detail, hint }
}

/// An error status from the hub's device REST API (HTTPS devices).
pub fn hub_status(status: u16, detail: String) -> Failure {
    let hint = match status {
        401 | 403 | 404 => {
            "the hub refused the credentials: the identity may not exist in this hub, be disabled, or have \
             another key (check hub.hub_host, the keys, and that DPS assigned this hub)"
        }
        429 => "the hub throttles: lower the telemetry rate or [ramp] rate; it will be retried with backoff",
        s if s >= 500 => "the hub is unavailable: it will be retried with backoff",
        _ => "the hub refused the request: the detail carries its message",
    };
    Failure { kind: format!("hub_{status}"), detail, hint }
}

/// A registry call (creating a device, module or enrollment) that failed.
pub fn registry(detail: String) -> Failure {
    let kind = ["400", "401", "403", "404", "409", "412", "429"]
        .into_iter()
        .find(|s| detail.contains(&format!("{s}:")) || detail.contains(&format!(" {s} ")))
        .map_or_else(|| network(detail.clone()).kind, |s| format!("service_{s}"));
    let hint = if kind == "service_401" || kind == "service_403" {
        "the service API refused the policy: check hub.service_connection_string (a policy with registry write)"
    } else {
        "the service API failed: the detail carries its message"
    };
    Failure { kind, detail, hint }
}

/// Failures seen so far: which were already told at WARN, counts since the last summary, and
/// the run's totals by kind with the first of each (the CI report's top errors).
#[derive(Debug, Default)]
pub struct Failures {
    told: Mutex<HashSet<(String, String)>>,
    since: Mutex<BTreeMap<String, u64>>,
    totals: Mutex<BTreeMap<String, Seen>>,
}

/// A kind of failure over the whole run: how often, and the first one seen. Kinds are few
/// (classes of cause, status codes), so the map stays small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub count: u64,
    pub stage: &'static str,
    pub device: String,
    pub detail: String,
}

impl Failures {
    /// Counts a failure; the first of its kind for `template` is logged at WARN with everything,
    /// the rest at DEBUG.
    pub fn report(&self, template: &str, device: &str, stage: &'static str, f: Failure) {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()).entry(f.kind.clone()).or_default() += 1;
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(f.kind.clone())
            .or_insert_with(|| Seen { count: 0, stage, device: device.to_owned(), detail: f.detail.clone() })
            .count += 1;
        let first = self.told.lock().unwrap_or_else(|e| e.into_inner()).insert((template.to_owned(), f.kind.clone()));
        if first {
            tracing::warn!(
                template,
                device,
                stage,
                kind = %f.kind,
                cause = %f.detail,
                check = f.hint,
                "{stage} failed (first {} failure of this template; more are counted in the progress line)",
                f.kind
            );
        } else {
            tracing::debug!(template, device, stage, kind = %f.kind, cause = %f.detail, "{stage} failed");
        }
    }

    /// The run's failures by kind, with the first of each.
    pub fn totals(&self) -> BTreeMap<String, Seen> {
        self.totals.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Failures by kind since the last call, for the progress line (`dns=3 dps_401=12`).
    pub fn take(&self) -> String {
        let counts = std::mem::take(&mut *self.since.lock().unwrap_or_else(|e| e.into_inner()));
        counts.iter().map(|(k, n)| format!("{k}={n}")).collect::<Vec<_>>().join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_classified_from_the_whole_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let outer = std::io::Error::other(io);
        assert!(crate::sys::error_chain(&outer).contains("Connection refused"));
        assert_eq!(network("x: failed to lookup address information: Name or service not known".into()).kind, "dns");
        assert_eq!(network("tcp connect error: Connection refused (os error 111)".into()).kind, "tcp_refused");
        assert_eq!(network("invalid peer certificate: UnknownIssuer".into()).kind, "tls_certificate");
        assert_eq!(network("deadline has elapsed".into()).kind, "network");
        assert_eq!(dps_status(401, "body".into()).kind, "dps_401");
        assert_eq!(connack(5, "x".into()).kind, "connack_5");
    }

    #[test]
    fn counts_are_taken_once() {
        let f = Failures::default();
        f.report("t", "d1", "provisioning", network("Connection refused".into()));
        f.report("t", "d2", "provisioning", network("Connection refused".into()));
        f.report("t", "d2", "connect", connack(5, "refused".into()));
        assert_eq!(f.take(), "connack_5=1 tcp_refused=2");
        assert_eq!(f.take(), "");
        let totals = f.totals();
        assert_eq!((totals["tcp_refused"].count, totals["tcp_refused"].device.as_str()), (2, "d1"));
        assert_eq!(totals["connack_5"].stage, "connect");
    }
}
