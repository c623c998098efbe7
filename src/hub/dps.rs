//! The Device Provisioning Service: enrollments (individual and symmetric-key groups with derived
//! keys), device authentication, and the asynchronous register/poll operation that both the MQTT
//! and the HTTPS front ends drive. An assignment creates (or re-keys) the device in the registry.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::registry::{Record, Registry, RegistryError};
use crate::hub::clock::Instant;
pub use crate::iot::dps::valid_registration_id;
use crate::iot::dps::{OperationStatus, RegistrationRequest, RegistrationState};
use crate::iot::sas::{Key, SasError, SasToken, derive_device_key};
use crate::iot::time::iso8601;

#[derive(Debug, Clone)]
pub struct IndividualEnrollment {
    pub registration_id: String,
    /// The device id to assign; the registration id when absent.
    pub device_id: Option<String>,
    pub keys: [Key; 2],
    pub enabled: bool,
    pub etag: u64,
}

#[derive(Debug, Clone)]
pub struct GroupEnrollment {
    pub group_id: String,
    pub keys: [Key; 2],
    pub enabled: bool,
    pub etag: u64,
}

/// A device DPS has authenticated, with the keys the hub will know it by.
#[derive(Debug, Clone)]
pub struct Attestation {
    pub registration_id: String,
    pub device_id: String,
    pub device_keys: [Key; 2],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpsAuthError {
    #[error("{0}")]
    Token(#[from] SasError),
    #[error("the id scope does not match this DPS instance")]
    WrongScope,
    #[error("no enabled enrollment matches this registration")]
    NoEnrollment,
    #[error("Invalid RegistrationId")]
    BadRegistrationId,
}

impl DpsAuthError {
    /// The refusal this failure counts as in the connection metrics.
    pub fn refusal(&self) -> super::metrics::Refusal {
        use super::metrics::Refusal;
        match self {
            DpsAuthError::Token(SasError::Expired) => Refusal::ExpiredToken,
            DpsAuthError::NoEnrollment | DpsAuthError::WrongScope | DpsAuthError::BadRegistrationId => {
                Refusal::UnknownIdentity
            }
            DpsAuthError::Token(_) => Refusal::BadCredentials,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpsError {
    #[error("the body's registrationId does not match the authenticated registration")]
    RegistrationIdMismatch,
    #[error("no such operation for this registration")]
    UnknownOperation,
    #[error("the assigned device could not be created: {0}")]
    Registry(#[from] RegistryError),
}

/// Where a registration stands.
#[derive(Debug, Clone)]
struct Registration {
    operation_id: String,
    ready_at: Instant,
    model_id: Option<String>,
    payload: Option<Value>,
    /// The result once assigned; kept so re-registering returns the same assignment.
    assigned: Option<RegistrationState>,
    created: SystemTime,
}

/// A registration as the store keeps it: everything but the pending operation's deadline (an
/// operation in flight at a restart completes at its next poll).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StoredRegistration {
    pub operation_id: String,
    pub model_id: Option<String>,
    pub payload: Option<Value>,
    pub assigned: Option<RegistrationState>,
    pub created: SystemTime,
}

/// What a poll (or a register that completed at once) found.
#[derive(Debug, Clone)]
pub enum Progress {
    Assigning { status: OperationStatus, retry_after: u64 },
    Done(OperationStatus),
}

pub struct Dps {
    pub id_scope: String,
    hub_host: String,
    retry_after: u64,
    /// Milliseconds; the fault injector may change it at run time (slow assignments).
    assignment_delay_ms: std::sync::atomic::AtomicU64,
    skew_secs: u64,
    individual: RwLock<HashMap<String, IndividualEnrollment>>,
    groups: RwLock<Vec<GroupEnrollment>>,
    registrations: Mutex<HashMap<String, Registration>>,
}

/// Registration ids are case-insensitive in DPS; the map key folds case, the HMAC does not.
fn fold(id: &str) -> String {
    id.to_ascii_lowercase()
}

impl Dps {
    pub fn new(
        id_scope: String,
        hub_host: String,
        retry_after: u64,
        assignment_delay: Duration,
        skew_secs: u64,
    ) -> Dps {
        Dps {
            id_scope,
            hub_host,
            retry_after,
            assignment_delay_ms: std::sync::atomic::AtomicU64::new(assignment_delay.as_millis() as u64),
            skew_secs,
            individual: RwLock::default(),
            groups: RwLock::default(),
            registrations: Mutex::default(),
        }
    }

    pub fn put_individual(&self, e: IndividualEnrollment) {
        self.individual.write().unwrap_or_else(|p| p.into_inner()).insert(fold(&e.registration_id), e);
    }

    pub fn get_individual(&self, registration_id: &str) -> Option<IndividualEnrollment> {
        self.individual.read().unwrap_or_else(|p| p.into_inner()).get(&fold(registration_id)).cloned()
    }

    pub fn remove_individual(&self, registration_id: &str) -> bool {
        self.individual.write().unwrap_or_else(|p| p.into_inner()).remove(&fold(registration_id)).is_some()
    }

    pub fn put_group(&self, g: GroupEnrollment) {
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        groups.retain(|x| x.group_id != g.group_id);
        groups.push(g);
    }

    pub fn get_group(&self, group_id: &str) -> Option<GroupEnrollment> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).iter().find(|g| g.group_id == group_id).cloned()
    }

    pub fn remove_group(&self, group_id: &str) -> bool {
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        let before = groups.len();
        groups.retain(|g| g.group_id != group_id);
        groups.len() != before
    }

    /// Every individual enrollment and group (for the store's start-up and export).
    pub fn enrollments(&self) -> (Vec<IndividualEnrollment>, Vec<GroupEnrollment>) {
        let individual = self.individual.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        (individual, self.groups.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// A registration as the store keeps it; `None` when DPS has none under that id.
    pub fn stored_registration(&self, registration_id: &str) -> Option<StoredRegistration> {
        let regs = self.registrations.lock().unwrap_or_else(|p| p.into_inner());
        regs.get(&fold(registration_id)).map(|r| StoredRegistration {
            operation_id: r.operation_id.clone(),
            model_id: r.model_id.clone(),
            payload: r.payload.clone(),
            assigned: r.assigned.clone(),
            created: r.created,
        })
    }

    /// Puts back a registration the store kept; its operation is ready at once (`now`).
    pub fn restore_registration(&self, registration_id: &str, r: StoredRegistration, now: Instant) {
        let reg = Registration {
            operation_id: r.operation_id,
            ready_at: now,
            model_id: r.model_id,
            payload: r.payload,
            assigned: r.assigned,
            created: r.created,
        };
        self.registrations.lock().unwrap_or_else(|p| p.into_inner()).insert(fold(registration_id), reg);
    }

    /// Checks a device's DPS token: the individual enrollment's keys first, then each group's
    /// derived keys. `skn` may be absent or `registration`.
    pub fn authenticate(
        &self,
        id_scope: &str,
        registration_id: &str,
        token: &str,
        now_unix: u64,
    ) -> Result<Attestation, DpsAuthError> {
        if id_scope != self.id_scope {
            return Err(DpsAuthError::WrongScope);
        }
        let token = SasToken::parse(token)?;
        if token.is_expired(now_unix, self.skew_secs) {
            return Err(SasError::Expired.into());
        }
        let resource = format!("{id_scope}/registrations/{registration_id}");
        let covers = token.resource.eq_ignore_ascii_case(&resource);
        if !covers {
            return Err(SasError::WrongResource.into());
        }
        if !valid_registration_id(registration_id) {
            // DPS refuses the id itself (400) once the token proves the caller holds a group key
            // for it; a token it cannot validate stays a 401. No individual enrollment can carry
            // an invalid id, so only groups can sign for one.
            let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
            let signed = groups
                .iter()
                .filter(|g| g.enabled)
                .any(|g| g.keys.iter().any(|k| token.signed_by(&derive_device_key(k, registration_id))));
            return Err(if signed { DpsAuthError::BadRegistrationId } else { DpsAuthError::NoEnrollment });
        }
        if let Some(e) = self.get_individual(registration_id) {
            if e.enabled && e.keys.iter().any(|k| token.signed_by(k)) {
                return Ok(Attestation {
                    registration_id: registration_id.to_owned(),
                    device_id: e.device_id.unwrap_or_else(|| registration_id.to_owned()),
                    device_keys: e.keys,
                });
            }
            // An individual enrollment takes precedence over groups, as in DPS.
            return Err(DpsAuthError::NoEnrollment);
        }
        let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
        for g in groups.iter().filter(|g| g.enabled) {
            let derived =
                [derive_device_key(&g.keys[0], registration_id), derive_device_key(&g.keys[1], registration_id)];
            if derived.iter().any(|k| token.signed_by(k)) {
                return Ok(Attestation {
                    registration_id: registration_id.to_owned(),
                    device_id: registration_id.to_owned(),
                    device_keys: derived,
                });
            }
        }
        Err(DpsAuthError::NoEnrollment)
    }

    /// Starts (or restarts) a registration: always answers `assigning`, like DPS.
    pub fn register(
        &self,
        att: &Attestation,
        req: &RegistrationRequest,
        now: Instant,
        wall: SystemTime,
    ) -> Result<OperationStatus, DpsError> {
        if let Some(id) = &req.registration_id
            && !id.eq_ignore_ascii_case(&att.registration_id)
        {
            return Err(DpsError::RegistrationIdMismatch);
        }
        let operation_id = format!("5.{:016x}.{}", rand::random::<u64>(), uuid::Uuid::new_v4());
        let mut regs = self.registrations.lock().unwrap_or_else(|p| p.into_inner());
        let entry = regs.entry(fold(&att.registration_id)).or_insert_with(|| Registration {
            operation_id: String::new(),
            ready_at: now,
            model_id: None,
            payload: None,
            assigned: None,
            created: wall,
        });
        entry.operation_id = operation_id.clone();
        entry.ready_at =
            now + Duration::from_millis(self.assignment_delay_ms.load(std::sync::atomic::Ordering::Relaxed));
        entry.model_id = req.model_id();
        entry.payload = req.payload.clone();
        Ok(OperationStatus { operation_id, status: "assigning".into(), registration_state: None })
    }

    /// How long assignments take from now on.
    pub fn set_assignment_delay(&self, d: Duration) {
        self.assignment_delay_ms.store(d.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reports on an operation, completing the assignment once its delay has passed.
    pub fn poll(
        &self,
        att: &Attestation,
        operation_id: &str,
        registry: &Registry,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Progress, DpsError> {
        let mut regs = self.registrations.lock().unwrap_or_else(|p| p.into_inner());
        let reg = regs
            .get_mut(&fold(&att.registration_id))
            .filter(|r| r.operation_id == operation_id)
            .ok_or(DpsError::UnknownOperation)?;
        if now < reg.ready_at {
            let status = OperationStatus {
                operation_id: operation_id.to_owned(),
                status: "assigning".into(),
                registration_state: Some(RegistrationState {
                    registration_id: att.registration_id.clone(),
                    status: "assigning".into(),
                    ..Default::default()
                }),
            };
            return Ok(Progress::Assigning { status, retry_after: self.retry_after });
        }
        let first = reg.assigned.is_none();
        provision_device(registry, att, reg.model_id.clone(), wall)?;
        let state = RegistrationState {
            registration_id: att.registration_id.clone(),
            created_date_time_utc: Some(iso8601(reg.created)),
            assigned_hub: Some(self.hub_host.clone()),
            device_id: Some(att.device_id.clone()),
            status: "assigned".into(),
            substatus: Some(if first { "initialAssignment" } else { "deviceDataMigrated" }.into()),
            last_updated_date_time_utc: Some(iso8601(wall)),
            etag: Some(format!("\"{}\"", uuid::Uuid::new_v4())),
            payload: None,
            ..Default::default()
        };
        // Re-registering keeps the first assignment's substatus, as DPS reports the same hub.
        let state = match &reg.assigned {
            Some(prev) => RegistrationState {
                substatus: prev.substatus.clone(),
                created_date_time_utc: prev.created_date_time_utc.clone(),
                ..state
            },
            None => state,
        };
        reg.assigned = Some(state.clone());
        Ok(Progress::Done(OperationStatus {
            operation_id: operation_id.to_owned(),
            status: "assigned".into(),
            registration_state: Some(state),
        }))
    }

    /// The payload the device sent with its last register request (IoT Central's `modelId`).
    pub fn registration_payload(&self, registration_id: &str) -> Option<Value> {
        self.registrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fold(registration_id))
            .and_then(|r| r.payload.clone())
    }

    /// The last result for a registration (the non-billable status lookup).
    pub fn registration_state(&self, registration_id: &str) -> Option<RegistrationState> {
        self.registrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fold(registration_id))
            .and_then(|r| r.assigned.clone())
    }
}

/// Creates the assigned device, or re-keys and re-enables an existing one (keeping its twin).
fn provision_device(
    registry: &Registry,
    att: &Attestation,
    model_id: Option<String>,
    now: SystemTime,
) -> Result<(), RegistryError> {
    let [primary, secondary] = att.device_keys.clone();
    if let Some(existing) = registry.get(&att.device_id, None) {
        let mut st = existing.lock();
        if st.record.keys != att.device_keys {
            st.record.set_keys(primary, secondary);
            st.record.record_version += 1;
        }
        if model_id.is_some() {
            st.record.model_id = model_id;
        }
        return Ok(());
    }
    let mut record = Record::new(primary, secondary);
    record.model_id = model_id;
    match registry.create(&att.device_id, None, record, now) {
        Ok(_) | Err(RegistryError::AlreadyExists) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iot::sas::sign_token;

    const SCOPE: &str = "0ne00000A0A";

    fn dps() -> (Dps, Key) {
        let d = Dps::new(SCOPE.into(), "hub.local".into(), 1, Duration::ZERO, 0);
        let gk = Key::generate();
        d.put_group(GroupEnrollment {
            group_id: "g".into(),
            keys: [gk.clone(), Key::generate()],
            enabled: true,
            etag: 1,
        });
        (d, gk)
    }

    fn token(reg: &str, key: &Key) -> String {
        sign_token(&format!("{SCOPE}/registrations/{reg}"), key, 2_000_000_000, Some("registration"))
    }

    #[test]
    fn group_members_authenticate_with_derived_keys_and_get_assigned() {
        let (d, gk) = dps();
        let registry = Registry::default();
        let key = derive_device_key(&gk, "sim-1");
        let att = d.authenticate(SCOPE, "sim-1", &token("sim-1", &key), 1).unwrap();
        let req = RegistrationRequest {
            registration_id: Some("sim-1".into()),
            payload: Some(serde_json::json!({"modelId": "dtmi:x;1"})),
        };
        let op = d.register(&att, &req, crate::hub::clock::now(), crate::hub::clock::wall()).unwrap();
        assert_eq!(op.status, "assigning");
        let Progress::Done(done) =
            d.poll(&att, &op.operation_id, &registry, crate::hub::clock::now(), crate::hub::clock::wall()).unwrap()
        else {
            panic!()
        };
        let state = done.registration_state.unwrap();
        assert_eq!(
            (state.assigned_hub.as_deref(), state.device_id.as_deref(), state.substatus.as_deref()),
            (Some("hub.local"), Some("sim-1"), Some("initialAssignment"))
        );
        let dev = registry.get("sim-1", None).unwrap();
        assert_eq!(dev.lock().record.keys[0], key);
        assert_eq!(dev.lock().record.model_id.as_deref(), Some("dtmi:x;1"));
        // Registering again returns the same assignment.
        let op2 = d.register(&att, &req, crate::hub::clock::now(), crate::hub::clock::wall()).unwrap();
        let Progress::Done(again) =
            d.poll(&att, &op2.operation_id, &registry, crate::hub::clock::now(), crate::hub::clock::wall()).unwrap()
        else {
            panic!()
        };
        assert_eq!(again.registration_state.unwrap().device_id.as_deref(), Some("sim-1"));
        assert_eq!(
            d.poll(&att, "stale", &registry, crate::hub::clock::now(), crate::hub::clock::wall()).unwrap_err(),
            DpsError::UnknownOperation
        );
    }

    #[test]
    fn refuses_unknown_registrations_and_bad_keys() {
        let (d, gk) = dps();
        let wrong = Key::generate();
        assert_eq!(d.authenticate(SCOPE, "sim-1", &token("sim-1", &wrong), 1).unwrap_err(), DpsAuthError::NoEnrollment);
        let key = derive_device_key(&gk, "sim-1");
        assert_eq!(
            d.authenticate("0neOTHER", "sim-1", &token("sim-1", &key), 1).unwrap_err(),
            DpsAuthError::WrongScope
        );
        assert_eq!(
            d.authenticate(SCOPE, "sim-2", &token("sim-1", &key), 1).unwrap_err(),
            DpsAuthError::Token(SasError::WrongResource)
        );
        assert_eq!(
            d.authenticate(SCOPE, "sim-1", &token("sim-1", &key), 3_000_000_000).unwrap_err(),
            DpsAuthError::Token(SasError::Expired)
        );
        // An invalid id with a token a group key signed is a bad request; otherwise unauthorized.
        for bad in ["dev@prod12", "bad id", &"a".repeat(129)] {
            let signed = derive_device_key(&gk, bad);
            assert_eq!(
                d.authenticate(SCOPE, bad, &token(bad, &signed), 1).unwrap_err(),
                DpsAuthError::BadRegistrationId
            );
            assert_eq!(d.authenticate(SCOPE, bad, &token(bad, &wrong), 1).unwrap_err(), DpsAuthError::NoEnrollment);
        }
    }

    #[test]
    fn individual_enrollments_take_precedence_and_can_rename_the_device() {
        let (d, gk) = dps();
        let own = Key::generate();
        d.put_individual(IndividualEnrollment {
            registration_id: "Sim-1".into(),
            device_id: Some("renamed".into()),
            keys: [own.clone(), Key::generate()],
            enabled: true,
            etag: 1,
        });
        let att = d.authenticate(SCOPE, "sim-1", &token("sim-1", &own), 1).unwrap();
        assert_eq!(att.device_id, "renamed");
        let derived = derive_device_key(&gk, "sim-1");
        assert_eq!(
            d.authenticate(SCOPE, "sim-1", &token("sim-1", &derived), 1).unwrap_err(),
            DpsAuthError::NoEnrollment
        );
    }

    #[test]
    fn assignment_waits_for_its_delay() {
        let d = Dps::new(SCOPE.into(), "h".into(), 2, Duration::from_secs(5), 0);
        let k = Key::generate();
        d.put_individual(IndividualEnrollment {
            registration_id: "r".into(),
            device_id: None,
            keys: [k.clone(), Key::generate()],
            enabled: true,
            etag: 1,
        });
        let att = d.authenticate(SCOPE, "r", &token("r", &k), 1).unwrap();
        let t0 = crate::hub::clock::now();
        let op = d.register(&att, &RegistrationRequest::default(), t0, crate::hub::clock::wall()).unwrap();
        let registry = Registry::default();
        assert!(matches!(
            d.poll(&att, &op.operation_id, &registry, t0, crate::hub::clock::wall()).unwrap(),
            Progress::Assigning { retry_after: 2, .. }
        ));
        assert!(registry.get("r", None).is_none());
        assert!(matches!(
            d.poll(&att, &op.operation_id, &registry, t0 + Duration::from_secs(6), crate::hub::clock::wall()).unwrap(),
            Progress::Done(_)
        ));
    }
}
