//! `fleetsim edge env DEVICE MODULE`: the `IOTEDGE_*` environment an IoT Edge module reads, for a
//! module of an Edge device in a running emulator, so module code that calls
//! `IoTHubModuleClient.create_from_edge_environment()` (Python) or `ModuleClient.fromEnvironment`
//! (Node) runs unchanged on a laptop: it signs its tokens through the emulator's workload socket
//! and trusts the emulator's CA from the trust bundle.
//!
//! Variables (Microsoft's IoT Edge module environment): `IOTEDGE_IOTHUBHOSTNAME`,
//! `IOTEDGE_GATEWAYHOSTNAME` (the host the module dials: the emulator), `IOTEDGE_DEVICEID`,
//! `IOTEDGE_MODULEID`, `IOTEDGE_MODULEGENERATIONID` (from the module identity), `IOTEDGE_WORKLOADURI`,
//! `IOTEDGE_APIVERSION`, `IOTEDGE_AUTHSCHEME`. The SDKs dial the gateway on MQTT's port 8883.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{EXIT_FAILED, EXIT_USAGE, ServiceOpts, connect, stop};

/// The workload API version the module SDKs are given (edgelet's, accepted by every SDK).
pub const WORKLOAD_API_VERSION: &str = "2019-01-30";

#[derive(Debug, Args)]
pub struct EdgeArgs {
    #[command(subcommand)]
    pub command: EdgeCommand,
}

#[derive(Debug, Subcommand)]
pub enum EdgeCommand {
    /// Print `export IOTEDGE_...=...` lines for a module of an Edge device in an emulator
    /// (`eval "$(fleetsim edge env edge1 filterModule)"`), or JSON with --json.
    Env(EnvArgs),
}

#[derive(Debug, Args)]
pub struct EnvArgs {
    /// The emulator's hub.json.
    #[arg(long, default_value = super::DEFAULT_HUB_JSON)]
    pub hub_json: PathBuf,
    /// Print a JSON object instead of shell lines.
    #[arg(long)]
    pub json: bool,
    /// The Edge device.
    pub device: String,
    /// The module.
    pub module: String,
}

pub async fn run(args: EdgeArgs) -> u8 {
    match args.command {
        EdgeCommand::Env(a) => env(a).await.unwrap_or_else(|code| code),
    }
}

/// Quotes a value for a POSIX shell: inside single quotes, a quote is closed, escaped, reopened.
fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

async fn env(args: EnvArgs) -> Result<u8, u8> {
    let info = crate::hub::info::HubInfo::load(&args.hub_json)
        .map_err(|e| stop(EXIT_USAGE, format!("no emulator at {}: {e}", args.hub_json.display())))?;
    let Some(workload) = info.edge_workload_uri.clone() else {
        return Err(stop(EXIT_FAILED, "this emulator serves no IoT Edge workload socket (see its log)"));
    };
    let opts =
        ServiceOpts { hub_json: Some(args.hub_json.clone()), connection_string: None, ca_file: None, json: false };
    let client = connect(&opts)?;
    let path = format!("/devices/{}/modules/{}", args.device, args.module);
    let (_, module) = client
        .request(reqwest::Method::GET, &path, None, &[])
        .await
        .map_err(|e| stop(EXIT_FAILED, format!("{}/{}: {e}", args.device, args.module)))?;
    let (_, device) = client
        .request(reqwest::Method::GET, &format!("/devices/{}", args.device), None, &[])
        .await
        .map_err(|e| stop(EXIT_FAILED, format!("{}: {e}", args.device)))?;
    if device["capabilities"]["iotEdge"] != true {
        return Err(stop(
            EXIT_FAILED,
            format!("{} is not an IoT Edge device (capabilities.iotEdge is false)", args.device),
        ));
    }
    let generation = module["generationId"].as_str().unwrap_or_default().to_string();
    let vars = [
        ("IOTEDGE_IOTHUBHOSTNAME", info.hostname.clone()),
        ("IOTEDGE_GATEWAYHOSTNAME", info.hostname.clone()),
        ("IOTEDGE_DEVICEID", args.device.clone()),
        ("IOTEDGE_MODULEID", args.module.clone()),
        ("IOTEDGE_MODULEGENERATIONID", generation),
        ("IOTEDGE_WORKLOADURI", workload),
        ("IOTEDGE_APIVERSION", WORKLOAD_API_VERSION.to_string()),
        ("IOTEDGE_AUTHSCHEME", "sasToken".to_string()),
    ];
    if args.json {
        let map: serde_json::Map<String, serde_json::Value> =
            vars.iter().map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone()))).collect();
        println!("{}", serde_json::Value::Object(map));
    } else {
        for (k, v) in &vars {
            println!("export {k}={}", shell_quote(v));
        }
        if info.mqtt_port != 8883 {
            eprintln!(
                "note: the module SDKs dial the gateway on port 8883; this emulator's MQTT port is {}",
                info.mqtt_port
            );
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn values_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("unix:///tmp/a b/workload.sock"), "'unix:///tmp/a b/workload.sock'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
