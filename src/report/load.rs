//! Reading experiment result files from run directories.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::runner::result::{ExperimentResult, SCHEMA_VERSION};

/// One experiment result file as read.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The file it came from.
    pub path: PathBuf,
    /// Unique name in the report: the experiment name, prefixed with its run
    /// directory's name when several run directories hold that experiment.
    pub label: String,
    pub result: ExperimentResult,
}

/// Whether a file in a run directory may hold an experiment result:
/// `*.json`, except `run.json`.
fn is_candidate(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "json")
        && path.file_name().is_some_and(|n| n != "run.json")
}

/// Parses one result file. `Ok(None)` for JSON that is not an experiment
/// result (no `schema_version` and `experiment` keys); an error naming the file
/// for unreadable files, invalid JSON, another schema version or a malformed
/// result.
pub fn parse_result(path: &Path, text: &str) -> Result<Option<ExperimentResult>> {
    let value: serde_json::Value = serde_json::from_str(text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let Some(obj) = value.as_object() else {
        return Ok(None);
    };
    let Some(version) = obj.get("schema_version") else {
        return Ok(None);
    };
    if !obj.contains_key("experiment") {
        return Ok(None);
    }
    if version.as_u64() != Some(SCHEMA_VERSION as u64) {
        bail!(
            "{}: result schema version {version} is not supported; this quantbench reads version {SCHEMA_VERSION}",
            path.display()
        );
    }
    let result: ExperimentResult = serde_json::from_value(value).with_context(|| {
        format!(
            "{}: malformed experiment result (schema version {SCHEMA_VERSION})",
            path.display()
        )
    })?;
    Ok(Some(result))
}

/// Reads the experiment results directly inside `dir` (not recursively),
/// sorted by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<(PathBuf, ExperimentResult)>> {
    if !dir.is_dir() {
        bail!("{}: not a run directory", dir.display());
    }
    let mut paths = vec![];
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?
    {
        let path = entry
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .path();
        if path.is_file() && is_candidate(&path) {
            paths.push(path);
        }
    }
    paths.sort();
    let mut out = vec![];
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        match parse_result(&path, &text)? {
            Some(r) => out.push((path, r)),
            None => tracing::warn!("{}: not an experiment result, skipped", path.display()),
        }
    }
    Ok(out)
}

/// Reads every run directory and gives each result a unique label. An error
/// when no directory holds any result.
pub fn load_runs(dirs: &[PathBuf]) -> Result<Vec<Loaded>> {
    let mut all = vec![];
    for dir in dirs {
        let found = load_dir(dir)?;
        all.extend(found.into_iter().map(|(path, r)| (dir.clone(), path, r)));
    }
    if all.is_empty() {
        let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        bail!("no experiment results (*.json) in {}", names.join(", "));
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (_, _, r) in &all {
        *count.entry(r.experiment.as_str()).or_default() += 1;
    }
    let labels: Vec<String> = all
        .iter()
        .map(|(dir, _, r)| {
            if count[r.experiment.as_str()] > 1 {
                format!("{}/{}", dir_name(dir), r.experiment)
            } else {
                r.experiment.clone()
            }
        })
        .collect();
    Ok(all
        .into_iter()
        .zip(labels)
        .map(|((_, path, result), label)| Loaded {
            path,
            label,
            result,
        })
        .collect())
}

/// The last component of a directory path (`.` resolved to the current
/// directory's name).
fn dir_name(dir: &Path) -> String {
    let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    abs.components()
        .rfind(|c| !matches!(c, std::path::Component::CurDir))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_versions_are_refused_by_name() {
        let p = Path::new("runs/a/nf4.json");
        let err = parse_result(p, r#"{"schema_version": 2, "experiment": "nf4"}"#).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("runs/a/nf4.json") && msg.contains("version 2"),
            "{msg}"
        );
    }

    #[test]
    fn non_results_are_skipped_and_garbage_is_an_error() {
        let p = Path::new("x.json");
        assert!(parse_result(p, r#"{"note": 1}"#).unwrap().is_none());
        assert!(parse_result(p, "[1, 2]").unwrap().is_none());
        let err = parse_result(p, "{oops").unwrap_err();
        assert!(format!("{err:#}").contains("x.json: not valid JSON"));
        let err = parse_result(p, r#"{"schema_version": 1, "experiment": 3}"#).unwrap_err();
        assert!(format!("{err:#}").contains("x.json: malformed"));
    }

    #[test]
    fn candidates() {
        assert!(is_candidate(Path::new("d/nf4.json")));
        assert!(!is_candidate(Path::new("d/run.json")));
        assert!(!is_candidate(Path::new("d/nf4.json.tmp")));
        assert!(!is_candidate(Path::new("d/nf4.coqa.jsonl")));
    }
}
