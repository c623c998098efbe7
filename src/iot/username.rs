//! The MQTT CONNECT username, which tells a hub connection from a DPS one (protocol.md §3.4, §4.2):
//! hub `{host}/{device}[/{module}]/?api-version=..`, DPS `{scope}/registrations/{reg}/api-version=..`.

use super::encoding::url_decode;

/// What the username announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Username {
    Hub(HubUsername),
    Dps(DpsUsername),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubUsername {
    pub host: String,
    pub device_id: String,
    pub module_id: Option<String>,
    pub api_version: Option<String>,
    /// The Plug and Play model id, decoded.
    pub model_id: Option<String>,
    pub client_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpsUsername {
    pub id_scope: String,
    pub registration_id: String,
    pub api_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("the username has no device id")]
    NoDevice,
    #[error("the username has too many path segments")]
    TooManySegments,
    #[error("the username's query is badly encoded")]
    BadQuery,
}

impl Username {
    pub fn parse(text: &str) -> Result<Username, UsernameError> {
        // The two grammars differ in where the query starts: DPS puts it straight after the
        // registration id (`{scope}/registrations/{reg}/api-version=..`, no `?`), the hub after a
        // `/?`. Telling them apart by that, not by the word `registrations`, lets a device (or a
        // device's module) be named `registrations` (issue 10).
        let segs: Vec<&str> = text.splitn(4, '/').collect();
        if let [scope, "registrations", reg, query] = segs.as_slice()
            && !scope.is_empty()
            && !reg.is_empty()
            && !reg.contains('?')
            && !query.starts_with('?')
            && !query.contains('/')
            && !query.is_empty()
        {
            let q = parse_query(query)?;
            return Ok(Username::Dps(DpsUsername {
                id_scope: segs[0].to_owned(),
                registration_id: segs[2].to_owned(),
                api_version: find(&q, "api-version"),
            }));
        }
        let (path, query) = match text.split_once('?') {
            Some((p, q)) => (p, q),
            None => (text, ""),
        };
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        let (host, device, module) = match parts.as_slice() {
            [h, d] => (*h, *d, None),
            [h, d, m] => (*h, *d, Some(*m)),
            [_] => return Err(UsernameError::NoDevice),
            _ => return Err(UsernameError::TooManySegments),
        };
        if device.is_empty() || module.is_some_and(str::is_empty) {
            return Err(UsernameError::NoDevice);
        }
        let q = parse_query(query)?;
        Ok(Username::Hub(HubUsername {
            host: host.to_owned(),
            device_id: device.to_owned(),
            module_id: module.map(str::to_owned),
            api_version: find(&q, "api-version"),
            model_id: find(&q, "model-id"),
            client_type: find(&q, "DeviceClientType"),
        }))
    }
}

impl HubUsername {
    /// The MQTT client id this username requires: `device` or `device/module`.
    pub fn client_id(&self) -> String {
        client_id(&self.device_id, self.module_id.as_deref())
    }
}

fn parse_query(q: &str) -> Result<Vec<(String, String)>, UsernameError> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((
                url_decode(k).map_err(|_| UsernameError::BadQuery)?,
                url_decode(v).map_err(|_| UsernameError::BadQuery)?,
            ))
        })
        .collect()
}

fn find(q: &[(String, String)], key: &str) -> Option<String> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// An identity's name on the hub: `device` or `device/module` (device ids cannot contain `/`). It
/// is the MQTT client id a device or module must connect with, and how both sides key identities.
pub fn client_id(device_id: &str, module_id: Option<&str>) -> String {
    match module_id {
        Some(m) => format!("{device_id}/{m}"),
        None => device_id.to_owned(),
    }
}

/// The username a device or module sends to the hub.
pub fn hub_username(host: &str, device_id: &str, module_id: Option<&str>, model_id: Option<&str>) -> String {
    let mut u = match module_id {
        Some(m) => format!("{host}/{device_id}/{m}/?api-version=2021-04-12"),
        None => format!("{host}/{device_id}/?api-version=2021-04-12"),
    };
    u.push_str("&DeviceClientType=fleetsim%2F");
    u.push_str(env!("CARGO_PKG_VERSION"));
    if let Some(m) = model_id {
        u.push_str("&model-id=");
        u.push_str(&super::encoding::url_encode(m));
    }
    u
}

/// The username a device sends to DPS (no `?` before the query, per the service's grammar).
pub fn dps_username(id_scope: &str, registration_id: &str) -> String {
    format!(
        "{id_scope}/registrations/{registration_id}/api-version=2019-03-31&ClientVersion=fleetsim%2F{}",
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(text: &str) -> HubUsername {
        match Username::parse(text).unwrap() {
            Username::Hub(h) => h,
            other => panic!("not hub: {other:?}"),
        }
    }

    #[test]
    fn parses_hub_usernames_in_every_accepted_shape() {
        for text in ["h.net/dev", "h.net/dev/", "h.net/dev/?api-version=2021-04-12", "h.net/dev?api-version=2021-04-12"]
        {
            let u = hub(text);
            assert_eq!(
                (u.host.as_str(), u.device_id.as_str(), u.module_id.as_deref()),
                ("h.net", "dev", None),
                "{text}"
            );
        }
        let m = hub("h/d/m/?DeviceClientType=x%2F1&api-version=2020-09-30&model-id=dtmi%3Acom%3Aex%3AT%3B1&unknown=1");
        assert_eq!(m.module_id.as_deref(), Some("m"));
        assert_eq!(m.client_id(), "d/m");
        assert_eq!(m.api_version.as_deref(), Some("2020-09-30"));
        assert_eq!(m.model_id.as_deref(), Some("dtmi:com:ex:T;1"));
        assert_eq!(m.client_type.as_deref(), Some("x/1"));
        assert_eq!(Username::parse("hostonly").unwrap_err(), UsernameError::NoDevice);
        assert_eq!(Username::parse("h/d/m/x/?a=1").unwrap_err(), UsernameError::TooManySegments);
        let own = hub(&hub_username("h", "d", Some("m"), Some("dtmi:a:b;1")));
        assert_eq!((own.client_id().as_str(), own.model_id.as_deref()), ("d/m", Some("dtmi:a:b;1")));
    }

    #[test]
    fn parses_dps_usernames() {
        for text in [
            "0ne00000A0A/registrations/dev1/api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.14.0",
            "0ne00000A0A/registrations/dev1/api-version=2019-03-31",
        ] {
            match Username::parse(text).unwrap() {
                Username::Dps(d) => {
                    assert_eq!((d.id_scope.as_str(), d.registration_id.as_str()), ("0ne00000A0A", "dev1"));
                    assert_eq!(d.api_version.as_deref(), Some("2019-03-31"));
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(Username::parse(&dps_username("s", "r")).unwrap(), Username::Dps(_)));
    }

    #[test]
    fn a_device_or_module_named_registrations_is_a_hub_username() {
        // Issue 10: `localhost/registrations/?api-version=..` was read as a DPS username.
        for (text, device, module) in [
            ("localhost/registrations/?api-version=2021-04-12", "registrations", None),
            ("localhost/registrations", "registrations", None),
            ("h.net/registrations/m1/?api-version=2021-04-12", "registrations", Some("m1")),
            ("h.net/registrations/registrations/?api-version=2021-04-12", "registrations", Some("registrations")),
            ("h.net/d/registrations/?api-version=2021-04-12", "d", Some("registrations")),
        ] {
            let u = hub(text);
            assert_eq!((u.device_id.as_str(), u.module_id.as_deref()), (device, module), "{text}");
        }
        let own = hub(&hub_username("h", "registrations", None, None));
        assert_eq!(own.device_id, "registrations");
        let own = hub(&hub_username("h", "registrations", Some("registrations"), None));
        assert_eq!(own.client_id(), "registrations/registrations");
    }
}
