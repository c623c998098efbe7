//! Where an Event Hubs-compatible endpoint is and how to sign for it: the connection string the
//! Azure portal shows under "Built-in endpoints" (`Endpoint=sb://{namespace}/;SharedAccessKeyName=
//! ...;SharedAccessKey=...;EntityPath={name}`, "Get an Event Hubs connection string") and the
//! emulator writes to hub.json. Parse errors name the key, never a value: values are secrets.

use std::fmt;

use crate::iot::sas::{Key, sign_token};

/// AMQP over TLS, the port an `sb://` endpoint without one means.
pub const AMQPS_PORT: u16 = 5671;

/// A parsed Event Hubs connection string. `Debug` shows where, never the key.
#[derive(Clone, PartialEq, Eq)]
pub struct EventHubTarget {
    /// The namespace host (`{name}.servicebus.windows.net`, or the emulator's host name).
    pub host: String,
    pub port: u16,
    /// The Event Hub (`EntityPath`): for an IoT hub's built-in endpoint, its compatible name.
    pub entity: String,
    pub key_name: String,
    key: String,
}

impl fmt::Debug for EventHubTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventHubTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("entity", &self.entity)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("connection string item {0} has no `=`")]
    NoEquals(usize),
    #[error("unknown connection string key `{0}`")]
    UnknownKey(String),
    #[error("connection string has no `{0}`")]
    Missing(&'static str),
    #[error("`Endpoint` must be sb://HOST[:PORT]/")]
    BadEndpoint,
}

impl std::str::FromStr for EventHubTarget {
    type Err = TargetError;

    fn from_str(text: &str) -> Result<EventHubTarget, TargetError> {
        let (mut endpoint, mut key_name, mut key, mut entity) = (None, None, None, None);
        for (i, item) in text.split(';').map(str::trim).enumerate().filter(|(_, s)| !s.is_empty()) {
            // Split on the first `=` so base64 padding stays with the key.
            let (k, v) = item.split_once('=').ok_or(TargetError::NoEquals(i + 1))?;
            let slot = match k.trim() {
                "Endpoint" => &mut endpoint,
                "SharedAccessKeyName" => &mut key_name,
                "SharedAccessKey" => &mut key,
                "EntityPath" => &mut entity,
                other => return Err(TargetError::UnknownKey(other.to_owned())),
            };
            *slot = Some(v.trim().to_owned());
        }
        let endpoint = endpoint.ok_or(TargetError::Missing("Endpoint"))?;
        let rest = endpoint.strip_prefix("sb://").ok_or(TargetError::BadEndpoint)?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(TargetError::BadEndpoint);
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok().filter(|p| *p > 0).ok_or(TargetError::BadEndpoint)?),
            None => (authority, AMQPS_PORT),
        };
        Ok(EventHubTarget {
            host: host.to_owned(),
            port,
            entity: entity.filter(|e| !e.is_empty()).ok_or(TargetError::Missing("EntityPath"))?,
            key_name: key_name.filter(|e| !e.is_empty()).ok_or(TargetError::Missing("SharedAccessKeyName"))?,
            key: key.filter(|e| !e.is_empty()).ok_or(TargetError::Missing("SharedAccessKey"))?,
        })
    }
}

impl EventHubTarget {
    /// The token audience and the node the claim covers: `sb://{host}[:port]/{entity}`.
    pub fn audience(&self) -> String {
        if self.port == AMQPS_PORT {
            format!("sb://{}/{}", self.host, self.entity)
        } else {
            format!("sb://{}:{}/{}", self.host, self.port, self.entity)
        }
    }

    /// A SAS token for `audience()` valid until `expiry` (Unix seconds). Event Hubs signs with
    /// the key's text as it stands, not its base64-decoded bytes ("Authenticate access to Event
    /// Hubs resources using shared access signatures").
    pub fn token(&self, expiry: u64) -> String {
        let key = Key::from_bytes(self.key.as_bytes().to_vec());
        sign_token(&self.audience(), &key, expiry, Some(&self.key_name))
    }

    /// A partition's receiver address for a consumer group.
    pub fn partition_address(&self, group: &str, partition: &str) -> String {
        format!("amqps://{}/{}/ConsumerGroups/{group}/Partitions/{partition}", self.host, self.entity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_azures_form_and_the_emulators() {
        let azure: EventHubTarget = "Endpoint=sb://ihsuprodam123res.servicebus.windows.net/;SharedAccessKeyName=\
                                     iothubowner;SharedAccessKey=a2V5PQ==;EntityPath=myhub"
            .parse()
            .unwrap();
        assert_eq!(
            (azure.host.as_str(), azure.port, azure.entity.as_str()),
            ("ihsuprodam123res.servicebus.windows.net", 5671, "myhub")
        );
        assert_eq!(azure.audience(), "sb://ihsuprodam123res.servicebus.windows.net/myhub");
        assert_eq!(azure.key, "a2V5PQ==", "the padding stays");
        let emu: EventHubTarget =
            "Endpoint=sb://localhost:40123/;SharedAccessKeyName=service;SharedAccessKey=k;EntityPath=localhost"
                .parse()
                .unwrap();
        assert_eq!((emu.port, emu.audience().as_str()), (40123, "sb://localhost:40123/localhost"));
        assert_eq!(
            emu.partition_address("$Default", "3"),
            "amqps://localhost/localhost/ConsumerGroups/$Default/Partitions/3"
        );
        assert!(!format!("{emu:?}").contains("SharedAccessKey=k"));
        assert!(!format!("{emu:?}").contains("\"k\""));
    }

    #[test]
    fn errors_name_the_key_never_a_value() {
        let cases = [
            ("Endpoint=sb://h/;SharedAccessKeyName=p;SharedAccessKey=secret", TargetError::Missing("EntityPath")),
            ("Endpoint=https://h/;SharedAccessKeyName=p;SharedAccessKey=secret;EntityPath=e", TargetError::BadEndpoint),
            ("Endpoint=sb://h:0/;SharedAccessKeyName=p;SharedAccessKey=secret;EntityPath=e", TargetError::BadEndpoint),
            ("Endpoint=sb://h/;SharedAccessKeyName=p;secret;EntityPath=e", TargetError::NoEquals(3)),
            ("HostName=h;SharedAccessKeyName=p;SharedAccessKey=secret", TargetError::UnknownKey("HostName".into())),
            ("Endpoint=sb://h/;SharedAccessKeyName=p;EntityPath=e", TargetError::Missing("SharedAccessKey")),
        ];
        for (text, want) in cases {
            let e = text.parse::<EventHubTarget>().unwrap_err();
            assert_eq!(e, want, "{text}");
            assert!(!e.to_string().contains("secret"));
        }
    }
}
