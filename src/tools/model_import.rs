//! `fleetsim model import`: writes an editable scenario from DTDL models or an IoT Central device
//! template export: one `[[devices]]` template per model, its behaviour exactly what a template
//! naming the model would run (`scenario::models` writes both), with a comment on every choice.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::scenario::models::{self, Source, Tuning};

#[derive(Debug, Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a scenario TOML from models: DTMIs (found in --model-dir by the device models
    /// repository layout) or model files (one interface, an expanded model, or an IoT Central
    /// device template export). Exit 64 if a model has problems (all are listed).
    Import(ImportArgs),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// DTMIs (`dtmi:com:example:Thermostat;1`) or model files.
    #[arg(required = true)]
    pub models: Vec<String>,
    /// The model directory (repository layout: `dtmi/com/example/thermostat-1.json`).
    #[arg(long, default_value = "models")]
    pub model_dir: PathBuf,
    /// Devices per template.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub count: u64,
    /// Write the scenario here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The scenario text for `args`, or every problem.
pub fn scenario(args: &ImportArgs) -> Result<String, crate::problems::Problems> {
    let mut out = String::from(
        "# Written by `fleetsim model import`: every choice below is the model's or says why it was\n\
         # made. Edit freely; `fleetsim check` validates it.\n",
    );
    let mut problems = Vec::new();
    for (i, m) in args.models.iter().enumerate() {
        let source = if m.starts_with("dtmi:") {
            Source::Dtmi { id: m.clone(), dir: args.model_dir.clone() }
        } else {
            Source::File { path: PathBuf::from(m), dir: args.model_dir.clone() }
        };
        let model = match models::load(&source) {
            Ok(model) => model,
            Err(p) => {
                problems.extend(p);
                continue;
            }
        };
        match models::behaviour_toml(&model, "devices.", &Tuning::default()) {
            Ok((body, _)) => {
                let name = template_name(model.id(), i);
                out.push_str(&format!(
                    "\n[[devices]]\nname = {name:?}\ncount = {}\nid = \"{name}-{{n:04}}\"\nmodel_id = {:?}\nprovisioning = \"dps\"\n{body}",
                    args.count,
                    model.id()
                ));
            }
            Err(p) => problems.extend(p),
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(crate::problems::Problems(problems)) }
}

/// A template name from a DTMI's last segment: `dtmi:com:example:Thermostat;1` → `thermostat`.
fn template_name(dtmi: &str, index: usize) -> String {
    let last = dtmi.split(';').next().and_then(|p| p.rsplit(':').next()).unwrap_or_default();
    let name: String = last
        .chars()
        .flat_map(|c| if c.is_ascii_uppercase() { vec!['-', c.to_ascii_lowercase()] } else { vec![c] })
        .collect::<String>()
        .trim_start_matches('-')
        .replace('_', "-");
    if name.is_empty() { format!("model-{index}") } else { name }
}

/// Runs the command: 0, or 64 with every problem on standard error.
pub fn run(args: ModelArgs) -> u8 {
    let ModelCommand::Import(args) = args.command;
    match scenario(&args) {
        Ok(text) => match &args.out {
            Some(path) => match crate::fsio::write_atomic(path, text.as_bytes(), 0o644) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: cannot write {}: {e}", path.display());
                    1
                }
            },
            None => {
                print!("{text}");
                0
            }
        },
        Err(problems) => {
            eprintln!("{}", problems.sorted());
            64
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn template_names_come_from_the_dtmi() {
        assert_eq!(super::template_name("dtmi:com:example:TemperatureController;2", 0), "temperature-controller");
        assert_eq!(super::template_name("dtmi:a:b_c;1", 0), "b-c");
    }
}
