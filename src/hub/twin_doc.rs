//! One identity's twin as the hub keeps it: tags, desired and reported sections with their
//! `$version`s, `$metadata` timestamps, and the whole twin's `version` and etag. Renders the device
//! view (twin GET over MQTT) and the service view (REST).

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::iot::time::iso8601;
use crate::iot::twin::{self, TwinError};

/// One twin section's values.
type Section = Map<String, Value>;

/// When each member last changed, mirroring the shape of a section.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Meta {
    updated: SystemTime,
    version: Option<u64>,
    children: BTreeMap<String, Meta>,
}

impl Meta {
    fn new(at: SystemTime) -> Meta {
        Meta { updated: at, version: None, children: BTreeMap::new() }
    }

    /// Stamps every member the patch touched (and this level) with `at`.
    fn touch(&mut self, patch: &Map<String, Value>, at: SystemTime, version: Option<u64>) {
        self.updated = at;
        for (k, v) in patch.iter().filter(|(k, _)| !k.starts_with('$')) {
            match v {
                Value::Null => {
                    self.children.remove(k);
                }
                Value::Object(p) => {
                    let child = self.children.entry(k.clone()).or_insert_with(|| Meta::new(at));
                    child.version = version;
                    child.touch(p, at, version);
                }
                _ => {
                    let child = self.children.entry(k.clone()).or_insert_with(|| Meta::new(at));
                    *child = Meta { updated: at, version, children: BTreeMap::new() };
                }
            }
        }
    }

    /// `$metadata` for the values currently in `section`.
    fn render(&self, section: &Map<String, Value>) -> Value {
        let mut out = Map::new();
        for (k, v) in section {
            let child = self.children.get(k).cloned().unwrap_or_else(|| Meta::new(self.updated));
            let rendered = match v {
                Value::Object(m) => child.render(m),
                _ => child.leaf(),
            };
            out.insert(k.clone(), rendered);
        }
        out.insert("$lastUpdated".into(), json!(iso8601(self.updated)));
        if let Some(v) = self.version {
            out.insert("$lastUpdatedVersion".into(), json!(v));
        }
        Value::Object(out)
    }

    fn leaf(&self) -> Value {
        let mut m = Map::new();
        m.insert("$lastUpdated".into(), json!(iso8601(self.updated)));
        if let Some(v) = self.version {
            m.insert("$lastUpdatedVersion".into(), json!(v));
        }
        Value::Object(m)
    }
}

/// A twin. Section versions start at 1 like a new IoT Hub identity's. Serializable whole (with
/// its metadata), which is how the store keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TwinDoc {
    pub tags: Map<String, Value>,
    pub desired: Map<String, Value>,
    pub reported: Map<String, Value>,
    pub desired_version: u64,
    pub reported_version: u64,
    /// Increments on every change to the twin.
    pub version: u64,
    desired_meta: Meta,
    reported_meta: Meta,
}

/// A change to desired properties that a connected device must hear about.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredChange {
    /// The changed members (nulls for deletions) plus `$version`.
    pub patch: Value,
    pub version: u64,
}

impl TwinDoc {
    pub fn new(at: SystemTime) -> TwinDoc {
        TwinDoc {
            tags: Map::new(),
            desired: Map::new(),
            reported: Map::new(),
            desired_version: 1,
            reported_version: 1,
            version: 1,
            desired_meta: Meta::new(at),
            reported_meta: Meta::new(at),
        }
    }

    /// The twin's weak etag: base64 of its version, the form IoT Hub shows (`AAAAAAAAAAc=`).
    pub fn etag(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.version.to_be_bytes())
    }

    /// A device's reported patch. Returns the new reported `$version`.
    pub fn patch_reported(&mut self, patch: &Value, at: SystemTime) -> Result<u64, TwinError> {
        twin::apply_patch(&mut self.reported, patch, twin::REPORTED)?;
        self.reported_version += 1;
        self.version += 1;
        self.reported_meta.touch(patch.as_object().expect("validated as object"), at, None);
        Ok(self.reported_version)
    }

    /// Tags and desired as they would be after a service update (merged onto the current ones, or
    /// onto nothing for a replace), every part checked before anything changes.
    fn staged(
        &self,
        tags: Option<&Value>,
        desired: Option<&Value>,
        replace: bool,
    ) -> Result<(Section, Section), TwinError> {
        let (mut t, mut d) = if replace { (Map::new(), Map::new()) } else { (self.tags.clone(), self.desired.clone()) };
        if let Some(p) = tags {
            twin::apply_patch(&mut t, p, twin::TAGS)?;
        }
        if let Some(p) = desired {
            twin::apply_patch(&mut d, p, twin::DESIRED)?;
        }
        Ok((t, d))
    }

    /// A service PATCH: merges tags and desired. All parts are checked before any is applied.
    pub fn patch_service(
        &mut self,
        tags: Option<&Value>,
        desired: Option<&Value>,
        at: SystemTime,
    ) -> Result<Option<DesiredChange>, TwinError> {
        let (new_tags, new_desired) = self.staged(tags, desired, false)?;
        self.tags = new_tags;
        self.version += 1;
        let Some(d) = desired else { return Ok(None) };
        self.desired = new_desired;
        Ok(Some(self.bump_desired(d.as_object().cloned().unwrap_or_default(), at)))
    }

    /// A service PUT: replaces tags and desired wholesale. The device hears the difference.
    pub fn replace_service(
        &mut self,
        tags: Option<&Value>,
        desired: Option<&Value>,
        at: SystemTime,
    ) -> Result<Option<DesiredChange>, TwinError> {
        let (new_tags, new_desired) = self.staged(tags, desired, true)?;
        self.tags = new_tags;
        self.version += 1;
        let mut diff = Map::new();
        for k in self.desired.keys() {
            if !new_desired.contains_key(k) {
                diff.insert(k.clone(), Value::Null);
            }
        }
        for (k, v) in &new_desired {
            if self.desired.get(k) != Some(v) {
                diff.insert(k.clone(), v.clone());
            }
        }
        self.desired = new_desired;
        if diff.is_empty() {
            return Ok(None);
        }
        self.desired_meta = Meta::new(at);
        let mut change = self.bump_desired(self.desired.clone(), at);
        // The notification carries the difference, not the whole section.
        diff.insert("$version".into(), json!(change.version));
        change.patch = Value::Object(diff);
        Ok(Some(change))
    }

    fn bump_desired(&mut self, patch: Map<String, Value>, at: SystemTime) -> DesiredChange {
        self.desired_version += 1;
        self.desired_meta.touch(&patch, at, Some(self.desired_version));
        let mut p = patch;
        p.insert("$version".into(), json!(self.desired_version));
        DesiredChange { patch: Value::Object(p), version: self.desired_version }
    }

    /// What a device gets for `$iothub/twin/GET`: both sections with `$version`, no metadata.
    pub fn device_view(&self) -> Value {
        let mut desired = self.desired.clone();
        desired.insert("$version".into(), json!(self.desired_version));
        let mut reported = self.reported.clone();
        reported.insert("$version".into(), json!(self.reported_version));
        json!({ "desired": desired, "reported": reported })
    }

    /// A reported patch as a twin change event carries it: the patch's members (nulls for
    /// deletions) with their `$metadata` and the section's `$version` ("Azure IoT Hub
    /// non-telemetry event schemas": device twin change events).
    pub fn reported_change(&self, patch: &Map<String, Value>) -> Value {
        Self::change(patch, &self.reported_meta, self.reported_version)
    }

    /// A desired change (the `patch` of a `DesiredChange`, `$version` included) as a twin change
    /// event carries it, with the members' `$metadata`.
    pub fn desired_change(&self, patch: &Map<String, Value>) -> Value {
        Self::change(patch, &self.desired_meta, self.desired_version)
    }

    fn change(patch: &Map<String, Value>, meta: &Meta, version: u64) -> Value {
        let members: Map<String, Value> =
            patch.iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut m = members.clone();
        m.insert("$metadata".into(), meta.render(&members));
        m.insert("$version".into(), json!(version));
        Value::Object(m)
    }

    /// The `properties` and `tags` parts of the service view.
    pub fn service_parts(&self) -> (Value, Value) {
        let section = |values: &Map<String, Value>, meta: &Meta, version: u64| {
            let mut m = values.clone();
            m.insert("$metadata".into(), meta.render(values));
            m.insert("$version".into(), json!(version));
            Value::Object(m)
        };
        let props = json!({
            "desired": section(&self.desired, &self.desired_meta, self.desired_version),
            "reported": section(&self.reported, &self.reported_meta, self.reported_version),
        });
        (Value::Object(self.tags.clone()), props)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    #[test]
    fn versions_and_notifications_follow_the_hub() {
        let mut twin = TwinDoc::new(t(0));
        assert_eq!(twin.device_view(), json!({"desired": {"$version": 1}, "reported": {"$version": 1}}));
        assert_eq!(twin.patch_reported(&json!({"a": 1, "b": {"c": 2}}), t(1)).unwrap(), 2);
        assert_eq!(twin.patch_reported(&json!({"b": null}), t(2)).unwrap(), 3);
        let change =
            twin.patch_service(Some(&json!({"floor": 2})), Some(&json!({"x": {"y": 1}})), t(3)).unwrap().unwrap();
        assert_eq!(change, DesiredChange { patch: json!({"x": {"y": 1}, "$version": 2}), version: 2 });
        assert!(twin.patch_service(Some(&json!({"floor": 3})), None, t(4)).unwrap().is_none());
        let etag_before = twin.etag();
        let replaced = twin.replace_service(None, Some(&json!({"z": true})), t(5)).unwrap().unwrap();
        assert_eq!(replaced.patch, json!({"x": null, "z": true, "$version": 3}));
        assert_ne!(twin.etag(), etag_before);
        assert!(twin.tags.is_empty());
        assert_eq!(
            twin.device_view(),
            json!({"desired": {"z": true, "$version": 3}, "reported": {"a": 1, "$version": 3}})
        );
    }

    #[test]
    fn metadata_mirrors_the_values() {
        let mut twin = TwinDoc::new(t(0));
        twin.patch_reported(&json!({"a": {"b": 1}}), t(10)).unwrap();
        twin.patch_service(None, Some(&json!({"d": 5})), t(20)).unwrap();
        let (_, props) = twin.service_parts();
        assert_eq!(props["reported"]["$metadata"]["a"]["b"]["$lastUpdated"], json!("2023-11-14T22:13:30.000Z"));
        assert_eq!(props["reported"]["$metadata"]["$lastUpdated"], json!("2023-11-14T22:13:30.000Z"));
        assert_eq!(props["desired"]["$metadata"]["d"]["$lastUpdatedVersion"], json!(2));
        assert_eq!(props["desired"]["$version"], json!(2));
    }

    #[test]
    fn a_refused_patch_changes_nothing() {
        let mut twin = TwinDoc::new(t(0));
        let err = twin.patch_service(Some(&json!({"ok": 1})), Some(&json!({"bad.key": 1})), t(1)).unwrap_err();
        assert!(matches!(err, TwinError::BadKey { .. }));
        assert!(twin.tags.is_empty());
        assert_eq!((twin.version, twin.desired_version), (1, 1));
    }
}
