//! The emulator's long-lived secrets: shared access policy keys, the default enrollment group's
//! keys and the DPS id scope. Generated on first start, kept in `keys.json` (mode 0600) in the data
//! dir so restarts keep every issued credential valid; config values override what is stored.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::KeyOverrides;
use crate::fsio::write_private;
use crate::iot::sas::Key;

/// What a shared access policy may do (protocol.md §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions(u8);

impl Permissions {
    pub const REGISTRY_READ: Permissions = Permissions(1);
    pub const REGISTRY_WRITE: Permissions = Permissions(2);
    pub const SERVICE_CONNECT: Permissions = Permissions(4);
    pub const DEVICE_CONNECT: Permissions = Permissions(8);
    /// The DPS service API (enrollments), granted by `provisioningserviceowner`.
    pub const ENROLLMENT_WRITE: Permissions = Permissions(16);

    pub fn contains(self, other: Permissions) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn any_of(self, other: Permissions) -> bool {
        self.0 & other.0 != 0
    }

    pub const fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }
}

/// The hub's default policies with their permissions, plus DPS's service policy.
pub const POLICIES: [(&str, Permissions); 6] = [
    (
        "iothubowner",
        Permissions::REGISTRY_READ
            .union(Permissions::REGISTRY_WRITE)
            .union(Permissions::SERVICE_CONNECT)
            .union(Permissions::DEVICE_CONNECT),
    ),
    ("service", Permissions::SERVICE_CONNECT),
    ("device", Permissions::DEVICE_CONNECT),
    ("registryRead", Permissions::REGISTRY_READ),
    ("registryReadWrite", Permissions::REGISTRY_READ.union(Permissions::REGISTRY_WRITE)),
    ("provisioningserviceowner", Permissions::ENROLLMENT_WRITE),
];

/// The id of the symmetric-key enrollment group every emulator has.
pub const DEFAULT_GROUP: &str = "default";

#[derive(Clone, Serialize, Deserialize)]
pub struct KeyPair {
    pub primary: String,
    pub secondary: String,
}

impl KeyPair {
    fn generate() -> KeyPair {
        KeyPair { primary: Key::generate().to_base64(), secondary: Key::generate().to_base64() }
    }
}

/// The stored form of keys.json.
#[derive(Clone, Serialize, Deserialize)]
pub struct Secrets {
    pub id_scope: String,
    pub policies: BTreeMap<String, KeyPair>,
    pub default_group: KeyPair,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").field("id_scope", &self.id_scope).finish_non_exhaustive()
    }
}

impl Secrets {
    /// Loads keys.json (creating what is missing) and applies config overrides, then saves.
    pub fn load_or_create(data_dir: &Path, overrides: &KeyOverrides) -> anyhow::Result<Secrets> {
        let path = data_dir.join("keys.json");
        let mut s = match crate::fsio::read_capped(&path, crate::fsio::MAX_INPUT_FILE) {
            Ok(bytes) => serde_json::from_slice::<Secrets>(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: not a fleetsim keys file: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Secrets {
                id_scope: format!("0ne{:08X}", rand::random::<u32>()),
                policies: BTreeMap::new(),
                default_group: KeyPair::generate(),
            },
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        for (name, _) in POLICIES {
            s.policies.entry(name.to_owned()).or_insert_with(KeyPair::generate);
        }
        let policy_overrides = [
            ("iothubowner", &overrides.iothubowner),
            ("service", &overrides.service),
            ("device", &overrides.device),
            ("registryRead", &overrides.registry_read),
            ("registryReadWrite", &overrides.registry_read_write),
            ("provisioningserviceowner", &overrides.provisioningserviceowner),
        ];
        for (name, key) in policy_overrides {
            if let Some(k) = key {
                Key::from_base64(k).map_err(|_| anyhow::anyhow!("keys.{name} is not valid base64"))?;
                s.policies.get_mut(name).expect("every policy was filled in").primary = k.clone();
            }
        }
        for (slot, key, name) in [
            (&mut s.default_group.primary, &overrides.group_primary, "group_primary"),
            (&mut s.default_group.secondary, &overrides.group_secondary, "group_secondary"),
        ] {
            if let Some(k) = key {
                Key::from_base64(k).map_err(|_| anyhow::anyhow!("keys.{name} is not valid base64"))?;
                *slot = k.clone();
            }
        }
        if let Some(scope) = &overrides.id_scope {
            s.id_scope = scope.clone();
        }
        write_private(&path, &serde_json::to_vec_pretty(&s)?)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_survive_a_restart_and_overrides_win() {
        let dir = tempfile::tempdir().unwrap();
        let a = Secrets::load_or_create(dir.path(), &KeyOverrides::default()).unwrap();
        let b = Secrets::load_or_create(dir.path(), &KeyOverrides::default()).unwrap();
        assert_eq!(a.id_scope, b.id_scope);
        assert_eq!(a.policies["iothubowner"].primary, b.policies["iothubowner"].primary);
        assert!(a.id_scope.starts_with("0ne") && a.id_scope.len() == 11);
        let forced = KeyOverrides {
            id_scope: Some("0ne00000A0A".into()),
            group_primary: Some("AAECAw==".into()),
            ..Default::default()
        };
        let c = Secrets::load_or_create(dir.path(), &forced).unwrap();
        assert_eq!((c.id_scope.as_str(), c.default_group.primary.as_str()), ("0ne00000A0A", "AAECAw=="));
        let bad = KeyOverrides { service: Some("not base64!".into()), ..Default::default() };
        let err = Secrets::load_or_create(dir.path(), &bad).unwrap_err().to_string();
        assert!(err.contains("keys.service") && !err.contains("not base64!"));
        assert!(Permissions::REGISTRY_READ.union(Permissions::REGISTRY_WRITE).contains(Permissions::REGISTRY_WRITE));
    }
}
