//! `fleetsim tail`: events from a hub's Event Hubs-compatible endpoint, printed as they arrive,
//! what `az iot hub monitor-events` is used for. Against the emulator (its hub.json names the
//! endpoint, the address and the CA) or any Event Hubs connection string (Azure's "Built-in
//! endpoints" one). Filtered by device id or prefix, module and message source; text or JSON
//! lines; from the latest event, the earliest retained, an offset or a time. Output goes through
//! one buffered writer flushed whenever the reader has nothing more queued, so a burst costs a
//! write per batch, not per event.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use base64::Engine;
use clap::Args;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{DEFAULT_HUB_JSON, EXIT_FAILED, EXIT_USAGE, stop};
use crate::backend::consumer::{self, ConsumerConfig, Event, StartAt};
use crate::backend::target::EventHubTarget;

#[derive(Debug, Args)]
pub struct TailArgs {
    /// An emulator's hub.json (the default when no connection string is given).
    #[arg(long)]
    pub hub_json: Option<PathBuf>,
    /// An Event Hubs connection string with EntityPath (Azure portal: IoT hub, Built-in
    /// endpoints). Prefer the environment variable: arguments are visible to other local users.
    #[arg(long, env = "FLEETSIM_EVENTHUB_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,
    /// Extra CA to trust (PEM), e.g. for an emulator reached by connection string.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The consumer group to read with.
    #[arg(long, default_value = "$Default")]
    pub consumer_group: String,
    /// Only events of this device (repeat for several).
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Only events of devices whose id starts with this.
    #[arg(long)]
    pub device_prefix: Option<String>,
    /// Only events of this module (of any selected device).
    #[arg(long)]
    pub module: Option<String>,
    /// Only events of this message source: Telemetry, twinChangeEvents, deviceLifecycleEvents,
    /// deviceConnectionStateEvents.
    #[arg(long)]
    pub source: Option<String>,
    /// Where to start: `latest` (events enqueued from now on), `earliest` (the oldest retained).
    #[arg(long, default_value = "latest", value_parser = ["latest", "earliest"], conflicts_with_all = ["offset", "since"])]
    pub from: String,
    /// Start after this offset (`x-opt-offset`); with --partition, usually one partition.
    #[arg(long)]
    pub offset: Option<String>,
    /// Start at events enqueued since this time: RFC 3339 (2026-11-29T10:00:00Z) or a duration
    /// back from now (10m).
    #[arg(long, conflicts_with = "offset")]
    pub since: Option<String>,
    /// Only these partitions (repeat); all by default.
    #[arg(long = "partition")]
    pub partitions: Vec<String>,
    /// Stop after printing this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long (e.g. 30s); runs until interrupted by default.
    #[arg(long)]
    pub duration: Option<humantime::Duration>,
    /// Print JSON lines (one object per event) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Leave application properties out of text output.
    #[arg(long)]
    pub no_properties: bool,
}

/// Which events are printed.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub devices: Vec<String>,
    pub device_prefix: Option<String>,
    pub module: Option<String>,
    pub source: Option<String>,
}

impl Filter {
    pub fn admits(&self, e: &Event) -> bool {
        let device = e.device_id.as_deref().unwrap_or("");
        (self.devices.is_empty() || self.devices.iter().any(|d| d == device))
            && self.device_prefix.as_deref().is_none_or(|p| device.starts_with(p))
            && self.module.as_deref().is_none_or(|m| e.module_id.as_deref() == Some(m))
            // IoT Hub names sources in camel case; accept any case from the command line.
            && self.source.as_deref().is_none_or(|s| e.source.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(s)))
    }
}

fn iso(ms: Option<i64>) -> Value {
    match ms {
        Some(ms) if ms >= 0 => json!(
            humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
        ),
        _ => Value::Null,
    }
}

/// The JSON line of an event: identity, source, system properties, application properties and
/// the body (parsed when it is JSON, text when UTF-8, otherwise `body_base64`).
pub fn to_json(e: &Event) -> Value {
    let mut v = json!({
        "device_id": e.device_id,
        "module_id": e.module_id,
        "source": e.source,
        "partition": &*e.partition,
        "sequence_number": e.sequence_number,
        "offset": e.offset,
        "enqueued_time": iso(e.enqueued_ms),
        "iothub_enqueued_time": iso(e.iothub_enqueued_ms),
        "message_id": e.message_id,
        "correlation_id": e.correlation_id,
        "content_type": e.content_type,
        "content_encoding": e.content_encoding,
        "properties": e.properties.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
    });
    match serde_json::from_slice::<Value>(&e.body) {
        Ok(body) => v["body"] = body,
        Err(_) => match std::str::from_utf8(&e.body) {
            Ok(text) => v["body"] = json!(text),
            Err(_) => v["body_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&e.body)),
        },
    }
    v
}

/// One text line: time, identity, source, properties (unless left out), body.
pub fn to_text(e: &Event, properties: bool) -> String {
    let time = iso(e.iothub_enqueued_ms.or(e.enqueued_ms));
    let mut line = format!(
        "{} {}{} {}",
        time.as_str().unwrap_or("-"),
        e.device_id.as_deref().unwrap_or("-"),
        e.module_id.as_deref().map(|m| format!("/{m}")).unwrap_or_default(),
        e.source.as_deref().unwrap_or("-"),
    );
    if properties && !e.properties.is_empty() {
        let p: Vec<String> = e.properties.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line.push_str(" [");
        line.push_str(&p.join(" "));
        line.push(']');
    }
    line.push(' ');
    match std::str::from_utf8(&e.body) {
        Ok(text) => line.push_str(&text.replace('\n', " ")),
        Err(_) => line.push_str(&base64::engine::general_purpose::STANDARD.encode(&e.body)),
    }
    line
}

fn start_at(args: &TailArgs) -> Result<StartAt, u8> {
    if let Some(o) = &args.offset {
        if o.is_empty() || !(o == "-1" || o.bytes().all(|b| b.is_ascii_digit())) {
            return Err(stop(EXIT_USAGE, format!("--offset `{o}` is not a number")));
        }
        return Ok(StartAt::Offset(o.clone()));
    }
    if let Some(s) = &args.since {
        if let Ok(t) = humantime::parse_rfc3339_weak(s) {
            return Ok(StartAt::Time(t));
        }
        return match humantime::parse_duration(s) {
            Ok(d) => Ok(StartAt::Time(SystemTime::now().checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH))),
            Err(_) => Err(stop(EXIT_USAGE, format!("--since `{s}` is neither an RFC 3339 time nor a duration"))),
        };
    }
    Ok(if args.from == "earliest" { StartAt::Earliest } else { StartAt::Latest })
}

/// The endpoint, where to dial it and the TLS roots, from a connection string or a hub.json.
pub fn endpoint(
    connection_string: Option<&str>,
    hub_json: Option<&PathBuf>,
    ca_file: Option<&PathBuf>,
) -> Result<(EventHubTarget, String, std::sync::Arc<rustls::ClientConfig>), u8> {
    let (text, dial, ca) = match (connection_string, hub_json) {
        (Some(cs), None) => (cs.to_owned(), None, ca_file.cloned()),
        (_, hub_json) => {
            let path = hub_json.cloned().unwrap_or_else(|| PathBuf::from(DEFAULT_HUB_JSON));
            let info = crate::hub::info::HubInfo::load(&path).map_err(|e| {
                stop(EXIT_USAGE, format!("no connection string given and no emulator at {} ({e:#})", path.display()))
            })?;
            let cs = info.eventhub_connection_string.clone().ok_or_else(|| {
                stop(
                    EXIT_USAGE,
                    format!("{}: the emulator serves no Event Hubs endpoint (AMQP is off)", path.display()),
                )
            })?;
            (cs, info.amqp_addr.map(|a| a.to_string()), Some(ca_file.cloned().unwrap_or(info.ca_file)))
        }
    };
    let target: EventHubTarget =
        text.parse().map_err(|e| stop(EXIT_USAGE, format!("the Event Hubs connection string: {e}")))?;
    let tls = crate::client::transport::client_config(ca.as_deref()).map_err(|e| stop(EXIT_USAGE, format!("{e:#}")))?;
    let dial = dial.unwrap_or_else(|| format!("{}:{}", target.host, target.port));
    Ok((target, dial, tls))
}

pub async fn run(args: TailArgs) -> u8 {
    inner(args).await.unwrap_or_else(|code| code)
}

async fn inner(args: TailArgs) -> Result<u8, u8> {
    let start = start_at(&args)?;
    let (target, dial, tls) =
        endpoint(args.connection_string.as_deref(), args.hub_json.as_ref(), args.ca_file.as_ref())?;
    let filter = Filter {
        devices: args.devices.clone(),
        device_prefix: args.device_prefix.clone(),
        module: args.module.clone(),
        source: args.source.clone(),
    };
    let cfg = ConsumerConfig {
        target,
        dial,
        tls,
        group: args.consumer_group.clone(),
        start,
        partitions: args.partitions.clone(),
    };
    let (tx, mut rx) = mpsc::channel::<Event>(8192);
    let stop_reading = CancellationToken::new();
    let reader = tokio::spawn(consumer::run(cfg, tx, stop_reading.clone()));
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + *d);
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut printed = 0u64;
    let limit = args.count.unwrap_or(u64::MAX);
    let mut write_failed = false;
    'read: while printed < limit {
        let first = tokio::select! {
            e = rx.recv() => e,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => None,
        };
        let Some(first) = first else { break };
        let mut next = Some(first);
        while let Some(e) = next.take() {
            if filter.admits(&e) {
                let line = if args.json { to_json(&e).to_string() } else { to_text(&e, !args.no_properties) };
                if writeln!(out, "{line}").is_err() {
                    write_failed = true;
                    break 'read;
                }
                printed += 1;
                if printed >= limit {
                    break 'read;
                }
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            write_failed = true;
            break;
        }
    }
    let _ = out.flush();
    drop(out);
    stop_reading.cancel();
    drop(rx);
    match reader.await {
        // A closed stdout (`| head`) is the reader's way of saying it has seen enough.
        Ok(Err(e)) if !write_failed => Err(stop(EXIT_FAILED, format!("{e:#}"))),
        _ => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(device: &str, module: Option<&str>, source: &str) -> Event {
        Event {
            partition: "0".into(),
            device_id: Some(device.into()),
            module_id: module.map(Into::into),
            source: Some(source.into()),
            ..Default::default()
        }
    }

    #[test]
    fn filters_by_device_prefix_module_and_source() {
        let f = Filter { device_prefix: Some("cold-".into()), ..Default::default() };
        assert!(f.admits(&event("cold-1", None, "Telemetry")));
        assert!(!f.admits(&event("hot-1", None, "Telemetry")));
        let f = Filter { devices: vec!["a".into(), "b".into()], module: Some("m".into()), ..Default::default() };
        assert!(f.admits(&event("b", Some("m"), "Telemetry")));
        assert!(!f.admits(&event("b", None, "Telemetry")));
        assert!(!f.admits(&event("c", Some("m"), "Telemetry")));
        let f = Filter { source: Some("twinchangeevents".into()), ..Default::default() };
        assert!(f.admits(&event("a", None, "twinChangeEvents")));
        assert!(!f.admits(&event("a", None, "Telemetry")));
    }

    #[test]
    fn bodies_print_as_json_text_or_base64() {
        let mut e = event("d", None, "Telemetry");
        e.body = br#"{"t":1}"#.to_vec();
        e.enqueued_ms = Some(0);
        e.properties = vec![("k".into(), "v".into())];
        let j = to_json(&e);
        assert_eq!(j["body"], json!({"t": 1}));
        assert_eq!(j["properties"]["k"], "v");
        assert_eq!(j["enqueued_time"], "1970-01-01T00:00:00.000Z");
        e.body = b"plain".to_vec();
        assert_eq!(to_json(&e)["body"], "plain");
        e.body = vec![0xff, 0xfe];
        assert_eq!(to_json(&e)["body_base64"], "//4=");
        assert!(to_json(&e).get("body").is_none());
        e.body = b"x".to_vec();
        assert_eq!(to_text(&e, true), "1970-01-01T00:00:00.000Z d Telemetry [k=v] x");
        assert_eq!(to_text(&e, false), "1970-01-01T00:00:00.000Z d Telemetry x");
    }
}
