//! The validated form of a scenario: what the device runtime executes. Built only by
//! `schema::load`, so every value here has passed its checks.

use std::path::PathBuf;
use std::time::Duration;

use super::value::{GenState, Template, ValueSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// MQTT over TLS, port 8883.
    Mqtt,
    /// MQTT over WebSockets, port 443, `/$iothub/websocket`.
    WebSockets,
    /// IoT Hub's device REST API, port 443: telemetry POSTed, C2D polled every `poll_interval`;
    /// no twins, desired properties or methods (IoT Hub has none over HTTPS).
    Https { poll_interval: std::time::Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpsTransport {
    Https,
    Mqtt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provisioning {
    /// DPS with a symmetric-key group enrollment (derived keys) or individual enrollments.
    Dps { individual: bool, transport: DpsTransport },
    /// Straight to the hub with the device's own key (registry-created or from `keys_file`).
    ConnectionString,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStyle {
    /// `{value, ac, av, ad}` (Plug and Play, current IoT Central).
    Pnp,
    /// `{value, status, desiredVersion}` (pre-PnP IoT Central).
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonType {
    Any,
    Number,
    Integer,
    String,
    Bool,
    Object,
    /// No payload (null or empty).
    None,
}

impl JsonType {
    pub fn matches(self, v: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match self {
            JsonType::Any => true,
            JsonType::Number => v.is_number(),
            JsonType::Integer => v.is_i64() || v.is_u64(),
            JsonType::String => v.is_string(),
            JsonType::Bool => v.is_boolean(),
            JsonType::Object => v.is_object(),
            JsonType::None => matches!(v, V::Null),
        }
    }

    pub const NAMES: &'static [&'static str] = &["any", "number", "integer", "string", "bool", "object", "none"];

    pub fn from_name(s: &str) -> JsonType {
        match s {
            "number" => JsonType::Number,
            "integer" => JsonType::Integer,
            "string" => JsonType::String,
            "bool" => JsonType::Bool,
            "object" => JsonType::Object,
            "none" => JsonType::None,
            _ => JsonType::Any,
        }
    }
}

/// What a field is compared with: a number written in the scenario, or the current value of a
/// writable (desired) property of the identity.
#[derive(Debug, Clone, PartialEq)]
pub enum Threshold {
    Value(f64),
    Property(String),
}

/// Send a message only when a numeric field is above and/or below its thresholds. A threshold
/// naming a writable property that has no value yet does not hold the message back.
#[derive(Debug, Clone, PartialEq)]
pub struct SendIf {
    /// Path into the body, e.g. `["machine", "temperature"]`.
    pub field: Vec<String>,
    pub above: Option<Threshold>,
    pub below: Option<Threshold>,
}

/// What a module does with the messages routed to one of its inputs (IoT Edge
/// `BrokeredEndpoint("/modules/{m}/inputs/{name}")`).
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    /// The output the handled message is sent on (`$.on`); `None` consumes it (counted only).
    pub output: Option<String>,
    /// Forward only messages whose JSON body passes; the others are counted as filtered.
    pub send_if: Option<SendIf>,
    /// Keep the incoming message's application properties (the Edge samples copy them).
    pub keep_properties: bool,
    /// Properties set on the forwarded message; `{payload}` is the incoming JSON body.
    pub properties: Vec<(String, ValueSpec)>,
    /// A new body; `{payload}` is the incoming JSON body. `None` forwards the body unchanged.
    pub body: Option<ValueSpec>,
}

/// Who routes the messages of an Edge device's modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeRouting {
    /// The hub (the emulator acts as the device's Edge hub).
    Hub,
    /// The fleet, in process: for Azure, where a simulated Edge device has no Edge hub.
    Fleet,
}

/// One `$edgeHub` route: its name and text, and the text parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeRoute {
    pub name: String,
    pub text: String,
    pub route: crate::iot::route::Route,
}

/// An IoT Edge device's deployment, applied when the fleet creates the device.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeSpec {
    pub routes: Vec<EdgeRoute>,
    /// `storeAndForwardConfiguration.timeToLiveSecs` of `$edgeHub`.
    pub time_to_live_secs: u64,
    /// `None`: decided by the target (hub for an emulator, fleet for Azure).
    pub routing: Option<EdgeRouting>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySpec {
    pub interval: Duration,
    /// Fraction of the interval by which each send may move, so devices do not beat in step.
    pub jitter: f64,
    /// A writable property (seconds) that overrides `interval` when set.
    pub interval_property: Option<String>,
    pub fields: ValueSpec,
    pub properties: Vec<(String, ValueSpec)>,
    pub content_type: String,
    pub content_encoding: String,
    /// PnP component: sent as `$.sub`.
    pub component: Option<String>,
    /// Edge output name: sent as `$.on`.
    pub output: Option<String>,
    pub send_if: Option<SendIf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RebootSpec {
    pub downtime: Duration,
    /// Answer the method before going down (true), or after coming back.
    pub answer_first: bool,
    pub report: Vec<(String, ValueSpec)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub after: Duration,
    pub report: Vec<(String, ValueSpec)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandSpec {
    pub name: String,
    pub component: Option<String>,
    pub status: u16,
    pub request: JsonType,
    /// The request's DTDL schema, when the command comes from a model (or says `request_schema`):
    /// a request that does not fit it is answered 400.
    pub request_schema: Option<crate::iot::dtdl::Schema>,
    pub response: Option<ValueSpec>,
    pub delay: Duration,
    /// Reported properties set when the command runs (e.g. `state` for turnon/turnoff).
    pub report: Vec<(String, ValueSpec)>,
    /// Long-running: answered now, finished later with a reported property.
    pub complete: Option<Completion>,
    pub reboot: Option<RebootSpec>,
}

impl CommandSpec {
    /// The direct-method name: `component*command` for component commands.
    pub fn method_name(&self) -> String {
        match &self.component {
            Some(c) => format!("{c}*{}", self.name),
            None => self.name.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WritableSpec {
    pub name: String,
    pub component: Option<String>,
    pub ack: AckStyle,
    pub delay: Duration,
    pub kind: JsonType,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Reported with `ac: 203, av: 0` when the twin has no desired value.
    pub default: Option<serde_json::Value>,
    /// The property's DTDL schema, when it comes from a model (or says `schema`): a value that
    /// does not fit it is acknowledged 400 with the value in use.
    pub schema: Option<crate::iot::dtdl::Schema>,
}

/// What an identity (device or module) does once connected.
#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    pub telemetry: Vec<TelemetrySpec>,
    pub reported: Vec<(String, ValueSpec)>,
    pub commands: Vec<CommandSpec>,
    pub writable: Vec<WritableSpec>,
    /// Module inputs handled (Edge modules only).
    pub inputs: Vec<InputSpec>,
    /// C2D messages carrying `method-name` run that command (IoT Central offline commands).
    pub c2d_commands: bool,
    /// Fresh generator state for one identity.
    pub initial_state: GenState,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModuleTemplate {
    pub id: String,
    pub behaviour: Behaviour,
    /// The module twin's desired properties in the deployment (Edge devices only).
    pub desired: serde_json::Map<String, serde_json::Value>,
    /// The container image named in the `$edgeAgent` module list.
    pub image: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTemplate {
    pub file: PathBuf,
    /// Line and column of the template's `[[devices]]` table in `file`, for problems found later
    /// (the hub settings cannot serve it).
    pub at: (usize, usize),
    pub name: String,
    pub count: u64,
    pub first: u64,
    pub id: Template,
    pub model_id: Option<String>,
    pub transport: Transport,
    pub provisioning: Provisioning,
    /// For Azure: `id,key` lines for individual enrollments or connection-string devices.
    pub keys_file: Option<PathBuf>,
    /// The model directory, when the behaviour comes from a DTDL model: the embedded emulator
    /// checks devices against the same models.
    pub model_dir: Option<PathBuf>,
    pub behaviour: Behaviour,
    pub modules: Vec<ModuleTemplate>,
    /// Set for an IoT Edge device (`[devices.edge]`): its deployment.
    pub edge: Option<EdgeSpec>,
}

impl DeviceTemplate {
    /// The device id of ordinal `n`.
    pub fn device_id(&self, n: u64) -> String {
        self.id.render(&super::value::Ctx { n, ..Default::default() })
    }
}
