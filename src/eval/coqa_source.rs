//! Where CoQA documents come from: the bundled fixture, a local file, or the
//! Hugging Face hub (`EleutherAI/coqa`, the dataset lm-eval's task uses).

use std::fmt;
use std::path::PathBuf;

use anyhow::{Result, anyhow};

use super::coqa_data::{CoqaDoc, fixture, load_file};

/// The hub dataset lm-eval's `coqa` task reads.
pub const HF_DATASET: &str = "EleutherAI/coqa";
/// Its validation split (the 500 dev stories).
pub const HF_VALIDATION_FILE: &str = "coqa_validation.parquet";

/// A CoQA data source, parsed from `--data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoqaSource {
    /// `data/coqa-fixture.json`, built into the binary.
    Fixture,
    /// A local official JSON, HF-layout JSON/JSONL or parquet file.
    File(PathBuf),
    /// A file of a hub dataset, downloaded (or taken from the HF cache).
    Hub { repo: String, file: String },
}

impl CoqaSource {
    /// `fixture`; `hf` (= `hf:EleutherAI/coqa`); `hf:OWNER/NAME` (its
    /// `coqa_validation.parquet`); `hf:OWNER/NAME/FILE`; anything else is a path.
    pub fn parse(spec: &str) -> CoqaSource {
        if spec == "fixture" {
            return CoqaSource::Fixture;
        }
        let hub = match spec.strip_prefix("hf:") {
            Some(rest) => rest,
            None if spec == "hf" => HF_DATASET,
            None => return CoqaSource::File(PathBuf::from(spec)),
        };
        let mut parts = hub.splitn(3, '/');
        let (owner, name, file) = (parts.next(), parts.next(), parts.next());
        match (owner, name) {
            (Some(o), Some(n)) if !o.is_empty() && !n.is_empty() => CoqaSource::Hub {
                repo: format!("{o}/{n}"),
                file: file.unwrap_or(HF_VALIDATION_FILE).to_string(),
            },
            _ => CoqaSource::Hub {
                repo: hub.to_string(),
                file: HF_VALIDATION_FILE.to_string(),
            },
        }
    }

    /// Reads the documents, downloading first for a hub source.
    pub fn load(&self) -> Result<Vec<CoqaDoc>> {
        match self {
            CoqaSource::Fixture => fixture(),
            CoqaSource::File(p) => load_file(p),
            CoqaSource::Hub { repo, file } => load_file(&download(repo, file)?),
        }
    }
}

impl fmt::Display for CoqaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoqaSource::Fixture => f.write_str("fixture (data/coqa-fixture.json)"),
            CoqaSource::File(p) => write!(f, "{}", p.display()),
            CoqaSource::Hub { repo, file } => write!(f, "hf:{repo}/{file}"),
        }
    }
}

/// Path of `file` of hub dataset `repo`: from the HF cache (`HF_HOME`) when
/// there, else downloaded into it (honouring `HF_ENDPOINT`).
pub fn download(repo: &str, file: &str) -> Result<PathBuf> {
    fetch(
        repo,
        file,
        hf_hub::Cache::from_env(),
        std::env::var("HF_ENDPOINT").ok(),
    )
}

fn fetch(
    repo: &str,
    file: &str,
    cache: hf_hub::Cache,
    endpoint: Option<String>,
) -> Result<PathBuf> {
    if let Some(p) = cache.dataset(repo.to_string()).get(file) {
        return Ok(p);
    }
    let offline_help = format!(
        "Without network: on a machine with access run \
         `huggingface-cli download {repo} {file} --repo-type dataset --local-dir DIR` \
         (or download the official coqa-dev-v1.0.json from the CoQA website), copy the file \
         here and pass --data PATH; or set HF_HOME to a cache that already holds it"
    );
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(false)
        .with_retries(1);
    if let Some(e) = endpoint {
        builder = builder.with_endpoint(e);
    }
    let api = builder
        .build()
        .map_err(|e| anyhow!("cannot start the Hugging Face hub client: {e}. {offline_help}"))?;
    api.dataset(repo.to_string()).get(file).map_err(|e| {
        anyhow!("cannot download {file} of dataset {repo} from the Hugging Face hub: {e}. {offline_help}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(CoqaSource::parse("fixture"), CoqaSource::Fixture);
        let hub = |r: &str, f: &str| CoqaSource::Hub {
            repo: r.into(),
            file: f.into(),
        };
        assert_eq!(CoqaSource::parse("hf"), hub(HF_DATASET, HF_VALIDATION_FILE));
        assert_eq!(
            CoqaSource::parse("hf:me/coqa"),
            hub("me/coqa", HF_VALIDATION_FILE)
        );
        assert_eq!(
            CoqaSource::parse("hf:me/coqa/dev.json"),
            hub("me/coqa", "dev.json")
        );
        assert_eq!(
            CoqaSource::parse("data/coqa-dev-v1.0.json"),
            CoqaSource::File("data/coqa-dev-v1.0.json".into())
        );
    }

    #[test]
    fn offline_download_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let cache = hf_hub::Cache::new(dir.path().to_path_buf());
        // A closed local port stands in for no network.
        let err = fetch(
            HF_DATASET,
            HF_VALIDATION_FILE,
            cache,
            Some("http://127.0.0.1:9".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("cannot download coqa_validation.parquet of dataset EleutherAI/coqa"),
            "{err}"
        );
        assert!(
            err.contains("huggingface-cli download EleutherAI/coqa coqa_validation.parquet --repo-type dataset"),
            "{err}"
        );
        assert!(err.contains("pass --data PATH"), "{err}");
    }

    #[test]
    fn cached_files_need_no_network() {
        let dir = tempfile::tempdir().unwrap();
        let cache = hf_hub::Cache::new(dir.path().to_path_buf());
        let repo = cache.dataset(HF_DATASET.into());
        repo.create_ref("0123456789abcdef").unwrap();
        let snap = dir
            .path()
            .join("datasets--EleutherAI--coqa/snapshots/0123456789abcdef");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join(HF_VALIDATION_FILE), b"x").unwrap();
        let p = fetch(
            HF_DATASET,
            HF_VALIDATION_FILE,
            cache,
            Some("http://127.0.0.1:9".into()),
        )
        .unwrap();
        assert_eq!(p, snap.join(HF_VALIDATION_FILE));
    }
}
