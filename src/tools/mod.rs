//! The operator commands (`devices`, `twin`, `invoke`, `tail`, `c2d`): the service side of a load test, against
//! the emulator (through its hub.json) or a real IoT Hub (through a service connection string).
//! Each prints text or JSON and returns its exit status: 0 when every call succeeded, 1 when any
//! failed, 64 for bad arguments or credentials.

pub mod c2d;
pub mod cleanup;
pub mod devices;
pub mod edge_env;
pub mod fanout;
pub mod invoke;
pub mod model_import;
pub mod tail;
pub mod twin;

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Args;
use serde_json::Value;

use crate::service::ServiceClient;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 64;

/// Where an emulator started from this directory keeps its hub.json (in
/// `hub::config::DEFAULT_DATA_DIR`, a test holds them together).
pub const DEFAULT_HUB_JSON: &str = ".fleetsim/hub/hub.json";

/// The service client the options describe: a connection string (flag or environment) first,
/// else a hub.json. The connection string's key never reaches an error message.
pub fn client(opts: &ServiceOpts) -> anyhow::Result<ServiceClient> {
    let (cs_text, ca): (String, Option<PathBuf>) = match (&opts.connection_string, &opts.hub_json) {
        (Some(cs), None) => (cs.clone(), opts.ca_file.clone()),
        (_, hub_json) => {
            let path = hub_json.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_HUB_JSON));
            let info = crate::hub::info::HubInfo::load(&path).with_context(|| {
                format!("no connection string given and no emulator at {} (see --hub-json)", path.display())
            })?;
            (info.service_connection_string, Some(opts.ca_file.clone().unwrap_or(info.ca_file)))
        }
    };
    let cs: crate::iot::connection_string::ConnectionString =
        cs_text.parse().map_err(|e| anyhow!("the service connection string: {e}"))?;
    let tls = crate::client::transport::client_config(ca.as_deref())?;
    let http = crate::service::https_client(&tls)?;
    ServiceClient::new(http, &cs).map_err(|e| anyhow!("{e}"))
}

/// `DEVICE` or `DEVICE/MODULE`.
pub fn parse_target(text: &str) -> Result<(String, Option<String>), u8> {
    let (d, m) = match text.split_once('/') {
        Some((d, m)) => (d, Some(m)),
        None => (text, None),
    };
    if d.is_empty() || m.is_some_and(|m| m.is_empty() || m.contains('/')) {
        return Err(stop(EXIT_USAGE, format!("`{text}` is not DEVICE or DEVICE/MODULE")));
    }
    Ok((d.to_owned(), m.map(str::to_owned)))
}

/// The identities a selector names: twins from a query (or every device, filtered by prefix),
/// each the device itself or its `--module`.
pub async fn select(client: &ServiceClient, s: &Selector) -> Result<Vec<(String, Option<String>)>, u8> {
    let sql = s.query.clone().unwrap_or_else(|| "SELECT * FROM devices".to_owned());
    let twins =
        client.query(&sql, usize::MAX).await.map_err(|e| stop(EXIT_FAILED, format!("the query failed: {e}")))?;
    let mut out: Vec<(String, Option<String>)> = twins
        .iter()
        .filter_map(|t| {
            let d = t["deviceId"].as_str()?;
            if s.prefix.as_deref().is_some_and(|p| !d.starts_with(p)) {
                return None;
            }
            // A query over devices.modules names modules itself.
            let m = t["moduleId"].as_str().map(str::to_owned).or_else(|| s.module.clone());
            Some((d.to_owned(), m))
        })
        .collect();
    out.sort();
    out.dedup();
    out.truncate(s.limit as usize);
    if out.is_empty() {
        // Say what was asked and what there was, rather than a bare "0 calls".
        let what = match (&s.query, &s.prefix) {
            (Some(q), _) => format!("the query `{q}` selected no device"),
            (None, Some(p)) => format!("no device id starts with `{p}` ({} devices in the hub)", twins.len()),
            (None, None) => "the hub has no devices".to_owned(),
        };
        return Err(stop(EXIT_FAILED, what));
    }
    Ok(out)
}

/// A command's early exit: the message is printed, the status returned.
pub fn stop(code: u8, message: impl std::fmt::Display) -> u8 {
    eprintln!("error: {message}");
    code
}

/// `client`, or exit 64 with the reason.
pub fn connect(opts: &ServiceOpts) -> Result<ServiceClient, u8> {
    client(opts).map_err(|e| stop(EXIT_USAGE, format!("{e:#}")))
}

pub fn parse_json(what: &str, text: &str) -> Result<Value, u8> {
    serde_json::from_str(text).map_err(|e| stop(EXIT_USAGE, format!("{what} is not JSON: {e}")))
}

/// Prints a fan-out summary; the status says whether every call succeeded.
pub fn report(summary: &fanout::Summary, json: bool, title: &str) -> u8 {
    if json {
        println!("{}", summary.to_json());
    } else {
        println!("{title}{}", summary.to_text());
    }
    if summary.failed() == 0 && summary.calls > 0 { 0 } else { EXIT_FAILED }
}

pub fn show(name: &(String, Option<String>)) -> String {
    match &name.1 {
        Some(m) => format!("{}/{m}", name.0),
        None => name.0.clone(),
    }
}

/// Where the service API is and how to sign for it.
#[derive(Debug, Clone, Args)]
pub struct ServiceOpts {
    /// An emulator's hub.json (the default when no connection string is given).
    #[arg(long)]
    pub hub_json: Option<PathBuf>,
    /// A service (policy) connection string. Prefer the environment variable
    /// FLEETSIM_SERVICE_CONNECTION_STRING: arguments are visible to other local users.
    #[arg(long, env = "FLEETSIM_SERVICE_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,
    /// Extra CA to trust (PEM), e.g. for an emulator reached by connection string.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Which identities a fan-out command acts on. Without one, the command takes a single target.
#[derive(Debug, Clone, Args)]
pub struct Selector {
    /// Every device whose id starts with this.
    #[arg(long, conflicts_with = "query")]
    pub prefix: Option<String>,
    /// Every device a twin query selects, e.g. "SELECT * FROM devices WHERE tags.site = 'oslo'".
    #[arg(long)]
    pub query: Option<String>,
    /// Act on this module of each selected device instead of the device itself.
    #[arg(long)]
    pub module: Option<String>,
    /// Calls in flight at once (1 to 10,000).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Select at most this many identities (1 to 10,000,000).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub limit: u32,
}

impl Selector {
    pub fn is_fan_out(&self) -> bool {
        self.prefix.is_some() || self.query.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_commands_look_where_the_emulator_writes() {
        let data = std::path::Path::new(crate::hub::config::DEFAULT_DATA_DIR);
        // `fleetsim token` defaults to this path too (cli.rs names this constant).
        assert_eq!(std::path::Path::new(DEFAULT_HUB_JSON), data.join("hub.json"));
    }

    #[test]
    fn targets_are_device_or_device_slash_module() {
        assert_eq!(parse_target("d1").unwrap(), ("d1".into(), None));
        assert_eq!(parse_target("d1/m").unwrap(), ("d1".into(), Some("m".into())));
        for bad in ["", "/m", "d/", "d/m/x"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
