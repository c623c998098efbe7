//! `fleetsim invoke`: a direct method on one identity (its answer printed), or on every selected
//! identity at once with bounded concurrency: a method storm, summarised by latency and failures.

use std::time::Duration;

use serde_json::{Value, json};

use clap::Args;

use super::{
    EXIT_FAILED, EXIT_USAGE, Selector, ServiceOpts, connect, fanout, parse_json, parse_target, report, select, show,
    stop,
};
use crate::service::{MethodResult, ServiceClient, ServiceError, method_outcome};

async fn call(
    client: &ServiceClient,
    target: &(String, Option<String>),
    method: &str,
    payload: &Value,
    args: &InvokeArgs,
) -> Result<MethodResult, ServiceError> {
    let (response, connect) = (Duration::from_secs(args.timeout), Duration::from_secs(args.connect_timeout));
    client.invoke(&target.0, target.1.as_deref(), method, payload, response, connect).await
}

pub async fn run(args: InvokeArgs) -> u8 {
    inner(args).await.unwrap_or_else(|code| code)
}

async fn inner(args: InvokeArgs) -> Result<u8, u8> {
    let payload = parse_json("--payload", &args.payload)?;
    if args.select.is_fan_out() {
        let [method] = args.args.as_slice() else {
            return Err(stop(EXIT_USAGE, "with --prefix or --query, give only METHOD"));
        };
        let client = connect(&args.service)?;
        let targets = select(&client, &args.select).await?;
        let summary = fanout::run(targets, args.select.concurrency as usize, |t| {
            let (client, payload, args) = (&client, &payload, &args);
            async move { method_outcome(&call(client, &t, method, payload, args).await) }
        })
        .await;
        return Ok(report(&summary, args.service.json, &format!("{method}: ")));
    }
    let [target, method] = args.args.as_slice() else {
        return Err(stop(EXIT_USAGE, "give DEVICE[/MODULE] METHOD, or --prefix / --query and METHOD"));
    };
    let target = parse_target(target)?;
    let client = connect(&args.service)?;
    let t0 = std::time::Instant::now();
    let r = call(&client, &target, method, &payload, &args)
        .await
        .map_err(|e| stop(EXIT_FAILED, format!("{} {method}: {e}", show(&target))))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if args.service.json {
        println!("{}", json!({"status": r.status, "payload": r.payload, "latency_ms": ms}));
    } else {
        println!("{} {method}: status {} in {ms:.1} ms", show(&target), r.status);
        println!("{}", serde_json::to_string_pretty(&r.payload).expect("JSON prints"));
    }
    Ok(if (200..300).contains(&r.status) { 0 } else { EXIT_FAILED })
}

#[derive(Debug, Args)]
pub struct InvokeArgs {
    #[command(flatten)]
    pub service: ServiceOpts,
    #[command(flatten)]
    pub select: Selector,
    /// DEVICE[/MODULE] METHOD, or only METHOD with --prefix or --query.
    #[arg(required = true, num_args = 1..=2)]
    pub args: Vec<String>,
    /// The request payload (JSON).
    #[arg(long, default_value = "null")]
    pub payload: String,
    /// Seconds to wait for the device's answer: 5 to 300, IoT Hub's range.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..=300))]
    pub timeout: u64,
    /// Seconds to wait for the device to come online: 0 to 300, IoT Hub's range.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=300))]
    pub connect_timeout: u64,
}
