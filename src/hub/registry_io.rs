//! `fleetsim hub export` and `fleetsim hub import`: the registry in IoT Hub's bulk format, the
//! JSON lines an `ExportDevices` job writes and an `ImportDevices` job reads (Microsoft's "Import
//! and export IoT Hub device identities in bulk"; the `ExportImportDevice` model of the service
//! SDKs): one object per device or module with `id`, `moduleId`, `eTag`, `status`,
//! `statusReason`, `authentication`, `twinETag`, `tags`, `properties` (`desired`, `reported`) and
//! `capabilities`; on import also `importMode`. Both work on a stopped hub's data dir (the store
//! is locked while a hub runs), so a developer can seed an emulator from a real hub's export, and
//! take its registry back.

use std::io::Write;
use std::sync::Arc;

use serde_json::{Value, json};

use super::config::HubConfig;
use super::registry::{AuthSpec, Identity, IdentityState, Record, auth_from_json, auth_json, etag_matches};
use super::state::HubState;
use crate::iot::sas::Key;
use crate::iot::twin;

/// One registry entry as an export line (keys included, as `excludeKeysInExport = false`).
pub fn export_line(identity: &Identity, st: &IdentityState) -> Value {
    let r = &st.record;
    let mut v = json!({ "id": identity.device_id });
    if let Some(m) = &identity.module_id {
        v["moduleId"] = json!(m);
    }
    let rest = json!({
        "eTag": r.etag(),
        "status": if r.enabled { "enabled" } else { "disabled" },
        "statusReason": r.status_reason,
        "authentication": auth_json(r),
        "twinETag": st.twin.etag(),
        "tags": st.twin.tags,
        "properties": { "desired": st.twin.desired, "reported": st.twin.reported },
        "capabilities": { "iotEdge": r.iot_edge },
    });
    if let (Value::Object(a), Value::Object(b)) = (&mut v, rest) {
        a.extend(b);
    }
    v
}

/// Writes every device, each followed by its modules, one line each. Returns how many.
pub fn export(hub: &HubState, out: &mut dyn Write) -> std::io::Result<usize> {
    let mut n = 0;
    for identity in hub.registry.all() {
        let line = export_line(&identity, &identity.lock());
        writeln!(out, "{line}")?;
        n += 1;
    }
    Ok(n)
}

/// The import modes of IoT Hub's `ImportMode` (absent: `createOrUpdate`, the enum's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    CreateOrUpdate,
    CreateOrUpdateIfMatchETag,
    Update,
    UpdateIfMatchETag,
    Delete,
    DeleteIfMatchETag,
    UpdateTwin,
    UpdateTwinIfMatchETag,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Some(match s.to_ascii_lowercase().as_str() {
            "create" => Mode::Create,
            "createorupdate" => Mode::CreateOrUpdate,
            "createorupdateifmatchetag" => Mode::CreateOrUpdateIfMatchETag,
            "update" => Mode::Update,
            "updateifmatchetag" => Mode::UpdateIfMatchETag,
            "delete" => Mode::Delete,
            "deleteifmatchetag" => Mode::DeleteIfMatchETag,
            "updatetwin" => Mode::UpdateTwin,
            "updatetwinifmatchetag" => Mode::UpdateTwinIfMatchETag,
            _ => return None,
        })
    }
}

/// What an import did: lines applied, and each refused line with its number and why.
#[derive(Debug, Default)]
pub struct ImportReport {
    pub applied: usize,
    pub errors: Vec<String>,
}

/// Applies each line of `text` in order (blank lines skipped). A refused line is reported and the
/// rest go on, as an import job does (its errors go to the job's log).
pub fn import(hub: &HubState, text: &str) -> ImportReport {
    let mut report = ImportReport::default();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line).map_err(|e| format!("not JSON: {e}")).and_then(|v| apply(hub, &v)) {
            Ok(()) => report.applied += 1,
            Err(e) => report.errors.push(format!("line {}: {e}", i + 1)),
        }
    }
    hub.refresh_identity_gauges();
    report
}

fn text<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// The entry's `authentication` (`None` when it has none), as the REST API reads it.
fn auth(v: &Value, module: bool) -> Result<Option<AuthSpec>, String> {
    v.get("authentication").filter(|a| !a.is_null()).map(|a| auth_from_json(a, module)).transpose()
}

fn apply(hub: &HubState, v: &Value) -> Result<(), String> {
    let device = text(v, "id").ok_or("no `id`")?;
    let module = text(v, "moduleId").filter(|m| !m.is_empty());
    let who = match module {
        Some(m) => format!("{device}/{m}"),
        None => device.to_owned(),
    };
    let mode = match text(v, "importMode") {
        None => Mode::CreateOrUpdate,
        Some(m) => Mode::parse(m).ok_or_else(|| format!("{who}: importMode `{m}` is not one IoT Hub knows"))?,
    };
    let existing = hub.registry.get(device, module);
    let etag = text(v, "eTag");
    let fail = |m: &str| Err(format!("{who}: {m}"));
    match (mode, &existing) {
        (Mode::Create, Some(_)) => return fail("already exists"),
        (Mode::Update | Mode::UpdateIfMatchETag | Mode::Delete | Mode::DeleteIfMatchETag, None)
        | (Mode::UpdateTwin | Mode::UpdateTwinIfMatchETag, None) => return fail("does not exist"),
        _ => {}
    }
    let needs =
        |m: Mode| matches!(m, Mode::CreateOrUpdateIfMatchETag | Mode::UpdateIfMatchETag | Mode::DeleteIfMatchETag);
    if let Some(identity) = &existing
        && needs(mode)
        && !etag.is_some_and(|e| etag_matches(e, &identity.lock().record.etag()))
    {
        return fail("the eTag does not match");
    }
    if matches!(mode, Mode::Delete | Mode::DeleteIfMatchETag) {
        hub.remove_identity(device, module);
        return Ok(());
    }
    let identity = match existing {
        Some(identity) if matches!(mode, Mode::UpdateTwin | Mode::UpdateTwinIfMatchETag) => {
            let twin_etag = text(v, "twinETag");
            if mode == Mode::UpdateTwinIfMatchETag
                && !twin_etag.is_some_and(|e| etag_matches(e, &identity.lock().twin.etag()))
            {
                return fail("the twinETag does not match");
            }
            identity
        }
        Some(identity) => {
            overwrite(&mut identity.lock().record, v, module.is_some()).map_err(|e| format!("{who}: {e}"))?;
            identity
        }
        None => {
            let mut record = Record::new(Key::generate(), Key::generate());
            overwrite(&mut record, v, module.is_some()).map_err(|e| format!("{who}: {e}"))?;
            record.record_version = 1;
            hub.registry.create(device, module, record, super::clock::wall()).map_err(|e| format!("{who}: {e}"))?
        }
    };
    twin_from(&identity, v).map_err(|e| format!("{who}: {e}"))?;
    hub.store.identity(&identity);
    Ok(())
}

/// Status, reason, authentication and capabilities from `v` onto `r` (what an update
/// overwrites; a key left out keeps the one `r` has).
fn overwrite(r: &mut Record, v: &Value, module: bool) -> Result<(), String> {
    if let Some(spec) = auth(v, module)? {
        let [p, s] = spec.keys;
        if p.is_some() || s.is_some() {
            let p = p.unwrap_or_else(|| r.keys[0].clone());
            let s = s.unwrap_or_else(|| r.keys[1].clone());
            r.set_keys(p, s);
        }
        r.auth = spec.auth;
    }
    match text(v, "status") {
        None => {}
        Some(s) if s.eq_ignore_ascii_case("enabled") => r.enabled = true,
        Some(s) if s.eq_ignore_ascii_case("disabled") => r.enabled = false,
        Some(s) => return Err(format!("status `{s}` is neither enabled nor disabled")),
    }
    r.status_reason = text(v, "statusReason").map(str::to_owned);
    if let Some(edge) = v.get("capabilities").and_then(|c| c.get("iotEdge")).and_then(Value::as_bool) {
        r.iot_edge = edge;
    }
    r.record_version += 1;
    Ok(())
}

/// Tags and desired replace the twin's (when given); reported values are merged in as a device
/// patch would. Read-only members (`$metadata`, `$version`) of an export are ignored.
fn twin_from(identity: &Arc<Identity>, v: &Value) -> Result<(), String> {
    let tags = v.get("tags").filter(|t| !t.is_null());
    let props = v.get("properties");
    let section = |name: &str| props.and_then(|p| p.get(name)).filter(|s| !s.is_null()).map(twin::without_read_only);
    let (desired, reported) = (section("desired"), section("reported"));
    let now = super::clock::wall();
    let mut st = identity.lock();
    if tags.is_some() || desired.is_some() {
        let tags = tags.cloned().or_else(|| Some(Value::Object(st.twin.tags.clone())));
        let desired = desired.or_else(|| Some(Value::Object(st.twin.desired.clone())));
        st.twin.replace_service(tags.as_ref(), desired.as_ref(), now).map_err(|e| e.to_string())?;
    }
    if let Some(r) = reported.filter(|r| r.as_object().is_some_and(|m| !m.is_empty())) {
        st.twin.patch_reported(&r, now).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Opens the hub state of `config.data_dir` (its keys and store) without serving anything.
fn open(config: &HubConfig) -> anyhow::Result<HubState> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| anyhow::anyhow!("cannot create the data dir {}: {e}", config.data_dir.display()))?;
    let secrets = super::secrets::Secrets::load_or_create(&config.data_dir, &config.keys)?;
    HubState::open(config, secrets, Some(&config.data_dir))
}

/// `fleetsim hub export`: every identity of the store in `config.data_dir`, to `out`.
pub fn export_data_dir(config: &HubConfig, out: &mut dyn Write) -> anyhow::Result<usize> {
    let hub = open(config)?;
    let n = export(&hub, out)?;
    hub.store.close();
    Ok(n)
}

/// `fleetsim hub import`: applies `text` to the store in `config.data_dir` and commits it.
pub fn import_data_dir(config: &HubConfig, text: &str) -> anyhow::Result<ImportReport> {
    let hub = open(config)?;
    let report = import(&hub, text);
    hub.store.close();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> HubState {
        let dir = tempfile::tempdir().unwrap();
        let secrets = crate::hub::secrets::Secrets::load_or_create(dir.path(), &Default::default()).unwrap();
        HubState::new(&HubConfig::default(), secrets).unwrap()
    }

    #[test]
    fn an_export_imports_back_with_every_field() {
        let a = hub();
        let lines = [
            json!({"id": "d1", "status": "disabled", "statusReason": "parked", "capabilities": {"iotEdge": true},
                   "authentication": {"type": "sas", "symmetricKey": {"primaryKey": Key::generate().to_base64(),
                   "secondaryKey": Key::generate().to_base64()}},
                   "tags": {"site": "a"}, "properties": {"desired": {"t": 1, "$version": 4, "$metadata": {}},
                   "reported": {"fw": "2"}}}),
            json!({"id": "d1", "moduleId": "m", "importMode": "create", "tags": {"k": 1}}),
            json!({"id": "d2", "importMode": "Create"}),
            json!({"id": "x1", "authentication": {"type": "selfSigned",
                   "x509Thumbprint": {"primaryThumbprint": "ab".repeat(32), "secondaryThumbprint": null}}}),
            json!({"id": "x1", "moduleId": "none", "authentication": {"type": "none"}}),
            json!({"id": "x2", "authentication": {"type": "certificateAuthority"}}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let report = import(&a, &text);
        assert_eq!((report.applied, report.errors.len()), (6, 0), "{:?}", report.errors);
        let mut out = Vec::new();
        assert_eq!(export(&a, &mut out).unwrap(), 6);
        let exported = String::from_utf8(out).unwrap();
        let first: Value = serde_json::from_str(exported.lines().next().unwrap()).unwrap();
        assert_eq!(first["status"], "disabled");
        assert_eq!(first["statusReason"], "parked");
        assert_eq!(first["capabilities"]["iotEdge"], true);
        assert_eq!(
            first["authentication"]["symmetricKey"]["primaryKey"],
            lines[0]["authentication"]["symmetricKey"]["primaryKey"]
        );
        assert_eq!(first["tags"], json!({"site": "a"}));
        assert_eq!(first["properties"], json!({"desired": {"t": 1}, "reported": {"fw": "2"}}));

        // Into another hub: the same registry.
        let b = hub();
        let report = import(&b, &exported);
        assert_eq!((report.applied, report.errors.len()), (6, 0), "{:?}", report.errors);
        let x1 = exported.lines().find(|l| l.contains("\"x1\"") && !l.contains("moduleId")).unwrap();
        let x1: Value = serde_json::from_str(x1).unwrap();
        assert_eq!(x1["authentication"]["type"], "selfSigned");
        assert_eq!(x1["authentication"]["x509Thumbprint"]["primaryThumbprint"], json!("ab".repeat(32)));
        assert_eq!(x1["authentication"]["symmetricKey"]["primaryKey"], Value::Null);
        let mut again = Vec::new();
        export(&b, &mut again).unwrap();
        let strip = |t: &str| -> Vec<Value> {
            t.lines()
                .map(|l| {
                    let mut v: Value = serde_json::from_str(l).unwrap();
                    v.as_object_mut().unwrap().retain(|k, _| k != "eTag" && k != "twinETag");
                    v
                })
                .collect()
        };
        assert_eq!(strip(&String::from_utf8(again).unwrap()), strip(&exported));
    }

    #[test]
    fn modes_refuse_what_iot_hub_refuses_and_carry_on() {
        let h = hub();
        let text = [
            json!({"id": "d1", "importMode": "create"}).to_string(),
            json!({"id": "d1", "importMode": "create"}).to_string(),
            json!({"id": "ghost", "importMode": "update"}).to_string(),
            json!({"id": "d1", "importMode": "updateIfMatchETag", "eTag": "nope"}).to_string(),
            json!({"id": "d1", "importMode": "upsert"}).to_string(),
            "{not json".to_owned(),
            json!({"id": "x", "authentication": {"type": "selfSigned"}}).to_string(),
            json!({"id": "orphan", "moduleId": "m"}).to_string(),
            json!({"id": "d1", "importMode": "updateTwin", "properties": {"desired": {"a": 1}}}).to_string(),
            json!({"id": "d2"}).to_string(),
            json!({"id": "d2", "importMode": "delete"}).to_string(),
        ]
        .join("\n");
        let report = import(&h, &text);
        assert_eq!(report.applied, 4, "{:?}", report.errors);
        let lines: Vec<&str> = report.errors.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(
            lines,
            ["line 2", "line 3", "line 4", "line 5", "line 6", "line 7", "line 8"],
            "{:?}",
            report.errors
        );
        assert!(report.errors[5].contains("selfSigned"), "{:?}", report.errors);
        assert!(h.registry.get("d2", None).is_none());
        assert_eq!(h.registry.get("d1", None).unwrap().lock().twin.desired["a"], 1);
    }
}
