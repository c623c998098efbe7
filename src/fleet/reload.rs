//! Reloading the scenarios into a running fleet (SIGHUP). The new set is checked as a whole
//! first; a bad file changes nothing. A good one is applied by difference: identities that
//! disappeared stop (draining their telemetry), new ones start behind the ramp, changed ones
//! restart with their new definition, and the rest keep their connections untouched. Daemon
//! settings (hub, ramp, device knobs) are not reloaded; they need a restart.

use std::collections::HashMap;
use std::time::Duration;

use super::expand::{self, KeyPlan};
use super::{RunningFleet, check_wiring, identity_key, load_key_files, spawn_identity};
use crate::problems::Problems;
use crate::scenario::model::DeviceTemplate;

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
    pub unchanged: usize,
}

impl RunningFleet {
    /// Applies a new set of scenarios. On error nothing has changed.
    pub async fn reload(&mut self, templates: Vec<DeviceTemplate>) -> Result<ReloadSummary, Problems> {
        let files = load_key_files(&templates)?;
        check_wiring(&self.wiring, &templates, &files)?;
        let keys = KeyPlan { group: self.wiring.group.clone(), seed: self.wiring.seed.clone(), files };
        let specs = expand::expand(&templates, self.shard, &keys);
        let mut next: HashMap<String, _> = specs.into_iter().map(|s| (identity_key(&s), s)).collect();

        let mut summary = ReloadSummary::default();
        let mut stopping = Vec::new();
        let current: Vec<String> = self.tasks.keys().cloned().collect();
        for key in current {
            // By value: `Debug` redacts keys, so comparing its text read a changed key as unchanged.
            let same = next.get(&key).is_some_and(|spec| *spec == self.tasks[&key].spec);
            if same {
                next.remove(&key);
                summary.unchanged += 1;
                continue;
            }
            let task = self.tasks.remove(&key).expect("listed above");
            task.cancel.cancel();
            stopping.push(task.handle);
            if next.contains_key(&key) {
                summary.changed += 1;
            } else {
                summary.removed += 1;
            }
        }
        let grace = self.shared.settings.shutdown_grace + Duration::from_secs(5);
        if tokio::time::timeout(grace, futures_util::future::join_all(stopping)).await.is_err() {
            tracing::warn!("some removed identities did not stop within the grace period");
        }
        summary.added = next.len() - summary.changed;
        for spec in next.into_values() {
            let (key, task) = spawn_identity(spec, &self.shared);
            self.tasks.insert(key, task);
        }
        self.total.store(self.tasks.len(), std::sync::atomic::Ordering::Relaxed);
        Ok(summary)
    }
}
