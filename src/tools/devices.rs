//! `fleetsim devices`: the registry as an operator sees it, one line per identity.

use clap::Args;
use serde_json::Value;

use super::{EXIT_FAILED, ServiceOpts, connect, stop};

pub async fn run(args: DevicesArgs) -> u8 {
    let client = match connect(&args.service) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let sql = match (&args.query, args.modules) {
        (Some(q), _) => q.clone(),
        (None, true) => "SELECT * FROM devices.modules".to_owned(),
        (None, false) => "SELECT * FROM devices".to_owned(),
    };
    let twins = match client.query(&sql, usize::MAX).await {
        Ok(t) => t,
        Err(e) => return stop(EXIT_FAILED, format!("the query failed: {e}")),
    };
    let rows: Vec<&Value> = twins
        .iter()
        .filter(|t| args.prefix.as_deref().is_none_or(|p| t["deviceId"].as_str().is_some_and(|d| d.starts_with(p))))
        .collect();
    if args.service.json {
        let list: Vec<Value> = rows
            .iter()
            .map(|t| {
                serde_json::json!({
                    "deviceId": t["deviceId"], "moduleId": t.get("moduleId"),
                    "connectionState": t["connectionState"], "status": t["status"],
                    "lastActivityTime": t["lastActivityTime"], "modelId": t["modelId"],
                })
            })
            .collect();
        println!("{}", Value::Array(list));
        return 0;
    }
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let id = |t: &Value| match t["moduleId"].as_str() {
        Some(m) => format!("{}/{m}", s(&t["deviceId"])),
        None => s(&t["deviceId"]),
    };
    let width = rows.iter().map(|t| id(t).len()).max().unwrap_or(2).max(2);
    println!("{:width$}  {:12}  {:8}  LAST ACTIVITY", "ID", "STATE", "STATUS");
    for t in &rows {
        println!(
            "{:width$}  {:12}  {:8}  {}",
            id(t),
            s(&t["connectionState"]),
            s(&t["status"]),
            s(&t["lastActivityTime"])
        );
    }
    let connected = rows.iter().filter(|t| t["connectionState"] == "Connected").count();
    println!("{} identities, {connected} connected", rows.len());
    0
}

#[derive(Debug, Args)]
pub struct DevicesArgs {
    #[command(flatten)]
    pub service: ServiceOpts,
    /// Only devices whose id starts with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// A twin query instead of every device.
    #[arg(long, conflicts_with = "prefix")]
    pub query: Option<String>,
    /// List modules instead of devices.
    #[arg(long)]
    pub modules: bool,
}
