//! Every MQTT topic and subscription filter of IoT Hub and DPS (protocol.md §3.4, §4.6-4.10),
//! built and parsed. Device-to-hub topics are parsed by the emulator and built by the device side;
//! hub-to-device topics the other way round. Each builder has a parser that inverts it.
//!
//! Two parts of a topic are carried, never re-encoded: a request id (`$rid`) is an opaque token
//! echoed byte for byte (sdk-for-c compares it as bytes), and a method name travels as the
//! service caller wrote it, `*` included (Microsoft's IoT Central C tutorial shows
//! `$iothub/methods/POST/thermostat1*getMaxMinReport/?$rid=1`; sdk-for-c splits component and
//! command at the `*`). Property bags (telemetry, C2D) are the only percent-encoded parts.

use super::encoding::{DecodeError, url_decode, url_encode};
use super::property_bag::PropertyBag;

/// A topic or filter that is not one IoT Hub or DPS accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is not an IoT Hub or DPS topic")]
    Unknown,
    #[error("topic has a bad status code")]
    BadStatus,
    #[error("topic lacks `{0}`")]
    Missing(&'static str),
    #[error("topic is badly percent-encoded: {0}")]
    Encoding(#[from] DecodeError),
}

/// A PUBLISH a device or module sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePublish {
    Telemetry { device_id: String, module_id: Option<String>, properties: PropertyBag },
    TwinGet { rid: String },
    TwinPatchReported { rid: String },
    MethodResponse { status: u16, rid: String },
    DpsRegister { rid: String },
    DpsPollStatus { rid: String, operation_id: String },
}

/// A subscription filter a device or module may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    C2d,
    Methods,
    TwinResponses,
    TwinDesired,
    ModuleInputs,
    DpsResponses,
}

/// A PUBLISH the hub or DPS sends to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloudPublish {
    TwinResponse { status: u16, rid: String, version: Option<u64> },
    DesiredPatch { version: Option<u64> },
    MethodRequest { name: String, rid: String },
    C2d { device_id: String, properties: PropertyBag },
    ModuleInput { input: String, properties: PropertyBag },
    DpsResponse { status: u16, rid: String, retry_after: Option<u64> },
}

const TWIN_RES: &str = "$iothub/twin/res/";
const TWIN_GET: &str = "$iothub/twin/GET/";
const TWIN_REPORTED: &str = "$iothub/twin/PATCH/properties/reported/";
const TWIN_DESIRED: &str = "$iothub/twin/PATCH/properties/desired/";
const METHOD_POST: &str = "$iothub/methods/POST/";
const METHOD_RES: &str = "$iothub/methods/res/";
const DPS_RES: &str = "$dps/registrations/res/";
const DPS_REGISTER: &str = "$dps/registrations/PUT/iotdps-register/";
const DPS_POLL: &str = "$dps/registrations/GET/iotdps-get-operationstatus/";

/// The `k=v&..` pairs after a fixed prefix (the `?` optional), exactly as they appear in the topic.
struct Params<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Params<'a> {
    fn parse(rest: &'a str) -> Params<'a> {
        let rest = rest.strip_prefix('?').unwrap_or(rest);
        Params(rest.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, ""))).collect())
    }

    /// The value as written in the topic: what an echo must repeat.
    fn raw(&self, key: &'static str) -> Result<&'a str, TopicError> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v).ok_or(TopicError::Missing(key))
    }

    /// The value percent-decoded, for values that carry data (operation ids).
    fn decoded(&self, key: &'static str) -> Result<String, TopicError> {
        Ok(url_decode(self.raw(key)?)?)
    }

    fn number(&self, key: &'static str) -> Option<u64> {
        self.raw(key).ok().and_then(|v| v.parse().ok())
    }
}

/// The request id as received, refused only when absent.
fn rid(rest: &str) -> Result<String, TopicError> {
    Params::parse(rest).raw("$rid").map(str::to_owned)
}

fn status_and_rest(rest: &str) -> Result<(u16, &str), TopicError> {
    let (status, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let status = status.parse::<u16>().map_err(|_| TopicError::BadStatus)?;
    Ok((status, rest))
}

impl DevicePublish {
    pub fn parse(topic: &str) -> Result<DevicePublish, TopicError> {
        if let Some(rest) = topic.strip_prefix("devices/") {
            return parse_telemetry(rest);
        }
        if let Some(rest) = topic.strip_prefix(TWIN_GET) {
            return Ok(DevicePublish::TwinGet { rid: rid(rest)? });
        }
        if let Some(rest) = topic.strip_prefix(TWIN_REPORTED) {
            return Ok(DevicePublish::TwinPatchReported { rid: rid(rest)? });
        }
        if let Some(rest) = topic.strip_prefix(METHOD_RES) {
            let (status, rest) = status_and_rest(rest)?;
            return Ok(DevicePublish::MethodResponse { status, rid: rid(rest)? });
        }
        if let Some(rest) = topic.strip_prefix(DPS_REGISTER) {
            return Ok(DevicePublish::DpsRegister { rid: rid(rest)? });
        }
        if let Some(rest) = topic.strip_prefix(DPS_POLL) {
            let q = Params::parse(rest);
            return Ok(DevicePublish::DpsPollStatus {
                rid: q.raw("$rid")?.to_owned(),
                operation_id: q.decoded("operationId")?,
            });
        }
        Err(TopicError::Unknown)
    }
}

/// `{d}/messages/events[/][?]bag` or `{d}/modules/{m}/messages/events[/][?]bag`.
fn parse_telemetry(rest: &str) -> Result<DevicePublish, TopicError> {
    let (device, rest) = rest.split_once('/').ok_or(TopicError::Unknown)?;
    let (module, rest) = match rest.strip_prefix("modules/") {
        Some(r) => {
            let (m, r) = r.split_once('/').ok_or(TopicError::Unknown)?;
            (Some(m), r)
        }
        None => (None, rest),
    };
    let bag = rest.strip_prefix("messages/events").ok_or(TopicError::Unknown)?;
    let bag = if bag.is_empty() {
        ""
    } else if let Some(b) = bag.strip_prefix('/') {
        b
    } else if bag.starts_with('?') {
        bag
    } else {
        return Err(TopicError::Unknown);
    };
    if device.is_empty() || module.is_some_and(str::is_empty) {
        return Err(TopicError::Unknown);
    }
    Ok(DevicePublish::Telemetry {
        device_id: device.to_owned(),
        module_id: module.map(str::to_owned),
        properties: PropertyBag::parse(bag)?,
    })
}

impl Filter {
    /// Classifies a SUBSCRIBE filter for the identity `device[/module]`. Filters naming another
    /// identity, or any shape IoT Hub does not document, are `Unknown`.
    pub fn parse(filter: &str, device_id: &str, module_id: Option<&str>) -> Result<Filter, TopicError> {
        match filter {
            "$iothub/methods/POST/#" => return Ok(Filter::Methods),
            "$iothub/twin/res/#" => return Ok(Filter::TwinResponses),
            "$iothub/twin/PATCH/properties/desired/#" => return Ok(Filter::TwinDesired),
            "$dps/registrations/res/#" => return Ok(Filter::DpsResponses),
            _ => {}
        }
        let rest = filter.strip_prefix("devices/").ok_or(TopicError::Unknown)?;
        let rest = rest.strip_prefix(device_id).and_then(|r| r.strip_prefix('/')).ok_or(TopicError::Unknown)?;
        match module_id {
            None if rest == "messages/devicebound/#" => Ok(Filter::C2d),
            Some(m) => {
                let r = rest.strip_prefix("modules/").and_then(|r| r.strip_prefix(m)).ok_or(TopicError::Unknown)?;
                match r {
                    "/#" | "/inputs/#" => Ok(Filter::ModuleInputs),
                    _ => Err(TopicError::Unknown),
                }
            }
            None => Err(TopicError::Unknown),
        }
    }

    /// The filter text a device subscribes with.
    pub fn text(self, device_id: &str, module_id: Option<&str>) -> String {
        match self {
            Filter::C2d => format!("devices/{device_id}/messages/devicebound/#"),
            Filter::Methods => "$iothub/methods/POST/#".into(),
            Filter::TwinResponses => "$iothub/twin/res/#".into(),
            Filter::TwinDesired => "$iothub/twin/PATCH/properties/desired/#".into(),
            Filter::ModuleInputs => format!("devices/{device_id}/modules/{}/inputs/#", module_id.unwrap_or_default()),
            Filter::DpsResponses => "$dps/registrations/res/#".into(),
        }
    }
}

impl CloudPublish {
    /// Parses what the hub or DPS publishes; `device_id` is needed to recognise C2D and inputs.
    pub fn parse(topic: &str) -> Result<CloudPublish, TopicError> {
        if let Some(rest) = topic.strip_prefix(TWIN_RES) {
            let (status, rest) = status_and_rest(rest)?;
            let q = Params::parse(rest);
            return Ok(CloudPublish::TwinResponse {
                status,
                rid: q.raw("$rid")?.to_owned(),
                version: q.number("$version"),
            });
        }
        if let Some(rest) = topic.strip_prefix(TWIN_DESIRED) {
            return Ok(CloudPublish::DesiredPatch { version: Params::parse(rest).number("$version") });
        }
        if let Some(rest) = topic.strip_prefix(METHOD_POST) {
            // sdk-for-c's reading: the name is everything up to the next `/`, taken as it is.
            let (name, rest) = rest.split_once('/').ok_or(TopicError::Missing("$rid"))?;
            if name.is_empty() {
                return Err(TopicError::Missing("method name"));
            }
            return Ok(CloudPublish::MethodRequest { name: name.to_owned(), rid: rid(rest)? });
        }
        if let Some(rest) = topic.strip_prefix(DPS_RES) {
            let (status, rest) = status_and_rest(rest)?;
            let q = Params::parse(rest);
            return Ok(CloudPublish::DpsResponse {
                status,
                rid: q.raw("$rid")?.to_owned(),
                retry_after: q.number("retry-after"),
            });
        }
        if let Some(rest) = topic.strip_prefix("devices/") {
            let (device, rest) = rest.split_once('/').ok_or(TopicError::Unknown)?;
            if let Some(bag) = rest.strip_prefix("messages/devicebound") {
                let bag = bag.strip_prefix('/').unwrap_or(bag);
                return Ok(CloudPublish::C2d { device_id: device.to_owned(), properties: PropertyBag::parse(bag)? });
            }
            if let Some(r) = rest.strip_prefix("modules/") {
                let (_, r) = r.split_once('/').ok_or(TopicError::Unknown)?;
                let r = r.strip_prefix("inputs/").ok_or(TopicError::Unknown)?;
                let (input, bag) = r.split_once('/').unwrap_or((r, ""));
                return Ok(CloudPublish::ModuleInput { input: input.to_owned(), properties: PropertyBag::parse(bag)? });
            }
        }
        Err(TopicError::Unknown)
    }
}

// Builders, device to hub.

pub fn telemetry(device_id: &str, module_id: Option<&str>, properties: &PropertyBag) -> String {
    match module_id {
        Some(m) => format!("devices/{device_id}/modules/{m}/messages/events/{}", properties.encode()),
        None => format!("devices/{device_id}/messages/events/{}", properties.encode()),
    }
}

// Builders, device to hub. A `rid` is written as given: the caller picks one without `&`, `/`
// or spaces, and echoes the hub's (a method request's) unchanged.

pub fn twin_get(rid: &str) -> String {
    format!("{TWIN_GET}?$rid={rid}")
}

pub fn twin_patch_reported(rid: &str) -> String {
    format!("{TWIN_REPORTED}?$rid={rid}")
}

pub fn method_response(status: u16, rid: &str) -> String {
    format!("{METHOD_RES}{status}/?$rid={rid}")
}

pub fn dps_register(rid: &str) -> String {
    format!("{DPS_REGISTER}?$rid={rid}")
}

pub fn dps_poll(rid: &str, operation_id: &str) -> String {
    format!("{DPS_POLL}?$rid={rid}&operationId={}", url_encode(operation_id))
}

// Builders, hub to device. `rid` is the device's, exactly as it arrived (`DevicePublish` keeps it
// raw); a method name is the caller's, already checked against the hub's name rules.

pub fn twin_response(status: u16, rid: &str, version: Option<u64>) -> String {
    match version {
        Some(v) => format!("{TWIN_RES}{status}/?$rid={rid}&$version={v}"),
        None => format!("{TWIN_RES}{status}/?$rid={rid}"),
    }
}

pub fn desired_patch(version: u64) -> String {
    format!("{TWIN_DESIRED}?$version={version}")
}

pub fn method_request(name: &str, rid: &str) -> String {
    format!("{METHOD_POST}{name}/?$rid={rid}")
}

pub fn c2d(device_id: &str, properties: &PropertyBag) -> String {
    format!("devices/{device_id}/messages/devicebound/{}", properties.encode())
}

/// The DPS reply topic; the Python client splits on `$`, so the rid must come right after `?`.
/// A message routed to a module's input (IoT Edge `BrokeredEndpoint`); the bag carries the
/// sender (`$.cdid`, `$.cmid`) and the original properties. Inverted by [`CloudPublish::parse`].
pub fn module_input(device_id: &str, module_id: &str, input: &str, properties: &PropertyBag) -> String {
    format!("devices/{device_id}/modules/{module_id}/inputs/{input}/{}", properties.encode())
}

pub fn dps_response(status: u16, rid: &str, retry_after: Option<u64>) -> String {
    match retry_after {
        Some(r) => format!("{DPS_RES}{status}/?$rid={rid}&retry-after={r}"),
        None => format!("{DPS_RES}{status}/?$rid={rid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_telemetry_in_every_accepted_shape() {
        for t in ["devices/d1/messages/events/", "devices/d1/messages/events", "devices/d1/messages/events/?a=1"] {
            assert!(
                matches!(DevicePublish::parse(t).unwrap(), DevicePublish::Telemetry { ref device_id, module_id: None, .. } if device_id == "d1"),
                "{t}"
            );
        }
        let t =
            DevicePublish::parse("devices/d/modules/m/messages/events/%24.on=alert&%24.ct=application%2Fjson").unwrap();
        let DevicePublish::Telemetry { module_id, properties, .. } = t else { panic!() };
        assert_eq!(module_id.as_deref(), Some("m"));
        assert_eq!(properties.get("$.on"), Some("alert"));
        assert_eq!(properties.get("$.ct"), Some("application/json"));
        for bad in [
            "devices/d/messages/eventsX",
            "devices//messages/events/",
            "devices/d/messages/devicebound/",
            "foo/bar",
            "devices/d/modules//messages/events/",
        ] {
            assert!(DevicePublish::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_requests_with_rids() {
        assert_eq!(
            DevicePublish::parse("$iothub/twin/GET/?$rid=abc").unwrap(),
            DevicePublish::TwinGet { rid: "abc".into() }
        );
        assert_eq!(
            DevicePublish::parse("$iothub/twin/PATCH/properties/reported/?$rid=7").unwrap(),
            DevicePublish::TwinPatchReported { rid: "7".into() }
        );
        assert_eq!(
            DevicePublish::parse("$iothub/methods/res/200/?$rid=1f").unwrap(),
            DevicePublish::MethodResponse { status: 200, rid: "1f".into() }
        );
        assert_eq!(
            DevicePublish::parse("$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=5.abc")
                .unwrap(),
            DevicePublish::DpsPollStatus { rid: "1".into(), operation_id: "5.abc".into() }
        );
        assert_eq!(DevicePublish::parse("$iothub/twin/GET/").unwrap_err(), TopicError::Missing("$rid"));
        assert_eq!(DevicePublish::parse("$iothub/methods/res/ok/?$rid=1").unwrap_err(), TopicError::BadStatus);
    }

    #[test]
    fn builders_invert_parsers() {
        let mut bag = PropertyBag::default();
        bag.push("$.ct", "application/json");
        bag.push("seq", "5");
        let DevicePublish::Telemetry { properties, .. } = DevicePublish::parse(&telemetry("d", None, &bag)).unwrap()
        else {
            panic!()
        };
        assert_eq!(properties, bag);
        assert_eq!(DevicePublish::parse(&twin_get("r 1")).unwrap(), DevicePublish::TwinGet { rid: "r 1".into() });
        assert_eq!(
            DevicePublish::parse(&dps_poll("1", "op")).unwrap(),
            DevicePublish::DpsPollStatus { rid: "1".into(), operation_id: "op".into() }
        );
        assert_eq!(
            CloudPublish::parse(&twin_response(204, "x", Some(9))).unwrap(),
            CloudPublish::TwinResponse { status: 204, rid: "x".into(), version: Some(9) }
        );
        assert_eq!(CloudPublish::parse(&desired_patch(3)).unwrap(), CloudPublish::DesiredPatch { version: Some(3) });
        assert_eq!(
            CloudPublish::parse(&method_request("thermostat2*getMaxMinReport", "5")).unwrap(),
            CloudPublish::MethodRequest { name: "thermostat2*getMaxMinReport".into(), rid: "5".into() }
        );
        assert_eq!(
            CloudPublish::parse(&dps_response(202, "q", Some(3))).unwrap(),
            CloudPublish::DpsResponse { status: 202, rid: "q".into(), retry_after: Some(3) }
        );
        assert_eq!(dps_response(200, "q", None), "$dps/registrations/res/200/?$rid=q");
        let c = CloudPublish::parse("devices/myDeviceId/messages/devicebound/iothub-ack=Full&%24.to=%2Fdevices%2FmyDeviceId%2Fmessages%2FdeviceBound&%24.cid=123").unwrap();
        let CloudPublish::C2d { properties, .. } = c else { panic!() };
        assert_eq!(properties.get("iothub-ack"), Some("Full"));
        let i = CloudPublish::parse("devices/E/modules/M/inputs/in1/%24.cdid=E").unwrap();
        assert!(matches!(i, CloudPublish::ModuleInput { ref input, .. } if input == "in1"));
        let bag = PropertyBag::parse("%24.cdid=E&%24.cmid=tempSensor&MessageType=Alert").unwrap();
        let built = module_input("E", "filterModule", "input1", &bag);
        assert_eq!(
            CloudPublish::parse(&built).unwrap(),
            CloudPublish::ModuleInput { input: "input1".into(), properties: bag }
        );
    }

    #[test]
    fn names_and_rids_travel_as_written() {
        // The issue-12 instance: a component command reaches the device with its `*`.
        assert_eq!(method_request("comp*cmd", "17"), "$iothub/methods/POST/comp*cmd/?$rid=17");
        // Request ids are echoed byte for byte, whatever the device chose.
        for rid in ["get_twin:1", "a%2Fb", "{guid}", "r 1"] {
            let DevicePublish::TwinGet { rid: got } =
                DevicePublish::parse(&format!("$iothub/twin/GET/?$rid={rid}")).unwrap()
            else {
                panic!()
            };
            assert_eq!(got, rid);
            assert_eq!(twin_response(200, &got, None), format!("$iothub/twin/res/200/?$rid={rid}"));
            assert_eq!(
                dps_response(202, &got, Some(3)),
                format!("$dps/registrations/res/202/?$rid={rid}&retry-after=3")
            );
        }
        let DevicePublish::TwinPatchReported { rid } =
            DevicePublish::parse("$iothub/twin/PATCH/properties/reported/?$rid=x%zz").unwrap()
        else {
            panic!()
        };
        assert_eq!(twin_response(204, &rid, Some(4)), "$iothub/twin/res/204/?$rid=x%zz&$version=4");
        assert_eq!(
            CloudPublish::parse("$iothub/methods/POST/thermostat1*getMaxMinReport/?$rid=1").unwrap(),
            CloudPublish::MethodRequest { name: "thermostat1*getMaxMinReport".into(), rid: "1".into() }
        );
        assert!(CloudPublish::parse("$iothub/methods/POST//?$rid=1").is_err());
    }

    #[test]
    fn filters_are_limited_to_the_own_identity() {
        assert_eq!(Filter::parse("devices/d/messages/devicebound/#", "d", None).unwrap(), Filter::C2d);
        assert_eq!(Filter::parse("$iothub/methods/POST/#", "d", None).unwrap(), Filter::Methods);
        assert_eq!(Filter::parse("devices/d/modules/m/#", "d", Some("m")).unwrap(), Filter::ModuleInputs);
        assert_eq!(Filter::parse("devices/d/modules/m/inputs/#", "d", Some("m")).unwrap(), Filter::ModuleInputs);
        for bad in [
            "devices/other/messages/devicebound/#",
            "devices/d/messages/devicebound/#x",
            "#",
            "$iothub/twin/#",
            "devices/d/modules/m/#",
        ] {
            assert!(Filter::parse(bad, "d", None).is_err(), "{bad}");
        }
        assert!(Filter::parse("devices/d/messages/devicebound/#", "d", Some("m")).is_err());
        for f in [Filter::C2d, Filter::Methods, Filter::TwinResponses, Filter::TwinDesired, Filter::DpsResponses] {
            assert_eq!(Filter::parse(&f.text("d", None), "d", None).unwrap(), f);
        }
    }
}
