//! `fleetsim cleanup`: deletes what a fleet created in a real hub (or an external emulator), so a
//! load test leaves nothing behind: every device of the config's templates (their modules go
//! with them), the individual DPS enrollments the fleet made, and the DPS registration records of
//! every DPS-provisioned device. The identities are the ones the config's templates name, all
//! shards. `--dry-run` only looks and says what would go.
//!
//! Service API routes: `DELETE /devices/{id}` with `If-Match: *` (IoT Hub REST "Delete
//! Identity"); DPS `DELETE /enrollments/{id}` and `DELETE /registrations/{id}`
//! (api-version 2021-10-01). A 404 means already gone and counts as done.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{EXIT_FAILED, EXIT_USAGE, fanout, stop};
use crate::config::HubMode;
use crate::scenario::model::{DeviceTemplate, Provisioning};
use crate::service::{ServiceClient, ServiceError};

const DPS_API: &str = "api-version=2021-10-01";

/// What one identity leaves behind, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Device,
    Enrollment,
    Registration,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Device => "devices",
            Kind::Enrollment => "individual enrollments",
            Kind::Registration => "DPS registrations",
        }
    }

    /// The failure label's prefix: `device_404`, `registration_unreachable` ...
    fn short(self) -> &'static str {
        match self {
            Kind::Device => "device",
            Kind::Enrollment => "enrollment",
            Kind::Registration => "registration",
        }
    }
}

/// Everything the templates name: (kind, id), in template order.
fn leftovers(templates: &[DeviceTemplate]) -> Vec<(Kind, String)> {
    let mut out = Vec::new();
    for t in templates {
        for n in t.first..t.first + t.count {
            let id = t.device_id(n);
            if let Provisioning::Dps { individual, .. } = t.provisioning {
                if individual {
                    out.push((Kind::Enrollment, id.clone()));
                }
                out.push((Kind::Registration, id.clone()));
            }
            out.push((Kind::Device, id));
        }
    }
    out
}

fn path(kind: Kind, id: &str) -> String {
    let id = crate::iot::encoding::url_encode(id);
    match kind {
        Kind::Device => format!("/devices/{id}"),
        Kind::Enrollment => format!("/enrollments/{id}?{DPS_API}"),
        Kind::Registration => format!("/registrations/{id}?{DPS_API}"),
    }
}

pub async fn run(args: CleanupArgs) -> u8 {
    let checked = match crate::validate::fleet(Some(&args.config), &[]) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_USAGE;
        }
    };
    let cfg = checked.config.expect("a config was given");
    let (hub, dps, ca): (Option<String>, Option<String>, Option<PathBuf>) = match &cfg.hub {
        HubMode::Embedded { .. } => {
            println!("nothing to clean up: the embedded emulator keeps its identities in memory, gone when it stops");
            return 0;
        }
        HubMode::External { hub_json } => match crate::hub::info::HubInfo::load(hub_json) {
            Ok(i) => (Some(i.service_connection_string), Some(i.dps_service_connection_string), Some(i.ca_file)),
            Err(e) => return stop(EXIT_USAGE, format!("{e:#}")),
        },
        HubMode::Azure(a) => (
            a.service_connection_string.as_ref().map(|s| s.value.clone()),
            a.dps_service_connection_string.as_ref().map(|s| s.value.clone()),
            a.ca_file.clone(),
        ),
    };
    let client = |cs: &Option<String>| -> Result<Option<ServiceClient>, u8> {
        let Some(cs) = cs else { return Ok(None) };
        let cs: crate::iot::connection_string::ConnectionString =
            cs.parse().map_err(|e| stop(EXIT_USAGE, format!("a service connection string: {e}")))?;
        let tls = crate::client::transport::client_config(ca.as_deref()).map_err(|e| stop(EXIT_USAGE, e))?;
        let http = crate::service::https_client(&tls).map_err(|e| stop(EXIT_USAGE, e))?;
        ServiceClient::new(http, &cs).map(Some).map_err(|e| stop(EXIT_USAGE, e))
    };
    let (hub, dps) = match (client(&hub), client(&dps)) {
        (Ok(h), Ok(d)) => (h, d),
        (Err(c), _) | (_, Err(c)) => return c,
    };
    let mut work = Vec::new();
    let mut skipped = std::collections::BTreeMap::<Kind, usize>::new();
    for (kind, id) in leftovers(&checked.templates) {
        let c = if kind == Kind::Device { &hub } else { &dps };
        match c {
            Some(c) => work.push((kind, id, c)),
            None => *skipped.entry(kind).or_default() += 1,
        }
    }
    for (kind, n) in &skipped {
        let setting =
            if *kind == Kind::Device { "hub.service_connection_string" } else { "hub.dps_service_connection_string" };
        eprintln!("warning: {n} {} left alone: the config has no {setting}", kind.label());
    }
    let found = std::sync::Mutex::new(std::collections::BTreeMap::<Kind, usize>::new());
    // The first error of each failure label, printed with its count: the cause, not only a code.
    let first_error = std::sync::Mutex::new(std::collections::BTreeMap::<String, String>::new());
    let summary = fanout::run(work, args.concurrency, |(kind, id, c)| {
        let (found, first_error) = (&found, &first_error);
        async move {
            let p = path(kind, &id);
            let r = if args.dry_run {
                c.request(reqwest::Method::GET, &p, None, &[]).await
            } else {
                c.request(reqwest::Method::DELETE, &p, None, &[("if-match", "*")]).await
            };
            match r {
                Ok(_) => {
                    *found.lock().unwrap_or_else(|e| e.into_inner()).entry(kind).or_default() += 1;
                    Ok(())
                }
                Err(ServiceError::Status { status: 404, .. }) => Ok(()),
                Err(e) => {
                    tracing::debug!(id = %id, error = %e, "cleanup call failed");
                    let label = match e.status() {
                        0 => format!("{}_unreachable", kind.short()),
                        s => format!("{}_{s}", kind.short()),
                    };
                    first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(label.clone())
                        .or_insert_with(|| format!("{id}: {e}"));
                    Err(label)
                }
            }
        }
    })
    .await;
    let found = found.into_inner().unwrap_or_else(|e| e.into_inner());
    let first_error = first_error.into_inner().unwrap_or_else(|e| e.into_inner());
    let count = |k: Kind| found.get(&k).copied().unwrap_or(0);
    let verb = if args.dry_run { "would delete" } else { "deleted" };
    let modules: u64 = checked.templates.iter().map(|t| t.count * t.modules.len() as u64).sum();
    if args.json {
        println!(
            "{}",
            json!({
                "dry_run": args.dry_run,
                "devices": count(Kind::Device),
                "enrollments": count(Kind::Enrollment),
                "registrations": count(Kind::Registration),
                "skipped": skipped.iter().map(|(k, n)| (k.label().to_owned(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "failed": summary.failed(),
                "failures": summary.failures,
                "first_errors": first_error,
            })
        );
    } else {
        println!(
            "{verb} {} devices{}, {} individual enrollments, {} DPS registrations ({} of {} calls failed)",
            count(Kind::Device),
            if modules > 0 { " (their modules with them)" } else { "" },
            count(Kind::Enrollment),
            count(Kind::Registration),
            summary.failed(),
            summary.calls
        );
        for (label, n) in &summary.failures {
            println!("  {label}: {n} (first: {})", first_error.get(label).map_or("", String::as_str));
        }
    }
    if summary.failed() == 0 { 0 } else { EXIT_FAILED }
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// The daemon config whose fleet to remove (all shards).
    #[arg(long, default_value = crate::config::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Only look, and say what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_a_template_leaves_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.toml");
        std::fs::write(
            &f,
            "[[devices]]\nid = \"g-{n}\"\ncount = 2\n[[devices]]\nid = \"i-{n}\"\nenrollment = \"individual\"\n[[devices]]\nid = \"c-{n}\"\nprovisioning = \"connection_string\"\n",
        )
        .unwrap();
        let t = crate::scenario::schema::load(&[f]).unwrap();
        let all = leftovers(&t);
        let l: Vec<(Kind, &str)> = all.iter().map(|(k, i)| (*k, i.as_str())).collect();
        assert_eq!(
            l,
            [
                (Kind::Registration, "g-1"),
                (Kind::Device, "g-1"),
                (Kind::Registration, "g-2"),
                (Kind::Device, "g-2"),
                (Kind::Enrollment, "i-1"),
                (Kind::Registration, "i-1"),
                (Kind::Device, "i-1"),
                (Kind::Device, "c-1"),
            ]
        );
        assert_eq!(path(Kind::Registration, "g-1"), "/registrations/g-1?api-version=2021-10-01");
    }
}
