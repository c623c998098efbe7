//! `fleetsim twin`: show one twin, patch its desired properties, or patch many (a desired-property
//! sweep, measured like a method storm).

use clap::Args;

use super::{
    EXIT_FAILED, EXIT_USAGE, Selector, ServiceOpts, connect, fanout, parse_json, parse_target, report, select, show,
    stop,
};

pub async fn run(args: TwinArgs) -> u8 {
    inner(args).await.unwrap_or_else(|code| code)
}

async fn inner(args: TwinArgs) -> Result<u8, u8> {
    let desired = args.desired.as_deref().map(|d| parse_json("--desired", d)).transpose()?;
    if desired.as_ref().is_some_and(|d| !d.is_object()) {
        return Err(stop(EXIT_USAGE, "--desired must be a JSON object"));
    }
    if args.select.is_fan_out() {
        let (Some(desired), None) = (desired, &args.target) else {
            return Err(stop(EXIT_USAGE, "with --prefix or --query, give --desired and no DEVICE"));
        };
        let client = connect(&args.service)?;
        let targets = select(&client, &args.select).await?;
        let summary = fanout::run(targets, args.select.concurrency as usize, |t| {
            let (client, desired) = (&client, &desired);
            async move {
                let r = client.patch_desired(&t.0, t.1.as_deref(), desired).await;
                r.map(|_| ()).map_err(|e| format!("hub_{}", e.status()))
            }
        })
        .await;
        return Ok(report(&summary, args.service.json, "desired patch: "));
    }
    let Some(target) = &args.target else {
        return Err(stop(EXIT_USAGE, "give DEVICE[/MODULE], or --prefix / --query with --desired"));
    };
    let (device, module) = parse_target(target)?;
    let client = connect(&args.service)?;
    let result = match &desired {
        Some(d) => client.patch_desired(&device, module.as_deref(), d).await,
        None => client.twin(&device, module.as_deref()).await,
    };
    let twin = result.map_err(|e| stop(EXIT_FAILED, format!("{}: {e}", show(&(device, module)))))?;
    if args.service.json {
        println!("{twin}");
    } else {
        println!("{}", serde_json::to_string_pretty(&twin).expect("JSON prints"));
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct TwinArgs {
    #[command(flatten)]
    pub service: ServiceOpts,
    #[command(flatten)]
    pub select: Selector,
    /// DEVICE or DEVICE/MODULE (omit with --prefix or --query).
    pub target: Option<String>,
    /// Merge this JSON object into the desired properties.
    #[arg(long)]
    pub desired: Option<String>,
}
