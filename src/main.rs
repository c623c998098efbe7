//! The `fleetsim` binary: parse the command line, set up logging and TLS, run a subcommand.
//! Exit status 64 means the configuration was refused before anything started.

use std::process::ExitCode;

use clap::Parser;
use fleetsim::cli::{Cli, Command};
use fleetsim::hub;
use fleetsim::hub::config::HubConfig;
use tracing_subscriber::EnvFilter;

/// EX_USAGE from sysexits.h: bad configuration or arguments.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    // Several crates could pull in a crypto provider; pick one explicitly before any TLS use.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    fleetsim::sys::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        match cli.command {
            Command::Hub(args) => run_hub(args).await,
        }
    })
}

fn init_logging(cli: &Cli) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cli.log));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cli.log_json { builder.json().init() } else { builder.init() }
}

async fn run_hub(args: fleetsim::cli::HubArgs) -> ExitCode {
    let mut config = match &args.config {
        Some(p) => match HubConfig::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => HubConfig::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some((first, rest)) = args.hostnames.split_first() {
        config.hostname = first.clone();
        config.extra_hostnames.extend(rest.iter().cloned());
    }
    if let Some(a) = args.mqtt_addr {
        config.mqtt_addr = a;
    }
    if let Some(a) = args.https_addr {
        config.https_addr = a;
    }
    if let Some(a) = args.metrics_addr {
        config.metrics_addr = Some(a);
    }
    if args.no_metrics {
        config.metrics_addr = None;
    }
    if let Err(e) = config.validate() {
        eprintln!("error: invalid configuration:\n{e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let running = match hub::start(config).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("fleetsim hub ready: {}", running.info_path.display());
    println!("  mqtt  {}  (hub and DPS, TLS)", running.info.mqtt_addr);
    println!("  https {}  (service API, DPS, {})", running.info.https_addr, running.info.websocket_url);
    if let Some(m) = &running.info.metrics_url {
        println!("  metrics {m}");
    }
    fleetsim::sys::shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    ExitCode::SUCCESS
}
