//! An identity the hub or DPS no longer knows. When an external emulator restarts with an empty
//! registry, or someone deletes simulated devices from a real hub, the device's key is refused as
//! unknown or unauthorized: retrying with the same credentials can never succeed. This module
//! decides which refusals mean that, and what the identity does about it: run its credential step
//! again (re-create the device or module through the registry, re-enroll and re-provision through
//! DPS), with the usual backoff, saying so at WARN once per identity and counting every re-run.

use super::link::OpenError;
use crate::metrics::FleetMetrics;
use crate::provision::dps::ProvisionError;

/// Whether the hub refuses the identity's credentials as unknown or unauthorized, so that
/// retrying with the same ones can never succeed: CONNACK 4 or 5 (MQTT 3.1.1 §3.2.2.3; IoT Hub
/// answers 5 for an unknown identity or a bad SAS token, 4 for a malformed user name or
/// password), or HTTP 401, 403 or 404 from the device REST API (`IotHubUnauthorizedAccess`,
/// `DeviceNotFound`). Everything else (CONNACK 3, server unavailable: throttling or an outage;
/// 429 and 5xx; timeouts; I/O) is transient and retried with the same credentials.
pub fn hub_forgot(e: &OpenError) -> bool {
    match e {
        OpenError::Mqtt(e) => e.is_auth(),
        OpenError::Https(e) => matches!(e.status(), Some(401 | 403 | 404)),
        OpenError::Timeout => false,
    }
}

/// Whether DPS refused the registration as unknown or unauthorized (401, 403, 404 from the
/// register or poll call, or CONNACK 4/5 over MQTT): an individual enrollment that no longer
/// exists. Throttling, timeouts and 5xx are transient.
pub fn dps_forgot(e: &ProvisionError) -> bool {
    matches!(e, ProvisionError::Unauthorized(..))
}

/// Which credential step runs again; the `step` label of `fleetsim_credential_reruns_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The device (and for a module, its parent) is created again through the service API.
    Registry,
    /// The identity registers with DPS again (re-creating its individual enrollment first).
    Dps,
    /// Nothing can be re-created: the keys came from a keys file without a service connection
    /// string, or DPS refused a group enrollment. The identity keeps retrying as it is.
    None,
}

impl Step {
    pub fn label(self) -> &'static str {
        match self {
            Step::Registry => "registry",
            Step::Dps => "dps",
            Step::None => "none",
        }
    }
}

/// One identity's memory of having been refused: the WARN is written once, later re-runs are
/// logged at DEBUG (a hub that forgot ten thousand devices must not write ten thousand lines per
/// backoff round), and every re-run is counted.
#[derive(Debug, Default)]
pub struct Refusals {
    warned: bool,
}

impl Refusals {
    /// Records that `device` was refused (`why` names the refusal, never a key) and that `step`
    /// runs again.
    pub fn rerun(&mut self, metrics: &FleetMetrics, device: &str, module: Option<&str>, step: Step, why: &str) {
        metrics.credential_rerun(step.label());
        let what = match step {
            Step::Registry => "ensuring it in the registry again",
            Step::Dps => "provisioning it again through DPS",
            Step::None => {
                "nothing can re-create it (keys file or group enrollment); retrying with the same credentials"
            }
        };
        if std::mem::replace(&mut self.warned, true) {
            tracing::debug!(device, module, refusal = why, "identity refused again; {what}");
        } else {
            tracing::warn!(
                device,
                module,
                refusal = why,
                "the hub refused this identity's credentials (unknown, disabled, or its key changed); {what}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::https::HttpError;
    use crate::client::mqtt::ConnectError;

    fn mqtt(e: ConnectError) -> OpenError {
        OpenError::Mqtt(e)
    }

    fn https(status: u16) -> OpenError {
        OpenError::Https(HttpError::Status {
            what: "GET /devices/d/messages/deviceBound".into(),
            status,
            detail: String::new(),
        })
    }

    #[test]
    fn only_credential_refusals_mean_the_identity_is_unknown() {
        use rumqttc::mqttbytes::v4::ConnectReturnCode::*;
        for code in [NotAuthorized, BadUserNamePassword] {
            assert!(hub_forgot(&mqtt(ConnectError::Refused(code))), "{code:?}");
        }
        for code in [ServiceUnavailable, BadClientId, RefusedProtocolVersion, Success] {
            assert!(!hub_forgot(&mqtt(ConnectError::Refused(code))), "{code:?}");
        }
        assert!(!hub_forgot(&mqtt(ConnectError::Timeout)));
        assert!(!hub_forgot(&mqtt(ConnectError::Protocol)));
        assert!(!hub_forgot(&mqtt(ConnectError::Io(std::io::ErrorKind::ConnectionRefused.into()))));
        for status in [401, 403, 404] {
            assert!(hub_forgot(&https(status)), "{status}");
        }
        for status in [400, 408, 429, 500, 503] {
            assert!(!hub_forgot(&https(status)), "{status}");
        }
        assert!(!hub_forgot(&OpenError::Timeout));
        let unreachable =
            HttpError::Transport { what: "POST /devices/d/messages/events".into(), detail: "refused".into() };
        assert!(!hub_forgot(&OpenError::Https(unreachable)));
    }

    #[test]
    fn only_dps_authorization_refusals_mean_the_enrollment_is_gone() {
        for status in [401, 403, 404] {
            assert!(dps_forgot(&ProvisionError::Unauthorized(status, String::new())));
        }
        for e in [
            ProvisionError::Throttled { retry_after: std::time::Duration::from_secs(1) },
            ProvisionError::Failed("x".into()),
            ProvisionError::Unreachable("x".into()),
            ProvisionError::Timeout,
        ] {
            assert!(!dps_forgot(&e), "{e}");
        }
    }

    #[test]
    fn every_rerun_is_counted_and_labelled_by_step() {
        let m = FleetMetrics::default();
        let mut r = Refusals::default();
        r.rerun(&m, "d", None, Step::Registry, "CONNACK 5");
        r.rerun(&m, "d", None, Step::Registry, "CONNACK 5");
        r.rerun(&m, "d", Some("m"), Step::Dps, "DPS 401");
        assert_eq!(m.credential_reruns("registry"), 2);
        assert_eq!(m.credential_reruns("dps"), 1);
        assert_eq!(m.credential_reruns("none"), 0);
        for step in [Step::Registry, Step::Dps, Step::None] {
            assert!(FleetMetrics::RERUN_STEPS.contains(&step.label()));
        }
        assert!(r.warned);
        let text = m.render();
        assert!(text.contains("fleetsim_credential_reruns_total{step=\"registry\"} 2"), "{text}");
        for line in text.lines().filter(|l| l.starts_with("fleetsim_credential_reruns_total{")) {
            assert!(line.starts_with("fleetsim_credential_reruns_total{step=\"") && !line.contains(','), "{line}");
        }
    }
}
