//! IoT Hub connection strings (protocol.md §2): `Key=Value;...`, split on the first `=` so base64
//! keys keep their padding. Parse errors name the offending key, never a value, because values
//! are secrets.

use std::fmt;
use std::str::FromStr;

/// What a connection string identifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Device,
    Module,
    /// A shared access policy (`SharedAccessKeyName`): back-end services.
    Service,
}

/// A parsed connection string. `Debug` redacts the key and the signature.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ConnectionString {
    pub host_name: String,
    pub device_id: Option<String>,
    pub module_id: Option<String>,
    pub shared_access_key: Option<String>,
    pub shared_access_key_name: Option<String>,
    pub shared_access_signature: Option<String>,
    pub gateway_host_name: Option<String>,
    pub x509: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("connection string item {0} has no `=`")]
    NoEquals(usize),
    #[error("unknown connection string key `{0}`")]
    UnknownKey(String),
    #[error("connection string key `{0}` appears twice")]
    Duplicate(String),
    #[error("connection string has no `{0}`")]
    Missing(&'static str),
    #[error("`x509` must be `true`")]
    BadX509,
    #[error("connection string mixes SharedAccessKey and x509")]
    MixedAuthentication,
    #[error("connection string has neither a key, a signature nor x509=true")]
    NoCredential,
    #[error("`ModuleId` needs `DeviceId`")]
    ModuleWithoutDevice,
    #[error("`SharedAccessKey` is not valid base64")]
    BadKey,
}

impl ConnectionString {
    pub fn kind(&self) -> Kind {
        match (&self.device_id, &self.module_id) {
            (Some(_), Some(_)) => Kind::Module,
            (Some(_), None) => Kind::Device,
            _ => Kind::Service,
        }
    }

    /// The host to dial: `GatewayHostName` when set, otherwise `HostName`.
    pub fn dial_host(&self) -> &str {
        self.gateway_host_name.as_deref().unwrap_or(&self.host_name)
    }

    pub fn device(host: &str, device_id: &str, key: &str) -> ConnectionString {
        ConnectionString {
            host_name: host.to_owned(),
            device_id: Some(device_id.to_owned()),
            shared_access_key: Some(key.to_owned()),
            ..Default::default()
        }
    }

    pub fn service(host: &str, policy: &str, key: &str) -> ConnectionString {
        ConnectionString {
            host_name: host.to_owned(),
            shared_access_key_name: Some(policy.to_owned()),
            shared_access_key: Some(key.to_owned()),
            ..Default::default()
        }
    }
}

impl FromStr for ConnectionString {
    type Err = ConnectionStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cs = ConnectionString::default();
        let mut host = None;
        let mut seen: Vec<&str> = Vec::new();
        for (i, item) in s.trim().split(';').filter(|p| !p.trim().is_empty()).enumerate() {
            let (k, v) = item.split_once('=').ok_or(ConnectionStringError::NoEquals(i + 1))?;
            let k = k.trim();
            if seen.contains(&k) {
                return Err(ConnectionStringError::Duplicate(k.to_owned()));
            }
            let v = v.trim().to_owned();
            match k {
                "HostName" => host = Some(v),
                "DeviceId" => cs.device_id = Some(v),
                "ModuleId" => cs.module_id = Some(v),
                "SharedAccessKey" => {
                    crate::iot::sas::Key::from_base64(&v).map_err(|_| ConnectionStringError::BadKey)?;
                    cs.shared_access_key = Some(v)
                }
                "SharedAccessKeyName" => cs.shared_access_key_name = Some(v),
                "SharedAccessSignature" => cs.shared_access_signature = Some(v),
                "GatewayHostName" => cs.gateway_host_name = Some(v),
                "x509" => {
                    if !v.eq_ignore_ascii_case("true") {
                        return Err(ConnectionStringError::BadX509);
                    }
                    cs.x509 = true
                }
                other => return Err(ConnectionStringError::UnknownKey(other.to_owned())),
            }
            seen.push(k);
        }
        cs.host_name = host.ok_or(ConnectionStringError::Missing("HostName"))?;
        if cs.x509 && cs.shared_access_key.is_some() {
            return Err(ConnectionStringError::MixedAuthentication);
        }
        if cs.module_id.is_some() && cs.device_id.is_none() {
            return Err(ConnectionStringError::ModuleWithoutDevice);
        }
        match cs.kind() {
            Kind::Service => {
                if cs.shared_access_key_name.is_none() {
                    return Err(ConnectionStringError::Missing("DeviceId or SharedAccessKeyName"));
                }
                if cs.shared_access_key.is_none() && cs.shared_access_signature.is_none() {
                    return Err(ConnectionStringError::Missing("SharedAccessKey"));
                }
            }
            Kind::Device | Kind::Module => {
                if cs.shared_access_key.is_none() && cs.shared_access_signature.is_none() && !cs.x509 {
                    return Err(ConnectionStringError::NoCredential);
                }
            }
        }
        Ok(cs)
    }
}

impl fmt::Display for ConnectionString {
    /// The full string, secrets included: for writing to hub.json and handing to SDKs, not for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName={}", self.host_name)?;
        let parts = [
            ("DeviceId", &self.device_id),
            ("ModuleId", &self.module_id),
            ("SharedAccessKeyName", &self.shared_access_key_name),
            ("SharedAccessKey", &self.shared_access_key),
            ("SharedAccessSignature", &self.shared_access_signature),
            ("GatewayHostName", &self.gateway_host_name),
        ];
        for (k, v) in parts {
            if let Some(v) = v {
                write!(f, ";{k}={v}")?;
            }
        }
        if self.x509 {
            f.write_str(";x509=true")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field("shared_access_key_name", &self.shared_access_key_name)
            .field("gateway_host_name", &self.gateway_host_name)
            .field("x509", &self.x509)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "2j/XVTSoVdXNxVRDRVzfxVzPbdGKpx9AKfWC36EL+uM=";

    #[test]
    fn parses_each_kind() {
        let d: ConnectionString = format!("HostName=h.net;DeviceId=dev1;SharedAccessKey={KEY}").parse().unwrap();
        assert_eq!(
            (d.kind(), d.device_id.as_deref(), d.shared_access_key.as_deref()),
            (Kind::Device, Some("dev1"), Some(KEY))
        );
        let m: ConnectionString =
            format!("HostName=h.net;DeviceId=e;ModuleId=m;SharedAccessKey={KEY};GatewayHostName=edge.local")
                .parse()
                .unwrap();
        assert_eq!((m.kind(), m.dial_host()), (Kind::Module, "edge.local"));
        let s: ConnectionString =
            format!("HostName=localhost:8443;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}").parse().unwrap();
        assert_eq!(s.kind(), Kind::Service);
        let x: ConnectionString = "HostName=h;DeviceId=d;x509=true".parse().unwrap();
        assert!(x.x509);
        assert_eq!(s.to_string().parse::<ConnectionString>().unwrap(), s);
    }

    #[test]
    fn rejects_bad_strings_without_echoing_secrets() {
        let cases = [
            ("DeviceId=d;SharedAccessKey=AAAA", ConnectionStringError::Missing("HostName")),
            ("HostName=h;DeviceId=d", ConnectionStringError::NoCredential),
            ("HostName=h;DeviceId=d;Foo=1;SharedAccessKey=AAAA", ConnectionStringError::UnknownKey("Foo".into())),
            (
                "HostName=h;HostName=g;DeviceId=d;SharedAccessKey=AAAA",
                ConnectionStringError::Duplicate("HostName".into()),
            ),
            ("HostName=h;DeviceId=d;SharedAccessKey=AAAA;x509=true", ConnectionStringError::MixedAuthentication),
            ("HostName=h;DeviceId=d;x509=yes", ConnectionStringError::BadX509),
            ("HostName=h;ModuleId=m;SharedAccessKey=AAAA", ConnectionStringError::ModuleWithoutDevice),
            ("HostName=h;DeviceId=d;SharedAccessKey=s3cr3t!!", ConnectionStringError::BadKey),
            ("HostName=h;DeviceId", ConnectionStringError::NoEquals(2)),
        ];
        for (text, want) in cases {
            let err = text.parse::<ConnectionString>().unwrap_err();
            assert_eq!(err, want, "{text}");
            assert!(!err.to_string().contains("s3cr3t"));
        }
        let d: ConnectionString = format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}").parse().unwrap();
        assert!(!format!("{d:?}").contains(KEY));
    }
}
