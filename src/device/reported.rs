//! Reported patches that must be sent again (the hub throttled or failed them, or the connection
//! dropped before it answered) must not undo a newer report of the same property: the hub applies
//! reported patches in the order they arrive, so an old writable acknowledgement resent after a
//! newer one would leave the older `av` in the twin. This file says which parts of a patch a newer
//! one supersedes. No I/O.

use serde_json::{Map, Value};

/// The property paths a patch sets: each top-level key, or for a Plug and Play component (an
/// object marked `"__t": "c"`, IoT Central's convention) each of its properties, as
/// `component/property`.
pub fn paths(patch: &Value) -> Vec<String> {
    let Some(top) = patch.as_object() else { return Vec::new() };
    let mut out = Vec::new();
    for (k, v) in top {
        match component(v) {
            Some(props) => out.extend(props.keys().filter(|p| *p != "__t").map(|p| format!("{k}/{p}"))),
            None => out.push(k.clone()),
        }
    }
    out
}

fn component(v: &Value) -> Option<&Map<String, Value>> {
    v.as_object().filter(|o| o.get("__t").and_then(Value::as_str) == Some("c"))
}

/// The patch without the paths for which `superseded` holds; `None` when nothing is left.
pub fn without(patch: &Value, superseded: impl Fn(&str) -> bool) -> Option<Value> {
    let top = patch.as_object()?;
    let mut out = Map::new();
    for (k, v) in top {
        match component(v) {
            Some(props) => {
                let kept: Map<String, Value> = props
                    .iter()
                    .filter(|(p, _)| *p == "__t" || !superseded(&format!("{k}/{p}")))
                    .map(|(p, x)| (p.clone(), x.clone()))
                    .collect();
                if kept.len() > 1 {
                    out.insert(k.clone(), Value::Object(kept));
                }
            }
            None if superseded(k) => {}
            None => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    (!out.is_empty()).then_some(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn components_are_superseded_property_by_property() {
        let p = json!({"brightness": {"value": 3, "av": 3}, "thermostat1": {"__t": "c", "target": 1, "max": 2}});
        assert_eq!(paths(&p), ["brightness", "thermostat1/target", "thermostat1/max"]);
        let newer = ["brightness", "thermostat1/max"];
        assert_eq!(without(&p, |path| newer.contains(&path)), Some(json!({"thermostat1": {"__t": "c", "target": 1}})));
        assert_eq!(without(&p, |_| true), None);
        assert_eq!(without(&p, |_| false), Some(p.clone()));
        // A plain object value is one property, whatever it holds.
        let q = json!({"status": {"a": 1, "b": 2}});
        assert_eq!(paths(&q), ["status"]);
        assert_eq!(without(&json!("not an object"), |_| false), None);
    }
}
