//! `fleetsim c2d`: one cloud-to-device message over AMQP, as a back end sends it, to the
//! emulator (through its hub.json) or a real IoT hub (a service connection string whose policy
//! has ServiceConnect: `iothubowner` or `service`), and with `--wait-feedback` the hub's feedback
//! record for it. Exit 0 when sent (and, if waited for, the feedback is `Success`), 1 otherwise,
//! 64 for bad arguments or credentials.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;
use serde_json::json;

use super::{DEFAULT_HUB_JSON, EXIT_FAILED, EXIT_USAGE, stop};
use crate::backend::amqp::Link;
use crate::backend::c2d::{self, Ack, C2dMessage};
use crate::backend::target::AMQPS_PORT;
use crate::iot::connection_string::ConnectionString;
use crate::iot::sas::{Key, sign_token};

#[derive(Debug, Args)]
pub struct C2dArgs {
    /// The device to send to.
    pub device: String,
    /// The message body (text).
    #[arg(long, default_value = "")]
    pub body: String,
    /// An application property, `KEY=VALUE` (repeat for several).
    #[arg(long = "property", value_parser = key_value)]
    pub properties: Vec<(String, String)>,
    /// Feedback to ask for: none, positive, negative or full.
    #[arg(long, default_value = "none")]
    pub ack: Ack,
    /// The message id (a new UUID by default).
    #[arg(long)]
    pub message_id: Option<String>,
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Time to live, e.g. 1h; the hub's default when left out.
    #[arg(long)]
    pub ttl: Option<humantime::Duration>,
    /// Wait for the feedback record of this message (needs --ack other than none).
    #[arg(long)]
    pub wait_feedback: bool,
    /// How long to wait for the feedback.
    #[arg(long, default_value = "60s")]
    pub feedback_timeout: humantime::Duration,
    #[command(flatten)]
    pub service: super::ServiceOpts,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// How long the put-token lasts: the command is short.
const TOKEN_TTL: u64 = 3600;

pub async fn run(args: C2dArgs) -> u8 {
    inner(args).await.unwrap_or_else(|code| code)
}

async fn inner(args: C2dArgs) -> Result<u8, u8> {
    if args.wait_feedback && args.ack == Ack::None {
        return Err(stop(EXIT_USAGE, "--wait-feedback needs --ack positive, negative or full"));
    }
    let (cs_text, dial, ca) = match (&args.service.connection_string, &args.service.hub_json) {
        (Some(cs), None) => (cs.clone(), None, args.service.ca_file.clone()),
        (_, hub_json) => {
            let path = hub_json.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_HUB_JSON));
            let info = crate::hub::info::HubInfo::load(&path).map_err(|e| {
                stop(EXIT_USAGE, format!("no connection string given and no emulator at {} ({e:#})", path.display()))
            })?;
            let Some(addr) = info.amqp_addr else {
                return Err(stop(EXIT_USAGE, format!("{}: the emulator serves no AMQP", path.display())));
            };
            (
                info.service_connection_string.clone(),
                Some(addr.to_string()),
                Some(args.service.ca_file.clone().unwrap_or(info.ca_file)),
            )
        }
    };
    let cs: ConnectionString =
        cs_text.parse().map_err(|e| stop(EXIT_USAGE, format!("the service connection string: {e}")))?;
    let (Some(policy), Some(key_text)) = (cs.shared_access_key_name.as_deref(), cs.shared_access_key.as_deref()) else {
        return Err(stop(EXIT_USAGE, "the service connection string needs SharedAccessKeyName and SharedAccessKey"));
    };
    let key =
        Key::from_base64(key_text).map_err(|e| stop(EXIT_USAGE, format!("the service connection string: {e}")))?;
    // HostName may carry the emulator's HTTPS port; AMQP is on its own port.
    let host = cs.host_name.split(':').next().unwrap_or_default().to_owned();
    let dial = dial.unwrap_or_else(|| format!("{host}:{AMQPS_PORT}"));
    let tls = crate::client::transport::client_config(ca.as_deref()).map_err(|e| stop(EXIT_USAGE, format!("{e:#}")))?;
    let message = C2dMessage {
        device_id: args.device.clone(),
        message_id: args.message_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        correlation_id: args.correlation_id.clone(),
        body: args.body.clone().into_bytes(),
        properties: args.properties.clone(),
        ack: args.ack,
        ttl: args.ttl.map(Into::into),
    };

    let mut link = Link::open(&dial, &host, tls).await.map_err(|e| stop(EXIT_FAILED, format!("{e:#}")))?;
    let outcome = async {
        let expiry = crate::iot::time::unix_secs(SystemTime::now()) + TOKEN_TTL;
        link.put_token(&host, sign_token(&host, &key, expiry, Some(policy))).await?;
        let t0 = std::time::Instant::now();
        c2d::send(&mut link, &message).await?;
        let sent_ms = t0.elapsed().as_secs_f64() * 1e3;
        let feedback = if args.wait_feedback {
            let wait: Duration = args.feedback_timeout.into();
            Some(c2d::wait_feedback(&mut link, &message.message_id, wait).await)
        } else {
            None
        };
        anyhow::Ok((sent_ms, feedback))
    }
    .await;
    link.close().await;
    let (sent_ms, feedback) = outcome.map_err(|e| stop(EXIT_FAILED, format!("{}: {e:#}", args.device)))?;
    let feedback = match feedback {
        None => None,
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            if args.service.json {
                println!(
                    "{}",
                    json!({"device_id": args.device, "message_id": message.message_id, "sent": true, "feedback": null})
                );
            } else {
                println!("{}: sent message {} in {sent_ms:.1} ms", args.device, message.message_id);
            }
            return Err(stop(EXIT_FAILED, format!("{e:#}")));
        }
    };
    if args.service.json {
        println!(
            "{}",
            json!({"device_id": args.device, "message_id": message.message_id, "sent": true, "send_ms": sent_ms, "feedback": feedback})
        );
    } else {
        println!("{}: sent message {} in {sent_ms:.1} ms", args.device, message.message_id);
        if let Some(r) = &feedback {
            println!("feedback: {} ({}) at {}", r.status_code, r.description, r.enqueued_time_utc);
        }
    }
    Ok(match &feedback {
        Some(r) if r.status_code != "Success" => EXIT_FAILED,
        _ => 0,
    })
}

#[cfg(test)]
mod tests {
    use super::key_value;

    #[test]
    fn properties_are_key_equals_value() {
        assert_eq!(key_value("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(key_value("a=").unwrap(), ("a".into(), String::new()));
        assert!(key_value("=b").is_err());
        assert!(key_value("ab").is_err());
    }
}
