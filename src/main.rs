//! The `fleetsim` binary: parse the command line, set up logging and TLS, run a subcommand.
//! Exit status 64 means the configuration was refused before anything started.

use std::process::ExitCode;

use clap::Parser;
use fleetsim::cli::{CheckArgs, Cli, Command, RunArgs, TokenArgs};
use fleetsim::config::{DaemonConfig, HubMode};
use fleetsim::fleet::{self, StartError, expand::Shard};
use fleetsim::hub;
use fleetsim::problems::{Problem, Problems};
use tracing_subscriber::EnvFilter;

/// mimalloc keeps size classes apart, so what a connection ramp frees is reused or returned
/// instead of fragmenting the heap: glibc held 15 KiB free per device after a 10k ramp, beside
/// 12.7 KiB in use (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EX_USAGE from sysexits.h: bad configuration or arguments.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    // Several crates could pull in a crypto provider; pick one explicitly before any TLS use.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    fleetsim::sys::raise_fd_limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        builder.worker_threads(usize::from(n));
    }
    let runtime = builder.enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run_fleet(args).await,
            Command::Check(args) => check(args),
            Command::Hub(args) => match args.action {
                Some(action) => hub_file(action),
                None => run_hub(args).await,
            },
            Command::Token(args) => token(args),
            Command::Devices(args) => ExitCode::from(fleetsim::tools::devices::run(args).await),
            Command::Twin(args) => ExitCode::from(fleetsim::tools::twin::run(args).await),
            Command::Invoke(args) => ExitCode::from(fleetsim::tools::invoke::run(args).await),
            Command::Report(args) => report(args),
            Command::Tail(args) => ExitCode::from(fleetsim::tools::tail::run(args).await),
            Command::C2d(args) => ExitCode::from(fleetsim::tools::c2d::run(args).await),
            Command::Cleanup(args) => ExitCode::from(fleetsim::tools::cleanup::run(args).await),
            Command::Model(args) => ExitCode::from(fleetsim::tools::model_import::run(args)),
            Command::Edge(args) => ExitCode::from(fleetsim::tools::edge_env::run(args).await),
            Command::Status(args) => ExitCode::from(fleetsim::console::status::run(args).await),
        }
    })
}

fn init_logging(cli: &Cli) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cli.log));
    // Colour only a terminal: a log file or a pipe gets plain text (NO_COLOR also turns it off).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    if cli.log_json { builder.json().init() } else { builder.init() }
}

/// `fleetsim hub export` and `fleetsim hub import`, on a stopped hub's data dir.
fn hub_file(action: fleetsim::cli::HubAction) -> ExitCode {
    use fleetsim::cli::HubAction;
    let (config, data_dir) = match &action {
        HubAction::Export(a) => (a.config.as_deref(), a.data_dir.clone()),
        HubAction::Import(a) => (a.config.as_deref(), a.data_dir.clone()),
    };
    let config = match fleetsim::validate::hub(config, |c| {
        if let Some(d) = data_dir {
            c.data_dir = d;
        }
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = match action {
        HubAction::Export(a) => {
            let written = match &a.out {
                Some(path) => std::fs::File::create(path)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
                    .and_then(|f| {
                        let mut w = std::io::BufWriter::new(f);
                        let n = hub::registry_io::export_data_dir(&config, &mut w)?;
                        std::io::Write::flush(&mut w)?;
                        Ok(n)
                    }),
                None => {
                    let mut w = std::io::BufWriter::new(std::io::stdout().lock());
                    hub::registry_io::export_data_dir(&config, &mut w)
                        .and_then(|n| std::io::Write::flush(&mut w).map(|_| n).map_err(Into::into))
                }
            };
            written.map(|n| {
                eprintln!("exported {n} identities");
                true
            })
        }
        HubAction::Import(a) => fleetsim::fsio::read_capped(&a.file, IMPORT_MAX_BYTES)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.file.display()))
            .and_then(|bytes| {
                let text =
                    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{} is not UTF-8", a.file.display()))?;
                let report = hub::registry_io::import_data_dir(&config, &text)?;
                for e in &report.errors {
                    eprintln!("refused: {e}");
                }
                eprintln!("imported {} lines, refused {}", report.applied, report.errors.len());
                Ok(report.errors.is_empty())
            }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The largest import file read (1 GiB: a million identities with twins of about 1 KB).
const IMPORT_MAX_BYTES: u64 = 1 << 30;

async fn run_hub(args: fleetsim::cli::HubArgs) -> ExitCode {
    let resolved = fleetsim::validate::hub(args.config.as_deref(), |config| {
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
        if let Some(a) = args.amqp_addr {
            config.amqp_addr = Some(a);
        }
        if let Some(a) = args.metrics_addr {
            config.metrics_addr = Some(a);
        }
        if args.no_metrics {
            config.metrics_addr = None;
        }
        if args.no_console {
            config.console = false;
        }
        if args.in_memory {
            config.in_memory = true;
        }
    });
    let config = match resolved {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let console_on = config.console && config.metrics_addr.is_some();
    let console: Option<hub::MetricsRoutes> = config.console.then(|| Box::new(fleetsim::console::for_hub) as _);
    let running = match hub::start_with(config, console).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("fleetsim hub ready: {}", running.info_path.display());
    if running.state.store.is_durable() {
        println!("  store {}", running.info_path.with_file_name(fleetsim::hub::store::FILE).display());
    } else {
        println!("  store in memory (nothing is kept after the hub stops)");
    }
    println!("  mqtt  {}  (hub and DPS, TLS)", running.info.mqtt_addr);
    println!("  https {}  (service API, DPS, {})", running.info.https_addr, running.info.websocket_url);
    if let Some(a) = running.info.amqp_addr {
        println!("  amqp  {a}  (Event Hubs-compatible endpoint `{}`, TLS)", running.info.eventhub_name);
    }
    if let Some(m) = &running.info.metrics_url {
        println!("  metrics {m}");
        if console_on {
            let a = m.trim_end_matches("/metrics");
            println!(
                "  console {a}/  (JSON API under /api/v1/; `fleetsim status --addr {}`)",
                a.trim_start_matches("http://")
            );
        }
    }
    fleetsim::sys::shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

fn check(args: CheckArgs) -> ExitCode {
    // Like `run`, no arguments at all means the example config.
    let config = match (&args.config, args.scenarios.is_empty()) {
        (Some(c), _) => Some(c.clone()),
        (None, true) => Some(std::path::PathBuf::from(fleetsim::cli::DEFAULT_CONFIG)),
        (None, false) => None,
    };
    match fleetsim::validate::fleet(config.as_deref(), &args.scenarios) {
        Ok(checked) => {
            let templates = &checked.templates;
            let devices: u64 = templates.iter().map(|t| t.count).sum();
            let modules: u64 = templates.iter().map(|t| t.count * t.modules.len() as u64).sum();
            println!("ok: {} templates, {devices} devices, {modules} modules", templates.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn run_fleet(args: RunArgs) -> ExitCode {
    let shard: Shard = match args.shard.parse() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", Problem::field("--shard", e.to_string()));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (mut cfg, templates) = match fleetsim::validate::fleet(Some(&args.config), &[]) {
        Ok(fleetsim::validate::Fleet { config: Some(c), templates, .. }) => (c, templates),
        Ok(_) => unreachable!("a config was given"),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(a) = args.metrics_addr {
        cfg.metrics_addr = Some(a);
    }
    if args.no_console {
        cfg.console = false;
    }
    if args.duration.is_some() || args.report.is_some() || args.html_report.is_some() || args.junit_report.is_some() {
        let ci = cfg.ci.get_or_insert_with(Default::default);
        if let Some(d) = &args.duration {
            let max = fleetsim::tomlread::MAX_DURATION;
            match fleetsim::tomlread::parse_duration(d).filter(|d| !d.is_zero() && *d <= max) {
                Some(d) => ci.duration = d,
                None => {
                    let p = Problem::field(
                        "--duration",
                        format!("\"{d}\" is not a duration from 1s to 365d such as 90s, 10m or 1h"),
                    );
                    eprintln!("error: {p}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
        if let Some(r) = &args.report {
            ci.report = Some(r.clone());
        }
        if let Some(r) = &args.html_report {
            ci.html_report = fleetsim::config::ci::ReportFile::At(r.clone());
        }
        if let Some(r) = &args.junit_report {
            ci.junit_report = fleetsim::config::ci::ReportFile::At(r.clone());
        }
    }
    let mut running = match fleet::start(&cfg, templates, shard).await {
        Ok(r) => r,
        Err(StartError::Usage(problems)) => {
            eprintln!("{problems}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(StartError::Runtime(e)) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("fleetsim: {} identities (shard {}/{})", running.identities(), shard.index, shard.count);
    println!("  target:       {}", fleet::describe_target(&cfg.hub, running.hub_info.as_ref()));
    if let (Some(info), HubMode::Embedded { .. }) = (&running.hub_info, &cfg.hub) {
        println!("  embedded hub: {}", info.mqtt_addr);
        println!(
            "  hub.json:     {}",
            running.hub.as_ref().map(|h| h.info_path.display().to_string()).unwrap_or_default()
        );
        println!("  service API:  https://{}  (credentials in hub.json)", info.https_addr);
    }
    if let Some(a) = running.metrics_addr {
        // Before the metrics line, which launchers read up to (and then may close stdout).
        if cfg.console {
            println!("  console:      http://{a}/  (JSON API under /api/v1/; `fleetsim status --addr {a}`)");
        }
        println!("  metrics:      http://{a}/metrics  (health: /healthz, /readyz)");
    }
    if let Some(ci) = &cfg.ci {
        return run_ci(running, ci).await;
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("a SIGHUP handler");
    let stop = fleetsim::sys::shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = hangup.recv() => reload(&args.config, &cfg, &mut running).await,
        }
    }
    tracing::info!("shutting down: draining in-flight telemetry");
    let m = running.shared.metrics.clone();
    running.shutdown().await;
    tracing::info!(
        acked = m.telemetry_acked.get(),
        never_sent = m.dropped("shutdown"),
        unacked = m.dropped("unacked_at_shutdown"),
        buffer_full = m.dropped("buffer_full"),
        "stopped: every identity drained and disconnected"
    );
    ExitCode::SUCCESS
}

/// SIGHUP: re-reads the config's scenarios and applies them; any problem is logged with its
/// position and the running fleet is left exactly as it was.
async fn reload(config: &std::path::Path, started_with: &DaemonConfig, running: &mut fleet::RunningFleet) {
    tracing::info!(config = %config.display(), "reloading scenarios");
    let refuse = |problems: Problems| {
        for p in problems.iter() {
            tracing::error!(problem = %p, "reload refused");
        }
        tracing::warn!(problems = problems.len(), "reload refused: the fleet keeps its previous scenarios");
    };
    // Read on a blocking thread: should any input still reach a panic in the loaders, it ends
    // that thread, not the daemon (the JoinError is reported as a refusal). The same validation
    // as `check` and `run`.
    let path = config.to_owned();
    let loaded = tokio::task::spawn_blocking(move || fleetsim::validate::fleet(Some(&path), &[])).await;
    let (cfg, templates) = match loaded {
        Ok(Ok(fleetsim::validate::Fleet { config: Some(c), templates, .. })) => (c, templates),
        Ok(Ok(_)) => return refuse(Problem::file(config, "no configuration was read").into()),
        Ok(Err(problems)) => return refuse(problems),
        Err(e) => {
            return refuse(Problem::file(config, format!("reading the scenarios failed unexpectedly: {e}")).into());
        }
    };
    // By value: `Debug` redacts secrets, so a changed group key would read as unchanged.
    let daemon_part = |c: &DaemonConfig| (c.hub.clone(), c.ramp.clone(), c.settings.clone(), c.metrics_addr);
    if daemon_part(&cfg) != daemon_part(started_with) {
        tracing::warn!("changes to [hub], [ramp], [metrics] or [device] take effect only after a restart");
    }
    match running.reload(templates).await {
        Ok(s) => tracing::info!(
            added = s.added,
            removed = s.removed,
            changed = s.changed,
            unchanged = s.unchanged,
            identities = running.identities(),
            "reloaded"
        ),
        Err(problems) => refuse(problems),
    }
}

/// CI mode: the report on stdout (and in a file), the verdict in the exit status.
async fn run_ci(running: fleet::RunningFleet, ci: &fleetsim::config::ci::CiConfig) -> ExitCode {
    tracing::info!(secs = ci.duration.as_secs_f64(), "CI mode: running, then judging");
    let outcome = fleet::ci::run(running, ci, fleetsim::sys::shutdown_signal()).await;
    let text = serde_json::to_string_pretty(&outcome.report).expect("a JSON value serializes");
    println!("{text}");
    if let Some(path) = &ci.report
        && let Err(e) = fleetsim::fsio::write_atomic(path, format!("{text}\n").as_bytes(), 0o644)
    {
        eprintln!("error: cannot write the report to {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    if !write_views(&outcome.report, ci.report.as_deref(), &ci.html_report, &ci.junit_report) {
        return ExitCode::FAILURE;
    }
    eprintln!("fleetsim: {}", if outcome.pass { "PASS" } else { "FAIL" });
    if outcome.pass { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Writes the HTML report and the JUnit XML where asked (by default beside the JSON report), and
/// says where on stderr. False if one cannot be written.
fn write_views(
    report: &serde_json::Value,
    json: Option<&std::path::Path>,
    html: &fleetsim::config::ci::ReportFile,
    junit: &fleetsim::config::ci::ReportFile,
) -> bool {
    let views = [
        (html.path(json, "html"), "HTML report", fleet::html::render as fn(&serde_json::Value) -> String),
        (junit.path(json, "junit.xml"), "JUnit XML", fleet::junit::render),
    ];
    for (path, what, render) in views {
        let Some(path) = path else { continue };
        if let Err(e) = fleetsim::fsio::write_atomic(&path, render(report).as_bytes(), 0o644) {
            eprintln!("error: cannot write the {what} to {}: {e}", path.display());
            return false;
        }
        eprintln!("fleetsim: {what}: {}", path.display());
    }
    true
}

/// Signs a policy token with the key the emulator keeps beside its hub.json.
fn token(args: TokenArgs) -> ExitCode {
    let result = (|| -> anyhow::Result<String> {
        let info = fleetsim::hub::info::HubInfo::load(&args.hub_json)?;
        let keys_path = args.hub_json.with_file_name("keys.json");
        let keys: serde_json::Value = serde_json::from_slice(
            &fleetsim::fsio::read_capped(&keys_path, fleetsim::fsio::MAX_INPUT_FILE)
                .map_err(|e| anyhow::anyhow!("{}: {e}", keys_path.display()))?,
        )?;
        let key = keys["policies"][&args.policy]["primary"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no policy named {}", args.policy))?;
        let key =
            fleetsim::iot::sas::Key::from_base64(key).map_err(|e| anyhow::anyhow!("{}: {e}", keys_path.display()))?;
        let expiry = fleetsim::iot::time::unix_secs(std::time::SystemTime::now()).saturating_add(args.ttl);
        Ok(fleetsim::iot::sas::sign_token(&info.hostname, &key, expiry, Some(&args.policy)))
    })();
    match result {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `fleetsim report merge`: one verdict for a sharded run.
fn report(args: fleetsim::cli::ReportArgs) -> ExitCode {
    let fleetsim::cli::ReportCommand::Merge(args) = args.command;
    let mut shards = Vec::new();
    for path in &args.reports {
        let found = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read: {}", fleetsim::tomlread::io_reason(&e)))
            .and_then(|t| fleet::report::find_report(&t).ok_or_else(|| "holds no fleetsim CI report".to_owned()));
        match found {
            Ok(r) => shards.push(r),
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let merged = match fleet::report::merge(&shards) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let text = serde_json::to_string_pretty(&merged).expect("a JSON value serializes");
    println!("{text}");
    if let Some(out) = &args.out
        && let Err(e) = std::fs::write(out, format!("{text}\n"))
    {
        eprintln!("error: cannot write {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    let at = |p: &Option<std::path::PathBuf>| {
        p.clone().map_or(fleetsim::config::ci::ReportFile::Beside, fleetsim::config::ci::ReportFile::At)
    };
    if !write_views(&merged, args.out.as_deref(), &at(&args.html), &at(&args.junit)) {
        return ExitCode::FAILURE;
    }
    let pass = merged["pass"] == true;
    eprintln!("fleetsim: {} ({} shards)", if pass { "PASS" } else { "FAIL" }, shards.len());
    if pass { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
