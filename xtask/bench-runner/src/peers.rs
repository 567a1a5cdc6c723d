//! Rows from the Python peers: `xtask/bench_peers.py` writes a JSON file that `cargo xtask
//! bench --peers` passes here with `--peers-json`.

use std::path::Path;

use serde::Deserialize;

use crate::measure::Group;
use crate::report::Measurement;

/// The peers file: rows, or why there are none.
#[derive(Debug, Deserialize)]
struct PeersFile {
    /// Why the peers could not run at all (no venv, no network for pip, ...).
    #[serde(default)]
    unavailable: Option<String>,
    /// Python and library versions, e.g. `CPython 3.11.7, joblib 1.5.2`.
    #[serde(default)]
    versions: String,
    #[serde(default)]
    rows: Vec<Measurement>,
}

/// The peers' rows for the chosen scenarios, or the reason there are none.
pub fn load(path: &Path, scenarios: &[String]) -> Result<(Vec<Measurement>, String), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the peers' results {}: {e}", path.display()))?;
    let file: PeersFile = serde_json::from_str(&text)
        .map_err(|e| format!("the peers' results {} are not valid: {e}", path.display()))?;
    if let Some(why) = file.unavailable {
        return Err(why);
    }
    let rows = file
        .rows
        .into_iter()
        .filter(|m| scenarios.contains(&m.scenario))
        .collect();
    Ok((rows, file.versions))
}

/// When the peers could not run: one row per scenario carrying the reason.
pub fn unavailable_rows(scenarios: &[String], why: &str) -> Vec<Measurement> {
    scenarios
        .iter()
        .map(|scenario| Measurement::unavailable(scenario, "", "Python peers", Group::Peer, why))
        .collect()
}
