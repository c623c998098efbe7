//! From templates to identities: ids, keys and credentials, and this process's shard of them.
//! Keys the fleet invents (for connection-string devices, individual enrollments and modules)
//! are derived from a seed and the identity's id, so a device and its modules agree on them,
//! and so do restarts and other shards.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use crate::device::spec::{Credentials, EdgePlan, IdentitySpec};
use crate::iot::sas::{Key, derive_device_key};
use crate::problems::Problem;
use crate::scenario::model::{DeviceTemplate, Provisioning};

/// `i/n`: this process runs every device whose ordinal (across all templates) is `i` mod `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `INDEX/COUNT`, where INDEX may also be a StatefulSet pod name (`fleetsim-7`): its ordinal
    /// is the index, so `--shard $(POD_NAME)/8` in a manifest needs no script.
    fn from_str(s: &str) -> Result<Shard, String> {
        let (i, n) = s.rsplit_once('/').ok_or_else(|| format!("`{s}` is not a shard like 0/4 or pod-0/4"))?;
        let i = i.trim();
        let ordinal = i.rsplit_once('-').map_or(i, |(_, o)| o);
        let index = i
            .parse::<u64>()
            .or_else(|_| ordinal.parse::<u64>())
            .map_err(|_| format!("`{i}` is neither a number nor a pod name ending in -N"))?;
        let count = n.trim().parse::<u64>().map_err(|_| format!("`{n}` is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: the index must be below the count"));
        }
        Ok(Shard { index, count })
    }
}

/// Where keys come from.
pub struct KeyPlan {
    /// The symmetric-key enrollment group's key (DPS group members derive theirs from it).
    pub group: Option<Key>,
    /// Seed for keys the fleet invents.
    pub seed: Key,
    /// `id,key` files named by templates (`keys_file`), loaded.
    pub files: HashMap<PathBuf, HashMap<String, Key>>,
}

impl KeyPlan {
    fn own(&self, tpl: &DeviceTemplate, id: &str) -> Key {
        tpl.keys_file
            .as_ref()
            .and_then(|f| self.files.get(f)?.get(id).cloned())
            .unwrap_or_else(|| derive_device_key(&self.seed, &format!("fleetsim:{id}")))
    }

    /// The key a template's device `id` connects (or registers) with.
    pub fn device_key(&self, tpl: &DeviceTemplate, id: &str) -> Option<Key> {
        match tpl.provisioning {
            Provisioning::Dps { individual: false, .. } => self.group.as_ref().map(|g| derive_device_key(g, id)),
            _ => Some(self.own(tpl, id)),
        }
    }
}

/// Reads an `id,key` file (one per line; `#` comments). Errors name the file and line.
pub fn load_keys_file(path: &Path) -> Result<HashMap<String, Key>, Problem> {
    let text = crate::fsio::read_text_capped(path, crate::fsio::MAX_INPUT_FILE)
        .map_err(|e| Problem::file(path, format!("cannot read: {}", crate::tomlread::io_reason(&e))))?;
    let file = path.display().to_string();
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = (i + 1, 1);
        let (id, key) = line.split_once(',').ok_or_else(|| Problem::at(&file, at, "", "expected `id,key`"))?;
        let key = Key::from_base64(key.trim())
            .map_err(|_| Problem::at(&file, at, "", format!("the key for {} is not base64", id.trim())))?;
        out.insert(id.trim().to_owned(), key);
    }
    Ok(out)
}

/// Every identity of this shard, devices followed by their modules.
pub fn expand(templates: &[DeviceTemplate], shard: Shard, keys: &KeyPlan) -> Vec<IdentitySpec> {
    let mut out = Vec::new();
    let mut ordinal = 0u64;
    for tpl in templates {
        let behaviour = Arc::new(tpl.behaviour.clone());
        let modules: Vec<_> =
            tpl.modules.iter().map(|m| (Arc::<str>::from(m.id.as_str()), Arc::new(m.behaviour.clone()))).collect();
        let model: Option<Arc<str>> = tpl.model_id.as_deref().map(Arc::from);
        let template: Arc<str> = Arc::from(tpl.name.as_str());
        let edge = tpl.edge.as_ref().zip(tpl.modules_content()).map(|(e, deployment)| {
            Arc::new(EdgePlan {
                deployment,
                routes: e.routes.iter().map(|r| r.route.clone()).collect(),
                routing: e.routing,
            })
        });
        for n in tpl.first..tpl.first + tpl.count {
            let mine = ordinal % shard.count == shard.index;
            ordinal += 1;
            if !mine {
                continue;
            }
            let id = tpl.device_id(n);
            let Some(key) = keys.device_key(tpl, &id) else { continue };
            let device_id: Arc<str> = Arc::from(id.as_str());
            let credentials = match tpl.provisioning {
                Provisioning::Dps { individual, transport } => Credentials::Dps {
                    key: key.clone(),
                    individual,
                    transport,
                    payload: tpl.model_id.as_ref().map(|m| json!({ "modelId": m })),
                },
                Provisioning::ConnectionString => Credentials::Direct { key: key.clone(), parent_key: None },
            };
            out.push(IdentitySpec {
                template: template.clone(),
                device_id: device_id.clone(),
                module_id: None,
                n,
                model_id: model.clone(),
                transport: tpl.transport,
                behaviour: behaviour.clone(),
                credentials,
                edge: edge.clone(),
            });
            for (mid, mb) in &modules {
                out.push(IdentitySpec {
                    template: template.clone(),
                    device_id: device_id.clone(),
                    module_id: Some(mid.clone()),
                    n,
                    model_id: None,
                    transport: tpl.transport,
                    behaviour: mb.clone(),
                    credentials: Credentials::Direct {
                        key: keys.own(tpl, &format!("{id}/{mid}")),
                        parent_key: Some(key.clone()),
                    },
                    edge: edge.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::schema::load_text;

    fn templates() -> Vec<DeviceTemplate> {
        let text = "[[devices]]\ncount = 10\nid = \"d-{n:02}\"\n[[devices.modules]]\nid = \"m\"\n[[devices]]\ncount = 5\nid = \"c-{n}\"\nprovisioning = \"connection_string\"\n";
        let (t, errs) = load_text(Path::new("x.toml"), text.to_owned());
        assert!(errs.is_empty(), "{errs:?}");
        t
    }

    #[test]
    fn shards_split_the_fleet_without_overlap() {
        let keys = KeyPlan { group: Some(Key::generate()), seed: Key::generate(), files: HashMap::new() };
        let t = templates();
        let mut seen = std::collections::HashSet::new();
        for i in 0..3 {
            for spec in expand(&t, Shard { index: i, count: 3 }, &keys) {
                let id = format!("{}/{}", spec.device_id, spec.module_id.as_deref().unwrap_or(""));
                assert!(seen.insert(id.clone()), "{id} in two shards");
            }
        }
        assert_eq!(seen.len(), 10 * 2 + 5);
        assert_eq!("2/3".parse::<Shard>().unwrap(), Shard { index: 2, count: 3 });
        assert!("3/3".parse::<Shard>().is_err() && "x".parse::<Shard>().is_err());
        assert_eq!("fleetsim-7/8".parse::<Shard>().unwrap(), Shard { index: 7, count: 8 });
        assert_eq!("load-test-fleet-0/2".parse::<Shard>().unwrap(), Shard { index: 0, count: 2 });
        assert!("fleetsim-8/8".parse::<Shard>().is_err() && "fleetsim/8".parse::<Shard>().is_err());
    }

    #[test]
    fn devices_and_their_modules_agree_on_keys() {
        let group = Key::generate();
        let keys = KeyPlan { group: Some(group.clone()), seed: Key::generate(), files: HashMap::new() };
        let all = expand(&templates(), Shard::default(), &keys);
        let (dev, module) = (&all[0], &all[1]);
        let Credentials::Dps { key, .. } = &dev.credentials else { panic!() };
        assert_eq!(key, &derive_device_key(&group, "d-01"));
        let Credentials::Direct { parent_key, .. } = &module.credentials else { panic!() };
        assert_eq!(parent_key.as_ref(), Some(key));
        let again = expand(&templates(), Shard::default(), &keys);
        let (Credentials::Direct { key: a, .. }, Credentials::Direct { key: b, .. }) =
            (&all[20].credentials, &again[20].credentials)
        else {
            panic!()
        };
        assert_eq!(a, b, "invented keys are stable");
    }
}
