//! The one validation path. `fleetsim check`, `fleetsim run`, `fleetsim hub` and a SIGHUP reload
//! all accept or refuse a configuration here, so what `check` passes, `run` starts. Every problem
//! of every file is reported at once, located (`file:line:column: field: message`), in file and
//! position order; the caller exits 64 (EX_USAGE) when there is any.
//!
//! What is checked: the daemon config, every scenario file it names (also when the config itself
//! has errors), the embedded emulator's hub TOML, the keys files,
//! and whether the hub settings can serve every template (Azure mode needs `id_scope` for DPS,
//! `group_key` for group enrollments ...). Field validators stay where the fields are read
//! (`config.rs`, `scenario/`, `hub/config.rs`); this module only gathers what they find. An
//! external emulator's hub.json and Azure's endpoints are checked when `run` meets them.

use std::path::{Path, PathBuf};

use crate::config::{DaemonConfig, HubMode};
use crate::fleet::{self, Provides};
use crate::hub::config::HubConfig;
use crate::problems::{Problem, Problems};
use crate::scenario::model::DeviceTemplate;
use crate::scenario::schema;
use crate::tomlread::{io_reason, line_col, locate};

/// A fleet configuration that passed: the daemon config (when one was given) and its templates.
#[derive(Debug)]
pub struct Fleet {
    pub config: Option<DaemonConfig>,
    pub templates: Vec<DeviceTemplate>,
    /// The embedded emulator's configuration, resolved (file, then the `[hub]` addresses).
    pub hub: Option<HubConfig>,
}

/// Checks a daemon config (if any) with its scenarios plus `extra` scenario files.
pub fn fleet(config: Option<&Path>, extra: &[PathBuf]) -> Result<Fleet, Problems> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    let cfg = config.and_then(|path| {
        let (cfg, mut d) = DaemonConfig::read(path);
        problems.append(&mut d);
        cfg
    });
    if let Some(c) = &cfg {
        files.extend(c.scenarios.iter().cloned());
    }
    files.extend(extra.iter().cloned());
    let templates = match schema::load(&files) {
        Ok(t) => t,
        Err(mut e) => {
            problems.append(&mut e.0);
            Vec::new()
        }
    };
    let mut hub = None;
    if let Some(c) = &cfg {
        match &c.hub {
            HubMode::Embedded { data_dir, mqtt_addr, https_addr, hub_config } => {
                match self::hub(hub_config.as_deref(), |h| {
                    h.data_dir = data_dir.clone();
                    h.mqtt_addr = *mqtt_addr;
                    h.https_addr = *https_addr;
                    h.amqp_addr = Some(std::net::SocketAddr::new(mqtt_addr.ip(), 0));
                    // The fleet's own endpoint serves the embedded hub's metrics.
                    h.metrics_addr = None;
                }) {
                    Ok(h) => hub = Some(h),
                    Err(mut e) => problems.append(&mut e.0),
                }
            }
            // An external emulator's hub.json and Azure's endpoints are the world at run time,
            // not configuration: `run` reports them when it meets them.
            HubMode::External { .. } | HubMode::Azure(_) => {}
        }
        if !templates.is_empty() {
            match fleet::load_key_files(&templates) {
                Ok(keys) => problems.extend(fleet::template_problems(Provides::of_config(&c.hub), &templates, &keys)),
                Err(e) => problems.extend(e),
            }
        }
    }
    if problems.is_empty() { Ok(Fleet { config: cfg, templates, hub }) } else { Err(Problems(problems).sorted()) }
}

/// Checks an emulator configuration: the TOML file (if any), then `apply` (command-line flags,
/// the fleet's `[hub]` addresses), then `HubConfig::validate`, whose problems are located in the
/// file by their field paths (a field the file does not set, such as a flag's, is placed at the
/// nearest enclosing table, else at 1:1).
pub fn hub(file: Option<&Path>, apply: impl FnOnce(&mut HubConfig)) -> Result<HubConfig, Problems> {
    let (mut config, text) = match file {
        None => (HubConfig::default(), None),
        Some(path) => {
            let text = crate::fsio::read_text_capped(path, crate::fsio::MAX_INPUT_FILE)
                .map_err(|e| Problem::file(path, format!("cannot read: {}", io_reason(&e))))?;
            match toml::from_str::<HubConfig>(&text) {
                Ok(c) => (c, Some((path, text))),
                Err(e) => {
                    let at = e.span().map_or((1, 1), |s| line_col(&text, s.start));
                    return Err(Problem::at(path.display().to_string(), at, "", e.message().trim()).into());
                }
            }
        }
    };
    apply(&mut config);
    let Err(problems) = config.validate() else { return Ok(config) };
    let located = problems.into_iter().map(|p| match &text {
        Some((path, text)) => {
            let at = locate(text, &p.field).unwrap_or((1, 1));
            Problem { file: path.display().to_string(), line: at.0, column: at.1, ..p }
        }
        None => p,
    });
    Err(Problems(located.collect()).sorted())
}
