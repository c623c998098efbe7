//! An identity's credential step: DPS registration (after creating its individual enrollment,
//! when the fleet makes those), or creating the device or module in the registry. It answers the
//! hub and device id to connect as, or how long to wait before trying again.

use std::time::Duration;

use tokio::time::Instant;

use super::core::full_jitter;
use super::failures;
use super::recovery::{self, Refusals, Step};
use super::spec::{Credentials, IdentitySpec, Shared};
use crate::provision::dps::{self, ProvisionError};
use crate::scenario::model::DpsTransport;

/// DPS registration, or registry creation; the hub and device id to connect as. The error is how
/// long to wait before trying again, and whether DPS refused the identity as unknown (its
/// enrollment is re-created on the next attempt).
pub async fn obtain(
    spec: &IdentitySpec,
    shared: &Shared,
    ensured: &mut bool,
    refusals: &mut Refusals,
    failures: u32,
) -> Result<(String, String), (Duration, bool)> {
    let m = &shared.metrics;
    let backoff = || full_jitter(shared.settings.backoff_base, shared.settings.backoff_cap, failures + 1);
    match &spec.credentials {
        Credentials::Dps { key, individual, transport, payload } => {
            if *individual && !*ensured {
                if let Some(s) = &shared.dps_service {
                    s.ensure_enrollment(&spec.device_id, key).await.map_err(|e| {
                        let f = failures::registry(format!("creating the individual enrollment: {e}"));
                        shared.failures.report(&spec.template, &spec.device_id, "enrollment", f);
                        (backoff(), false)
                    })?;
                }
                *ensured = true;
            }
            let ep = shared.endpoints.dps.as_ref().expect("configuration checked that DPS is configured");
            let t0 = Instant::now();
            let result = match transport {
                DpsTransport::Https => {
                    dps::register_https(&shared.http, ep, &spec.device_id, key, payload.clone()).await
                }
                DpsTransport::Mqtt => {
                    dps::register_mqtt(shared.tls.clone(), ep, &spec.device_id, key, payload.clone()).await
                }
            };
            match result {
                Ok(a) => {
                    m.provisioned("assigned");
                    m.provision_seconds.observe(t0.elapsed().as_secs_f64());
                    Ok((a.assigned_hub, a.device_id))
                }
                Err(ProvisionError::Throttled { retry_after }) => {
                    m.provisioned("throttled");
                    Err((retry_after + Duration::from_millis(rand::random::<u64>() % 1000), false))
                }
                Err(e) if recovery::dps_forgot(&e) => {
                    m.provisioned("unauthorized");
                    let ProvisionError::Unauthorized(status, _) = &e else { unreachable!("dps_forgot") };
                    let f = failures::dps_status(*status, e.to_string());
                    shared.failures.report(&spec.template, &spec.device_id, "provisioning", f);
                    // An individual enrollment this fleet made can be made again (DPS forgot it,
                    // or someone deleted it); a group enrollment or a keys file cannot.
                    let reenroll = *individual && shared.dps_service.is_some();
                    let step = if reenroll { Step::Dps } else { Step::None };
                    refusals.rerun(m, &spec.device_id, spec.module_id.as_deref(), step, &e.to_string());
                    if reenroll {
                        *ensured = false;
                    }
                    Err((backoff(), reenroll))
                }
                Err(e) => {
                    let failure = match &e {
                        ProvisionError::Failed(_) => failures::dps_status(400, e.to_string()),
                        ProvisionError::Timeout => failures::network(format!("{e} (timeout)")),
                        _ => failures::network(e.to_string()),
                    };
                    shared.failures.report(&spec.template, &spec.device_id, "provisioning", failure);
                    m.provisioned("error");
                    Err((backoff(), false))
                }
            }
        }
        Credentials::Direct { key, parent_key } => {
            if !*ensured {
                if let Some(s) = &shared.service {
                    let deployment = spec.edge.as_ref().map(|e| &e.deployment);
                    let r = match (&spec.module_id, parent_key) {
                        (Some(module), Some(parent)) => {
                            match shared.ensured.device(s, &spec.device_id, parent, deployment).await {
                                Ok(()) => s.ensure_module(&spec.device_id, module, key).await,
                                Err(e) => Err(e),
                            }
                        }
                        _ => shared.ensured.device(s, &spec.device_id, key, deployment).await,
                    };
                    r.map_err(|e| {
                        let f = failures::registry(format!("creating the identity: {e}"));
                        shared.failures.report(&spec.template, &spec.device_id, "identity", f);
                        (backoff(), false)
                    })?;
                }
                *ensured = true;
            }
            let host = shared.endpoints.hub_host.clone().expect("configuration checked that the hub host is known");
            Ok((host, spec.device_id.to_string()))
        }
    }
}
