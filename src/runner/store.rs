//! A run directory: `run.json` plus one `<experiment>.json` per finished
//! experiment, written atomically (temporary file, then rename), so an
//! interrupted run never leaves a half-written result and a rerun resumes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::result::{ExperimentResult, SCHEMA_VERSION, Status};

/// Contents of `run.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub schema_version: u32,
    pub created_at: String,
    /// The command line that created the run.
    pub command: String,
    pub tool_version: String,
    pub git_commit: Option<String>,
}

/// An open run directory.
#[derive(Clone, Debug)]
pub struct RunStore {
    dir: PathBuf,
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot move into place", path.display()))
}

impl RunStore {
    /// Opens `dir`, creating it and its run.json when new. A run.json of
    /// another schema version is refused and left untouched.
    pub fn open(dir: &Path, command: &str) -> Result<RunStore> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create run directory", dir.display()))?;
        let info_path = dir.join("run.json");
        if info_path.exists() {
            let text = std::fs::read_to_string(&info_path)
                .with_context(|| format!("{}: cannot read", info_path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: not valid JSON; move the directory aside or pick another --run-dir",
                    info_path.display()
                )
            })?;
            let found = v.get("schema_version").and_then(|s| s.as_u64());
            if found != Some(SCHEMA_VERSION as u64) {
                bail!(
                    "{}: results use schema version {} but this quantbench writes version {SCHEMA_VERSION}; refusing to mix them. Use another --run-dir (the old results are left untouched).",
                    info_path.display(),
                    found.map_or("unknown".to_string(), |f| f.to_string())
                );
            }
        } else {
            let info = RunInfo {
                schema_version: SCHEMA_VERSION,
                created_at: chrono::Utc::now().to_rfc3339(),
                command: command.to_string(),
                tool_version: env!("CARGO_PKG_VERSION").to_string(),
                git_commit: super::provenance::git_commit(),
            };
            write_atomic(&info_path, serde_json::to_string_pretty(&info)?.as_bytes())?;
        }
        Ok(RunStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Result file of an experiment.
    pub fn result_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Per-example CoQA records of an experiment (appended as examples finish).
    pub fn records_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.coqa.jsonl"))
    }

    /// The saved result of `name`, if any.
    pub fn load(&self, name: &str) -> Result<Option<ExperimentResult>> {
        let path = self.result_path(name);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let r: ExperimentResult = serde_json::from_str(&text).with_context(|| {
            format!("{}: not a quantbench result (schema {SCHEMA_VERSION}); move it aside to rerun the experiment", path.display())
        })?;
        Ok(Some(r))
    }

    /// Whether `name` finished successfully with exactly `config`. A finished
    /// result with a different config is an error, never overwritten.
    pub fn is_done(&self, name: &str, config: &serde_json::Value) -> Result<bool> {
        match self.load(name)? {
            Some(r) if r.status == Status::Ok => {
                if &r.config != config {
                    bail!(
                        "{}: experiment '{name}' already finished with different settings; use another --run-dir or delete that file to rerun it",
                        self.result_path(name).display()
                    );
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Saves a result atomically.
    pub fn save(&self, r: &ExperimentResult) -> Result<()> {
        write_atomic(
            &self.result_path(&r.experiment),
            serde_json::to_string_pretty(r)?.as_bytes(),
        )
    }
}
