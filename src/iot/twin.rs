//! Twin documents (protocol.md §4.9, §6.4): JSON merge-patch with `null` deletion, and the hub's
//! validation rules for keys, depth, values and section sizes.

use serde_json::{Map, Value};

/// Limits of one twin section, from the IoT Hub documentation.
#[derive(Debug, Clone, Copy)]
pub struct SectionLimits {
    pub max_bytes: usize,
    pub max_depth: usize,
}

pub const DESIRED: SectionLimits = SectionLimits { max_bytes: 32 * 1024, max_depth: 10 };
pub const REPORTED: SectionLimits = SectionLimits { max_bytes: 32 * 1024, max_depth: 10 };
pub const TAGS: SectionLimits = SectionLimits { max_bytes: 8 * 1024, max_depth: 10 };

const MAX_KEY_BYTES: usize = 1024;
const MAX_STRING_CHARS: usize = 4 * 1024;
const MAX_SAFE_INT: i64 = 4_503_599_627_370_495;
const MIN_SAFE_INT: i64 = -4_503_599_627_370_496;

/// Why a twin patch was refused; `path` is the JSON path of the offending member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    #[error("twin patch must be a JSON object")]
    NotObject,
    #[error("property name `{path}` is not allowed (no `.`, `$`, space or control characters, at most 1 KB)")]
    BadKey { path: String },
    #[error("`{path}` nests deeper than {max} levels")]
    TooDeep { path: String, max: usize },
    #[error("string at `{path}` is longer than 4 KB")]
    StringTooLong { path: String },
    #[error("integer at `{path}` is outside the twin's range")]
    IntegerOutOfRange { path: String },
    #[error("the section would be {size} bytes, over its {max} byte limit")]
    TooLarge { size: usize, max: usize },
}

/// Merges `patch` into `target`: objects merge recursively, `null` deletes, anything else replaces.
/// Returns whether anything changed.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) -> bool {
    let mut changed = false;
    for (k, v) in patch {
        match v {
            Value::Null => changed |= target.shift_remove(k).is_some(),
            Value::Object(p) => {
                let entry = target.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                    changed = true;
                }
                let Value::Object(t) = entry else { unreachable!() };
                // An object patch creates its members even when they end up empty.
                changed |= merge(t, p) || p.is_empty();
            }
            other => {
                if target.get(k) != Some(other) {
                    target.insert(k.clone(), other.clone());
                    changed = true;
                }
            }
        }
    }
    changed
}

/// Checks a patch for one section before it is applied. Every key follows the key rules, `$`
/// included: the hub refuses what it would not store (400 / 400004) instead of dropping it
/// (iot-hub-devguide-device-twins, "Keys"). Callers that accept a twin they got from the hub
/// strip its read-only members first ([`without_read_only`]).
pub fn validate_patch(patch: &Value, limits: SectionLimits) -> Result<(), TwinError> {
    let Value::Object(map) = patch else { return Err(TwinError::NotObject) };
    for (k, v) in map {
        validate_member(k, v, k, 1, limits.max_depth)?;
    }
    Ok(())
}

/// The members of a section only the hub writes: a service that sends back a twin it read (the
/// get-modify-replace pattern of the service SDKs) carries them, and the hub ignores them there.
pub const READ_ONLY: [&str; 2] = ["$version", "$metadata"];

/// A desired or reported section from a service request without its read-only members; any other
/// `$` key stays and is refused by [`validate_patch`].
pub fn without_read_only(section: &Value) -> Value {
    match section {
        Value::Object(m) => Value::Object(
            m.iter().filter(|(k, _)| !READ_ONLY.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect(),
        ),
        other => other.clone(),
    }
}

fn validate_member(key: &str, v: &Value, path: &str, depth: usize, max_depth: usize) -> Result<(), TwinError> {
    let bad_key = key.is_empty()
        || key.len() > MAX_KEY_BYTES
        || key.chars().any(|c| c.is_control() || c == '.' || c == '$' || c == ' ');
    if bad_key {
        return Err(TwinError::BadKey { path: path.to_owned() });
    }
    if depth > max_depth {
        return Err(TwinError::TooDeep { path: path.to_owned(), max: max_depth });
    }
    match v {
        Value::String(s) if s.chars().count() > MAX_STRING_CHARS => {
            Err(TwinError::StringTooLong { path: path.to_owned() })
        }
        Value::Number(n) => check_number(n, path),
        Value::Object(m) => {
            for (k, child) in m {
                validate_member(k, child, &format!("{path}.{k}"), depth + 1, max_depth)?;
            }
            Ok(())
        }
        Value::Array(items) => validate_items(items, path, depth, max_depth),
        _ => Ok(()),
    }
}

/// Integers must fit the range the hub keeps exactly (its JSON numbers are doubles).
fn check_number(n: &serde_json::Number, path: &str) -> Result<(), TwinError> {
    match n.as_i64() {
        Some(i) if !(MIN_SAFE_INT..=MAX_SAFE_INT).contains(&i) => {
            Err(TwinError::IntegerOutOfRange { path: path.to_owned() })
        }
        None if n.is_u64() => Err(TwinError::IntegerOutOfRange { path: path.to_owned() }),
        _ => Ok(()),
    }
}

/// Objects anywhere inside an array (arrays of arrays included) follow the same key and value
/// rules as members; otherwise a bad key one level down would be stored unchecked.
fn validate_items(items: &[Value], path: &str, depth: usize, max_depth: usize) -> Result<(), TwinError> {
    for (i, child) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        match child {
            Value::Object(m) => {
                for (k, c) in m {
                    validate_member(k, c, &format!("{at}.{k}"), depth + 1, max_depth)?;
                }
            }
            Value::Array(inner) => validate_items(inner, &at, depth + 1, max_depth)?,
            Value::String(s) if s.chars().count() > MAX_STRING_CHARS => {
                return Err(TwinError::StringTooLong { path: at });
            }
            Value::Number(n) => check_number(n, &at)?,
            _ => {}
        }
    }
    Ok(())
}

/// The hub's size measure: key lengths plus value sizes (strings by characters, numbers 8,
/// booleans 4, nested objects recursively), skipping `$`-prefixed members.
pub fn section_size(map: &Map<String, Value>) -> usize {
    map.iter().filter(|(k, _)| !k.starts_with('$')).map(|(k, v)| k.chars().count() + value_size(v)).sum()
}

fn value_size(v: &Value) -> usize {
    match v {
        Value::Null => 0,
        Value::Bool(_) => 4,
        Value::Number(_) => 8,
        Value::String(s) => s.chars().filter(|c| !c.is_control()).count(),
        Value::Array(a) => a.iter().map(value_size).sum(),
        Value::Object(m) => section_size(m),
    }
}

/// Checks the size of a section after a patch would be applied.
pub fn check_size(section: &Map<String, Value>, limits: SectionLimits) -> Result<(), TwinError> {
    let size = section_size(section);
    if size > limits.max_bytes { Err(TwinError::TooLarge { size, max: limits.max_bytes }) } else { Ok(()) }
}

/// Applies a validated patch to a copy and checks the result's size; the section is only replaced
/// when everything passes, so a refused patch leaves no trace.
pub fn apply_patch(section: &mut Map<String, Value>, patch: &Value, limits: SectionLimits) -> Result<bool, TwinError> {
    validate_patch(patch, limits)?;
    let Value::Object(p) = patch else { return Err(TwinError::NotObject) };
    let mut next = section.clone();
    let changed = merge(&mut next, p);
    check_size(&next, limits)?;
    *section = next;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn merges_recursively_and_deletes_nulls() {
        let mut t = obj(json!({"a": 1, "b": {"c": 2, "d": 3}, "e": "x"}));
        assert!(merge(&mut t, &obj(json!({"b": {"c": null, "f": [1, 2]}, "e": null, "g": {"h": true}}))));
        assert_eq!(Value::Object(t.clone()), json!({"a": 1, "b": {"d": 3, "f": [1, 2]}, "g": {"h": true}}));
        assert!(!merge(&mut t, &obj(json!({"a": 1, "zz": null}))));
        assert!(merge(&mut t, &obj(json!({"a": {"x": 1}}))));
        assert_eq!(t["a"], json!({"x": 1}));
    }

    #[test]
    fn enforces_key_depth_and_value_rules() {
        assert!(validate_patch(&json!({"ok": {"nested_1": [1, {"x": "y"}]}}), REPORTED).is_ok());
        // The issue-12 instance: a `$` key at the root is refused, not dropped.
        for bad in ["$foo", "$version", "$metadata"] {
            assert!(matches!(validate_patch(&json!({bad: 1}), REPORTED), Err(TwinError::BadKey { .. })), "{bad}");
        }
        // Inside arrays, arrays of arrays included, the same rules hold.
        for bad in
            [json!({"a": [[{"$k": 1}]]}), json!({"a": [["x".repeat(4097)]]}), json!({"a": [4_503_599_627_370_496i64]})]
        {
            assert!(validate_patch(&bad, REPORTED).is_err(), "{bad}");
        }
        assert!(validate_patch(&json!({"a": [[{"k": 1}], [1, "s"]]}), REPORTED).is_ok());
        assert_eq!(
            without_read_only(&json!({"$version": 3, "$metadata": {}, "$foo": 1, "a": 2})),
            json!({"$foo": 1, "a": 2})
        );
        assert_eq!(validate_patch(&json!([1]), REPORTED), Err(TwinError::NotObject));
        for bad in ["a.b", "a b", "a$", "a\u{1}", ""] {
            assert!(
                matches!(validate_patch(&json!({"p": {bad: 1}}), REPORTED), Err(TwinError::BadKey { .. })),
                "{bad:?}"
            );
        }
        let mut deep = json!(1);
        for _ in 0..11 {
            deep = json!({ "l": deep });
        }
        assert!(matches!(validate_patch(&deep, REPORTED), Err(TwinError::TooDeep { .. })));
        assert!(matches!(
            validate_patch(&json!({"s": "x".repeat(4097)}), REPORTED),
            Err(TwinError::StringTooLong { .. })
        ));
        assert!(matches!(
            validate_patch(&json!({"n": 4_503_599_627_370_496i64}), REPORTED),
            Err(TwinError::IntegerOutOfRange { .. })
        ));
        assert!(validate_patch(&json!({"n": -4_503_599_627_370_496i64, "f": 1.5e300}), REPORTED).is_ok());
    }

    #[test]
    fn refuses_oversized_sections_without_changing_them() {
        let mut section = obj(json!({"keep": true}));
        let big: Map<String, Value> = (0..9).map(|i| (format!("k{i}"), json!("x".repeat(4000)))).collect();
        let err = apply_patch(&mut section, &Value::Object(big), REPORTED).unwrap_err();
        assert!(matches!(err, TwinError::TooLarge { max: 32768, .. }));
        assert_eq!(Value::Object(section.clone()), json!({"keep": true}));
        assert_eq!(section_size(&obj(json!({"ab": "xyz", "n": 1, "b": false, "$version": 3}))), 2 + 3 + 1 + 8 + 1 + 4);
        assert!(apply_patch(&mut section, &json!({"x": 1}), REPORTED).unwrap());
        assert!(apply_patch(&mut section, &json!({"y": 1, "$version": 9}), REPORTED).is_err());
        assert!(!section.contains_key("y"));
    }
}
