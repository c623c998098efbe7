//! Command-line definitions. Parsing only; each subcommand's work is in its own module.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::config::DEFAULT_CONFIG;
use crate::tools::cleanup::CleanupArgs;
use crate::tools::devices::DevicesArgs;
use crate::tools::invoke::InvokeArgs;
use crate::tools::twin::TwinArgs;

#[derive(Debug, Parser)]
#[command(
    name = "fleetsim",
    version,
    about = "Simulates fleets of Azure IoT devices, and emulates IoT Hub + DPS locally"
)]
pub struct Cli {
    /// Log filter in RUST_LOG syntax (RUST_LOG itself wins when set).
    #[arg(long, global = true, default_value = "info")]
    pub log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// Runtime worker threads (default: one per core). At low message rates one thread per
    /// process costs less CPU per message (no cross-thread wake-ups); shard for more cores.
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a fleet of simulated devices (with the embedded emulator unless configured otherwise).
    Run(RunArgs),
    /// Validate a daemon config and scenario files, reporting every problem; exit 64 if any.
    Check(CheckArgs),
    /// Run the local IoT Hub + DPS emulator.
    Hub(HubArgs),
    /// Print a service SAS token for an emulator (for curl and other HTTP clients).
    Token(TokenArgs),
    /// List devices (or modules) with their connection state, from the emulator or IoT Hub.
    Devices(DevicesArgs),
    /// Show a twin, or patch its desired properties; on many devices at once with a selector.
    Twin(TwinArgs),
    /// Invoke a direct method on one identity, or on many at once (a method storm) with a selector.
    Invoke(InvokeArgs),
    /// CI reports: `report merge` combines the shards of one run into one verdict.
    Report(ReportArgs),
    /// Delete what a fleet created in a real hub or an external emulator: the devices of the
    /// config's templates (modules go with them), individual enrollments and DPS registrations.
    Cleanup(CleanupArgs),
    /// Stream events from a hub's Event Hubs-compatible endpoint (emulator or Azure), filtered,
    /// as text or JSON lines.
    Tail(crate::tools::tail::TailArgs),
    /// Send one cloud-to-device message over AMQP and optionally wait for its feedback.
    C2d(crate::tools::c2d::C2dArgs),
    /// Devices from models: `model import` writes a scenario from DTDL models or an IoT Central
    /// device template export.
    Model(crate::tools::model_import::ModelArgs),
    /// IoT Edge: `edge env DEVICE MODULE` prints the IOTEDGE_* environment that lets module code
    /// built for IoT Edge run against the emulator.
    Edge(crate::tools::edge_env::EdgeArgs),
    /// Print a running fleet's overview (the web console's, from its JSON API): ramp, states,
    /// rates, latency percentiles, reconnects, errors, CI standing.
    Status(crate::console::status::StatusArgs),
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(subcommand)]
    pub command: ReportCommand,
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Merge the CI reports of every shard of one run (JSON files, or pod logs holding them) into
    /// one: counts summed, percentiles from the merged histograms, every check judged again.
    /// Exit 0 if the merged run passes, 1 if it fails, 64 if a report cannot be read.
    Merge(MergeArgs),
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The shard reports.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// Also write the merged report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the merged HTML report here (default: beside `--out`, as `.html`).
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Write the merged verdict as JUnit XML here (default: beside `--out`, as `.junit.xml`).
    #[arg(long)]
    pub junit: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The emulator's hub.json.
    #[arg(long, default_value = crate::tools::DEFAULT_HUB_JSON)]
    pub hub_json: PathBuf,
    /// The shared access policy: iothubowner, service, registryRead, registryReadWrite, device or
    /// provisioningserviceowner.
    #[arg(long, default_value = "iothubowner")]
    pub policy: String,
    /// Lifetime in seconds: 1 to 315,360,000 (ten years).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
    pub ttl: u64,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The daemon config (see config.example.toml).
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Serve metrics here instead of `[metrics] addr` (e.g. one port per shard on one host).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Run only shard `i` of `n` (devices whose ordinal is i mod n), e.g. 0/4. `i` may be a
    /// StatefulSet pod name, whose ordinal is taken: `--shard fleetsim-3/8`.
    #[arg(long, default_value = "0/1")]
    pub shard: String,
    /// CI mode: run this long (e.g. 10m), then print a JSON report and exit 0 (pass) or 1 (fail).
    /// Overrides `[ci] duration`.
    #[arg(long)]
    pub duration: Option<String>,
    /// CI mode: also write the JSON report here. Overrides `[ci] report`.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Serve no web console or console API on the metrics address (`[metrics] console = false`),
    /// for locked-down deployments: only /metrics, /healthz and /readyz stay.
    #[arg(long)]
    pub no_console: bool,
    /// CI mode: write the self-contained HTML report here. Overrides `[ci] html_report`; by
    /// default it goes beside the JSON report (`report.json` -> `report.html`).
    #[arg(long)]
    pub html_report: Option<PathBuf>,
    /// CI mode: write the verdict as JUnit XML here (one test case per check). Overrides
    /// `[ci] junit_report`; by default beside the JSON report (`report.junit.xml`).
    #[arg(long)]
    pub junit_report: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A daemon config to check (its scenarios, keys files and hub settings are checked too).
    /// With no config and no scenario files: config.example.toml, as for `run`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Scenario files to check.
    pub scenarios: Vec<PathBuf>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HubArgs {
    #[command(subcommand)]
    pub action: Option<HubAction>,
    /// A TOML configuration file; flags override what it sets.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the CA, keys and hub.json are kept. Default .fleetsim/hub, where `run` and the
    /// operator commands look too.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The hub's host name; repeat to add names the certificate also covers.
    #[arg(long = "hostname")]
    pub hostnames: Vec<String>,
    /// Device MQTT over TLS (hub and DPS). Default 127.0.0.1:8883.
    #[arg(long)]
    pub mqtt_addr: Option<SocketAddr>,
    /// HTTPS: service API, DPS, MQTT over WebSockets. Default 127.0.0.1:8443.
    #[arg(long)]
    pub https_addr: Option<SocketAddr>,
    /// AMQP 1.0 over TLS (the Event Hubs-compatible endpoint). Default 127.0.0.1:5671.
    #[arg(long)]
    pub amqp_addr: Option<SocketAddr>,
    /// Prometheus endpoint. Default 127.0.0.1:9464.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve no metrics endpoint.
    #[arg(long, conflicts_with = "metrics_addr")]
    pub no_metrics: bool,
    /// Serve no web console or console API on the metrics address (`console = false`).
    #[arg(long)]
    pub no_console: bool,
    /// Keep identities, twins, enrollments and C2D queues in memory only: nothing of them is
    /// written to the data dir, and a restart starts empty (the `in_memory` config key).
    #[arg(long)]
    pub in_memory: bool,
}

/// What `fleetsim hub` does besides serving: move the registry in and out of a stopped hub's
/// store, in IoT Hub's bulk format.
#[derive(Debug, Subcommand)]
pub enum HubAction {
    /// Writes every device and module (keys, status, tags, desired and reported) as the JSON
    /// lines of an IoT Hub ExportDevices job. The hub must be stopped.
    Export(HubExportArgs),
    /// Applies the JSON lines of an IoT Hub export or import file (`importMode` per line,
    /// `createOrUpdate` when absent) to the store. The hub must be stopped. Exit 1 if a line was
    /// refused (the others are applied).
    Import(HubImportArgs),
}

#[derive(Debug, Args)]
pub struct HubExportArgs {
    /// The hub's TOML configuration, if it has one (its data dir and key overrides are used).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The stopped hub's data dir. Default .fleetsim/hub.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Write here instead of standard output.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct HubImportArgs {
    /// The hub's TOML configuration, if it has one.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The stopped hub's data dir. Default .fleetsim/hub.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The JSON lines file (an IoT Hub export blob, `devices.txt`, or an import file).
    pub file: PathBuf,
}
