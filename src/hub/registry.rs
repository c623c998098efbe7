//! The identity registry: devices and modules with their keys, status, twin, live session,
//! telemetry log and C2D queue. Each identity has its own lock, so the hot paths (telemetry, twin
//! requests) never contend on a hub-wide one; the map lock is held only to find or change entries.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::c2d::C2dQueue;
use super::session::{Session, Subscriptions};
use super::telemetry::TelemetryLog;
use super::twin_doc::TwinDoc;
use crate::iot::sas::Key;
use crate::iot::time::{NEVER, iso8601};

/// The registry's record of an identity: what `GET /devices/{id}` shows.
#[derive(Debug, Clone)]
pub struct Record {
    pub enabled: bool,
    pub status_reason: Option<String>,
    pub status_updated: Option<SystemTime>,
    pub primary_key: String,
    pub secondary_key: String,
    /// Decoded forms of the two keys, for verifying tokens without decoding each time.
    pub keys: [Key; 2],
    /// Changes when an identity is deleted and created again.
    pub generation_id: String,
    /// Bumped on every change to the record; the etag is derived from it.
    pub record_version: u64,
    pub iot_edge: bool,
    pub managed_by: Option<String>,
    pub connection_state_updated: Option<SystemTime>,
    pub last_activity: Option<SystemTime>,
    /// From the CONNECT username or the DPS registration payload.
    pub model_id: Option<String>,
    /// How the identity authenticates (`authentication.type`); the keys above serve only `Sas`.
    pub auth: Auth,
}

/// An identity's `authentication.type` and what it carries (Microsoft: "Devices - Create Or Update
/// Identity", `AuthenticationMechanism`; "Authenticate identities with X.509 certificates").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Auth {
    /// Symmetric keys: SAS tokens signed with the record's keys.
    #[default]
    Sas,
    /// A client certificate whose SHA-1 (40 hex digits) or SHA-256 (64) thumbprint of its DER
    /// is one of these, kept as written (matched without regard to case).
    SelfSigned { primary: String, secondary: Option<String> },
    /// A client certificate chained to a CA certificate the hub holds as verified.
    CertificateAuthority,
    /// No credentials of its own (modules only): the module cannot connect by itself.
    None,
}

impl Auth {
    /// The `type` IoT Hub writes for it.
    pub fn kind(&self) -> &'static str {
        match self {
            Auth::Sas => "sas",
            Auth::SelfSigned { .. } => "selfSigned",
            Auth::CertificateAuthority => "certificateAuthority",
            Auth::None => "none",
        }
    }

    /// The primary and secondary thumbprints (both `None` unless self-signed).
    pub fn thumbprints(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Auth::SelfSigned { primary, secondary } => (Some(primary), secondary.as_deref()),
            _ => (None, None),
        }
    }

    /// Rebuilds the mechanism from its stored parts (the store's columns). `None` for a type
    /// this build does not know or a self-signed one without its primary thumbprint.
    pub fn from_parts(kind: &str, primary: Option<String>, secondary: Option<String>) -> Option<Auth> {
        Some(match kind {
            "sas" => Auth::Sas,
            "selfSigned" => Auth::SelfSigned { primary: primary?, secondary },
            "certificateAuthority" => Auth::CertificateAuthority,
            "none" => Auth::None,
            _ => return None,
        })
    }
}

/// Whether `s` is a certificate thumbprint IoT Hub accepts: the hex of a SHA-1 (40 digits) or
/// SHA-256 (64 digits) digest of the certificate's DER, either case, no separators.
pub fn valid_thumbprint(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What a `Device`/`Module` or bulk entry's `authentication` object asks for: the mechanism,
/// and the keys it gives (each `None` where left out or empty; only for `sas`).
#[derive(Debug)]
pub struct AuthSpec {
    pub auth: Auth,
    pub keys: [Option<Key>; 2],
}

/// Reads an `authentication` object as IoT Hub's REST API and bulk format write it: `type`
/// (`sas` when absent), `symmetricKey.{primaryKey,secondaryKey}` (base64) for `sas`,
/// `x509Thumbprint.{primaryThumbprint,secondaryThumbprint}` for `selfSigned` (the primary
/// required, each 40 or 64 hex digits), nothing for `certificateAuthority`, and `none` only for
/// a module. The error names the field, never a key.
pub fn auth_from_json(auth: &Value, module: bool) -> Result<AuthSpec, String> {
    let kind = auth.get("type").and_then(Value::as_str).unwrap_or("sas");
    let mut spec = AuthSpec { auth: Auth::Sas, keys: [None, None] };
    // Enum names are read without regard to case, as the service's JSON reader does.
    match kind.to_ascii_lowercase().as_str() {
        "sas" => {
            for (i, name) in ["primaryKey", "secondaryKey"].into_iter().enumerate() {
                spec.keys[i] = match auth.get("symmetricKey").and_then(|k| k.get(name)).and_then(Value::as_str) {
                    None | Some("") => None,
                    Some(k) => {
                        Some(Key::from_base64(k).map_err(|_| format!("symmetricKey.{name} is not valid base64"))?)
                    }
                };
            }
        }
        "selfsigned" => {
            let tp = |name: &str| -> Result<Option<String>, String> {
                match auth.get("x509Thumbprint").and_then(|t| t.get(name)).and_then(Value::as_str) {
                    None | Some("") => Ok(None),
                    Some(t) if valid_thumbprint(t) => Ok(Some(t.to_owned())),
                    Some(_) => Err(format!(
                        "x509Thumbprint.{name} must be a SHA-1 (40 hex digits) or SHA-256 (64 hex digits) thumbprint"
                    )),
                }
            };
            let primary = tp("primaryThumbprint")?
                .ok_or("authentication type `selfSigned` needs x509Thumbprint.primaryThumbprint")?;
            spec.auth = Auth::SelfSigned { primary, secondary: tp("secondaryThumbprint")? };
        }
        "certificateauthority" => spec.auth = Auth::CertificateAuthority,
        "none" if module => spec.auth = Auth::None,
        "none" => return Err("authentication type `none` is only allowed for modules".into()),
        _ => {
            return Err(format!(
                "authentication type `{kind}` is not one of sas, selfSigned, certificateAuthority, none"
            ));
        }
    }
    Ok(spec)
}

/// The `authentication` object IoT Hub answers with: keys only for `sas`, thumbprints only for
/// `selfSigned`, `null` otherwise.
pub fn auth_json(r: &Record) -> Value {
    let sas = r.auth == Auth::Sas;
    let (p, s) = r.auth.thumbprints();
    json!({
        "symmetricKey": {
            "primaryKey": sas.then_some(&r.primary_key),
            "secondaryKey": sas.then_some(&r.secondary_key),
        },
        "x509Thumbprint": { "primaryThumbprint": p, "secondaryThumbprint": s },
        "type": r.auth.kind(),
    })
}

impl Record {
    pub fn new(primary: Key, secondary: Key) -> Record {
        Record {
            enabled: true,
            status_reason: None,
            status_updated: None,
            primary_key: primary.to_base64(),
            secondary_key: secondary.to_base64(),
            keys: [primary, secondary],
            generation_id: format!("63{:016}", rand::random::<u64>() % 10_000_000_000_000_000),
            record_version: 1,
            iot_edge: false,
            managed_by: None,
            connection_state_updated: None,
            last_activity: None,
            model_id: None,
            auth: Auth::Sas,
        }
    }

    pub fn set_keys(&mut self, primary: Key, secondary: Key) {
        self.primary_key = primary.to_base64();
        self.secondary_key = secondary.to_base64();
        self.keys = [primary, secondary];
    }

    /// A quoted-free etag like IoT Hub's `MTk1NDgxOTYy` (base64 of a decimal counter).
    pub fn etag(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.record_version.to_string())
    }
}

/// Everything the hub knows about one identity, behind one lock.
#[derive(Debug)]
pub struct IdentityState {
    pub record: Record,
    pub twin: TwinDoc,
    pub session: Option<Session>,
    /// Subscriptions of a CleanSession=0 session while it is offline.
    pub saved_subs: Option<Subscriptions>,
    pub telemetry: TelemetryLog,
    /// Sequence numbers seen in this identity's telemetry (only for fleets that stamp them).
    pub sequence: Option<Box<crate::hub::sequence::Tracker>>,
    pub c2d: C2dQueue,
    /// Set when the identity is deleted, so late holders of the `Arc` stop using it.
    pub removed: bool,
}

#[derive(Debug)]
pub struct Identity {
    pub device_id: String,
    pub module_id: Option<String>,
    state: Mutex<IdentityState>,
    /// Woken when the identity's session or subscriptions change (method calls wait on it).
    pub changed: Notify,
}

impl Identity {
    pub fn lock(&self) -> MutexGuard<'_, IdentityState> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn key(&self) -> String {
        identity_key(&self.device_id, self.module_id.as_deref())
    }
}

/// The registry's map key: `device` or `device/module` (device ids cannot contain `/`).
pub fn identity_key(device_id: &str, module_id: Option<&str>) -> String {
    crate::iot::username::client_id(device_id, module_id)
}

/// An id IoT Hub would accept: 1-128 ASCII alphanumerics and `- : . + % _ # * ? ! ( ) , = @ ; $ '`,
/// the set Microsoft documents for device and module ids (the IoT Hub event schemas' `deviceId`
/// and `moduleId`). `:` is in it, so MAC-address ids (`aa:bb:cc:dd:ee:ff`) are accepted.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-:.+%_#*?!(),=@;$'".contains(&b))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("an identity with this id already exists")]
    AlreadyExists,
    #[error("the device does not exist")]
    DeviceNotFound,
    #[error("the module does not exist")]
    ModuleNotFound,
    #[error("the etag does not match the current one")]
    PreconditionFailed,
    #[error("`{0}` is not a valid id (1-128 letters, digits or -.+%_#*?!(),=@$')")]
    InvalidId(String),
}

#[derive(Debug, Default)]
pub struct Registry {
    map: RwLock<BTreeMap<String, Arc<Identity>>>,
    on_created: CreatedHook,
    /// How many modules the map holds, kept with it under its lock, so counting identities (the
    /// gauges, refreshed on every registry write) never walks the map.
    modules: std::sync::atomic::AtomicUsize,
}

/// Told of every identity the registry creates, whichever path created it (the service REST
/// API, a DPS assignment, a test), after it is in the map: the hub's device lifecycle events.
type OnCreated = Box<dyn Fn(&Identity, &IdentityState) + Send + Sync>;

#[derive(Default)]
struct CreatedHook(std::sync::OnceLock<OnCreated>);

impl std::fmt::Debug for CreatedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() { "CreatedHook(set)" } else { "CreatedHook(unset)" })
    }
}

impl Registry {
    /// Sets what is told of each identity created from now on (once; a second call is ignored).
    pub fn on_created(&self, hook: impl Fn(&Identity, &IdentityState) + Send + Sync + 'static) {
        let _ = self.on_created.0.set(Box::new(hook));
    }

    pub fn get(&self, device_id: &str, module_id: Option<&str>) -> Option<Arc<Identity>> {
        self.read().get(&identity_key(device_id, module_id)).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Identity>>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Identity>>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a new identity. A module needs its device to exist.
    pub fn create(
        &self,
        device_id: &str,
        module_id: Option<&str>,
        record: Record,
        now: SystemTime,
    ) -> Result<Arc<Identity>, RegistryError> {
        for id in std::iter::once(device_id).chain(module_id) {
            if !valid_id(id) {
                return Err(RegistryError::InvalidId(id.to_owned()));
            }
        }
        let mut map = self.write();
        if module_id.is_some() && !map.contains_key(device_id) {
            return Err(RegistryError::DeviceNotFound);
        }
        let key = identity_key(device_id, module_id);
        if map.contains_key(&key) {
            return Err(RegistryError::AlreadyExists);
        }
        let identity = Arc::new(Identity {
            device_id: device_id.to_owned(),
            module_id: module_id.map(str::to_owned),
            state: Mutex::new(IdentityState {
                record,
                twin: TwinDoc::new(now),
                session: None,
                saved_subs: None,
                telemetry: TelemetryLog::default(),
                sequence: None,
                c2d: C2dQueue::default(),
                removed: false,
            }),
            changed: Notify::new(),
        });
        map.insert(key, identity.clone());
        if module_id.is_some() {
            self.modules.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        drop(map);
        if let Some(hook) = self.on_created.0.get() {
            hook(&identity, &identity.lock());
        }
        Ok(identity)
    }

    /// Puts back an identity the store kept, as it was: no id checks (they passed when it was
    /// created) and no device-first rule (the store loads modules in any order). Replaces an
    /// entry with the same key.
    pub fn restore(&self, device_id: &str, module_id: Option<&str>, record: Record, twin: TwinDoc, c2d: C2dQueue) {
        let identity = Arc::new(Identity {
            device_id: device_id.to_owned(),
            module_id: module_id.map(str::to_owned),
            state: Mutex::new(IdentityState {
                record,
                twin,
                session: None,
                saved_subs: None,
                telemetry: TelemetryLog::default(),
                sequence: None,
                c2d,
                removed: false,
            }),
            changed: Notify::new(),
        });
        let mut map = self.write();
        if map.insert(identity_key(device_id, module_id), identity).is_none() && module_id.is_some() {
            self.modules.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// (devices, modules) in the registry now, without walking it.
    pub fn counts(&self) -> (usize, usize) {
        let map = self.read();
        let modules = self.modules.load(std::sync::atomic::Ordering::Relaxed);
        (map.len() - modules.min(map.len()), modules)
    }

    /// Whether `identity` is the entry its key names now (not deleted, nor deleted and created
    /// again since it was looked up).
    pub fn is_current(&self, identity: &Arc<Identity>) -> bool {
        self.read().get(&identity.key()).is_some_and(|i| Arc::ptr_eq(i, identity))
    }

    /// Removes a device and its modules, or one module. Returns what was removed so the caller can
    /// close their connections.
    pub fn remove(&self, device_id: &str, module_id: Option<&str>) -> Vec<Arc<Identity>> {
        let mut map = self.write();
        let mut removed = Vec::new();
        match module_id {
            Some(m) => removed.extend(map.remove(&identity_key(device_id, Some(m)))),
            None => {
                if let Some(d) = map.remove(device_id) {
                    removed.push(d);
                    let prefix = format!("{device_id}/");
                    let modules: Vec<String> = map
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in modules {
                        removed.extend(map.remove(&k));
                    }
                }
            }
        }
        let gone = removed.iter().filter(|i| i.module_id.is_some()).count();
        self.modules.fetch_sub(gone, std::sync::atomic::Ordering::Relaxed);
        removed
    }

    /// Devices in id order, at most `top`.
    pub fn devices(&self, top: usize) -> Vec<Arc<Identity>> {
        self.read().values().filter(|i| i.module_id.is_none()).take(top).cloned().collect()
    }

    pub fn modules(&self, device_id: &str) -> Vec<Arc<Identity>> {
        let prefix = format!("{device_id}/");
        self.read()
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// (total devices, enabled devices).
    pub fn device_counts(&self) -> (usize, usize) {
        let devices = self.devices(usize::MAX);
        let enabled = devices.iter().filter(|d| d.lock().record.enabled).count();
        (devices.len(), enabled)
    }

    pub fn all(&self) -> Vec<Arc<Identity>> {
        self.read().values().cloned().collect()
    }
}

/// `If-Match` handling: `*` or the current etag passes, quoted or not; anything else fails.
pub fn etag_matches(if_match: &str, current: &str) -> bool {
    let v = if_match.trim().trim_start_matches("W/").trim_matches('"');
    v == "*" || v == current
}

fn time_or_never(t: Option<SystemTime>) -> Value {
    json!(t.map(iso8601).unwrap_or_else(|| NEVER.to_owned()))
}

/// `GET /devices/{id}` or `GET /devices/{d}/modules/{m}`.
pub fn identity_json(identity: &Identity, st: &IdentityState) -> Value {
    let r = &st.record;
    let auth = auth_json(r);
    let connection_state = if st.session.is_some() { "Connected" } else { "Disconnected" };
    match &identity.module_id {
        None => json!({
            "deviceId": identity.device_id,
            "generationId": r.generation_id,
            "etag": r.etag(),
            "connectionState": connection_state,
            "status": if r.enabled { "enabled" } else { "disabled" },
            "statusReason": r.status_reason,
            "connectionStateUpdatedTime": time_or_never(r.connection_state_updated),
            "statusUpdatedTime": time_or_never(r.status_updated),
            "lastActivityTime": time_or_never(r.last_activity),
            "cloudToDeviceMessageCount": st.c2d.len(),
            "authentication": auth,
            "capabilities": { "iotEdge": r.iot_edge },
            "deviceScope": null,
            "parentScopes": [],
        }),
        Some(m) => json!({
            "moduleId": m,
            "deviceId": identity.device_id,
            "managedBy": r.managed_by,
            "generationId": r.generation_id,
            "etag": r.etag(),
            "connectionState": connection_state,
            "connectionStateUpdatedTime": time_or_never(r.connection_state_updated),
            "lastActivityTime": time_or_never(r.last_activity),
            "cloudToDeviceMessageCount": 0,
            "authentication": auth,
        }),
    }
}

/// `GET /twins/{id}[/modules/{m}]`: the service view of a twin (protocol.md §6.4).
pub fn twin_json(identity: &Identity, st: &IdentityState) -> Value {
    let r = &st.record;
    let (tags, properties) = st.twin.service_parts();
    let mut v = json!({ "deviceId": identity.device_id });
    if let Some(m) = &identity.module_id {
        v["moduleId"] = json!(m);
    }
    let rest = json!({
        "etag": st.twin.etag(),
        "deviceEtag": r.etag(),
        "status": if r.enabled { "enabled" } else { "disabled" },
        "statusReason": r.status_reason,
        "statusUpdateTime": time_or_never(r.status_updated),
        "connectionState": if st.session.is_some() { "Connected" } else { "Disconnected" },
        "lastActivityTime": time_or_never(r.last_activity),
        "cloudToDeviceMessageCount": st.c2d.len(),
        "authenticationType": r.auth.kind(),
        "x509Thumbprint": { "primaryThumbprint": r.auth.thumbprints().0, "secondaryThumbprint": r.auth.thumbprints().1 },
        "modelId": r.model_id.clone().unwrap_or_default(),
        "version": st.twin.version,
        "capabilities": { "iotEdge": r.iot_edge },
        "tags": tags,
        "properties": properties,
    });
    if let (Value::Object(a), Value::Object(b)) = (&mut v, rest) {
        a.extend(b);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record::new(Key::generate(), Key::generate())
    }

    #[test]
    fn creates_lists_and_removes_with_modules() {
        let reg = Registry::default();
        let now = crate::hub::clock::wall();
        reg.create("d1", None, rec(), now).unwrap();
        reg.create("d2", None, rec(), now).unwrap();
        reg.create("d1", Some("m1"), rec(), now).unwrap();
        reg.create("d1", Some("m2"), rec(), now).unwrap();
        assert_eq!(reg.create("d1", None, rec(), now).unwrap_err(), RegistryError::AlreadyExists);
        assert_eq!(reg.create("nope", Some("m"), rec(), now).unwrap_err(), RegistryError::DeviceNotFound);
        assert!(matches!(reg.create("bad/id", None, rec(), now), Err(RegistryError::InvalidId(_))));
        for bad in ["a b", "a/b", "a&b", "é", &"x".repeat(129)] {
            assert!(!valid_id(bad), "{bad}");
        }
        for good in ["aa:bb:cc:dd:ee:ff", "a;b", "x-:.+%_#*?!(),=@;$'", &"x".repeat(128)] {
            assert!(valid_id(good), "{good}");
        }
        assert_eq!(reg.devices(10).iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(), ["d1", "d2"]);
        assert_eq!(reg.modules("d1").len(), 2);
        assert_eq!(reg.device_counts(), (2, 2));
        assert_eq!(reg.counts(), (2, 2));
        assert_eq!(reg.remove("d1", Some("m2")).len(), 1);
        assert_eq!(reg.counts(), (2, 1));
        assert_eq!(reg.remove("d1", None).len(), 2);
        assert_eq!(reg.counts(), (1, 0));
        assert!(reg.get("d1", Some("m1")).is_none());
        assert_eq!(reg.modules("d1").len(), 0);
    }

    #[test]
    fn authentication_reads_as_iot_hub_writes_it_and_refuses_what_it_refuses() {
        let read = |v: Value, module: bool| auth_from_json(&v, module).map(|s| s.auth);
        let sha1 = "0123456789abcdef0123456789ABCDEF01234567";
        assert_eq!(read(json!({}), false), Ok(Auth::Sas));
        assert_eq!(read(json!({"type": "SAS"}), false), Ok(Auth::Sas));
        assert_eq!(
            read(json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": sha1}}), false),
            Ok(Auth::SelfSigned { primary: sha1.into(), secondary: None })
        );
        assert_eq!(read(json!({"type": "certificateAuthority"}), false), Ok(Auth::CertificateAuthority));
        assert_eq!(read(json!({"type": "none"}), true), Ok(Auth::None));
        for (bad, module) in [
            (json!({"type": "none"}), false),
            (json!({"type": "selfSigned"}), false),
            (json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": &sha1[1..]}}), false),
            (json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": sha1.replace('0', "g")}}), false),
            (json!({"type": "sas", "symmetricKey": {"primaryKey": "not base64!"}}), false),
            (json!({"type": "x509"}), false),
        ] {
            assert!(read(bad.clone(), module).is_err(), "{bad}");
        }
        for a in [
            Auth::Sas,
            Auth::SelfSigned { primary: sha1.into(), secondary: Some(sha1.into()) },
            Auth::CertificateAuthority,
            Auth::None,
        ] {
            let (p, s) = a.thumbprints();
            assert_eq!(Auth::from_parts(a.kind(), p.map(str::to_owned), s.map(str::to_owned)), Some(a.clone()));
        }
        assert_eq!(Auth::from_parts("tpm", None, None), None);
    }

    #[test]
    fn etags_match_quoted_or_not() {
        assert!(etag_matches("\"*\"", "x"));
        assert!(etag_matches("\"abc\"", "abc"));
        assert!(etag_matches("W/\"abc\"", "abc"));
        assert!(etag_matches("abc", "abc"));
        assert!(!etag_matches("\"abd\"", "abc"));
    }

    #[test]
    fn renders_identity_and_twin_shapes() {
        let reg = Registry::default();
        let d = reg.create("dev", None, rec(), crate::hub::clock::wall()).unwrap();
        let m = reg.create("dev", Some("mod"), rec(), crate::hub::clock::wall()).unwrap();
        let dj = identity_json(&d, &d.lock());
        assert_eq!((dj["status"].as_str(), dj["connectionState"].as_str()), (Some("enabled"), Some("Disconnected")));
        assert_eq!(dj["authentication"]["type"], "sas");
        assert!(dj.get("moduleId").is_none());
        let mj = identity_json(&m, &m.lock());
        assert_eq!(mj["moduleId"], "mod");
        let tj = twin_json(&m, &m.lock());
        assert_eq!(tj["moduleId"], "mod");
        assert_eq!(tj["properties"]["desired"]["$version"], 1);
        assert_eq!(tj["etag"], "AAAAAAAAAAE=");
    }
}
