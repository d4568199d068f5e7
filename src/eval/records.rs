//! Per-example records as JSON Lines (like lm-eval's `--log_samples`),
//! appended and flushed as examples finish so that an interrupted evaluation
//! can resume from the same file.
//!
//! Line 1 is `{"header": {...}}` naming the task, the model and the settings;
//! every other line is one record. A file whose header differs from the
//! current run is refused, so records of different runs never mix. A last
//! line cut short by a crash is dropped (and recomputed).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What produced a records file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordsHeader {
    /// Task name (`coqa`).
    pub task: String,
    /// The model as evaluated (spec, quantization); records of another model are refused.
    pub model: String,
    /// Every setting that changes a record's content.
    pub settings: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct HeaderLine {
    header: RecordsHeader,
}

/// An open records file, positioned for appending.
#[derive(Debug)]
pub struct RecordsFile {
    path: PathBuf,
    file: File,
}

impl RecordsFile {
    /// Opens `path` for `header`, creating it (and its directory) when absent.
    /// Returns the file and the records it already holds, in file order.
    pub fn open<R: DeserializeOwned>(
        path: &Path,
        header: &RecordsHeader,
    ) -> Result<(RecordsFile, Vec<R>)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create directory", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("{}: cannot open records file", path.display()))?;
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "{}: records file is not readable UTF-8 text",
                path.display()
            )
        })?;
        let (records, keep) = parse(&text, path, header)?;
        if keep < text.len() {
            tracing::warn!(
                "{}: dropping an unfinished last line ({} bytes) left by an interrupted run",
                path.display(),
                text.len() - keep
            );
            file.set_len(keep as u64)
                .with_context(|| format!("{}: cannot truncate records file", path.display()))?;
            file.seek(SeekFrom::End(0))?;
        }
        let mut out = RecordsFile {
            path: path.to_path_buf(),
            file,
        };
        if keep == 0 {
            out.write_lines(&[HeaderLine {
                header: header.clone(),
            }])?;
        }
        Ok((out, records))
    }

    /// Appends records and flushes them to disk.
    pub fn append<R: Serialize>(&mut self, records: &[R]) -> Result<()> {
        self.write_lines(records)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_lines<R: Serialize>(&mut self, items: &[R]) -> Result<()> {
        let mut buf = Vec::new();
        for item in items {
            serde_json::to_writer(&mut buf, item)?;
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.flush())
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("{}: cannot write records", self.path.display()))
    }
}

/// Records of `text` and the byte length of its complete, valid prefix.
fn parse<R: DeserializeOwned>(
    text: &str,
    path: &Path,
    header: &RecordsHeader,
) -> Result<(Vec<R>, usize)> {
    let mut records = Vec::new();
    let mut offset = 0;
    let mut first = true;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let complete = line.ends_with('\n');
        let body = line.trim_end();
        let line_no = n + 1;
        if body.is_empty() {
            offset += line.len();
            continue;
        }
        if first {
            match serde_json::from_str::<HeaderLine>(body) {
                Ok(h) if h.header == *header => {}
                Ok(h) => bail!(
                    "{}: holds records of another run ({} / {} / {}), not of this one ({} / {} / {}); \
                     pass another output path or delete the file to start over",
                    path.display(),
                    h.header.task,
                    h.header.model,
                    h.header.settings,
                    header.task,
                    header.model,
                    header.settings
                ),
                Err(_) if !complete => return Ok((records, offset)),
                Err(e) => bail!(
                    "{}: line 1 is not a records header ({e}); is this a records file of quantbench? \
                     Pass another output path or delete it",
                    path.display()
                ),
            }
            first = false;
        } else {
            match serde_json::from_str::<R>(body) {
                Ok(r) => records.push(r),
                Err(_) if !complete => return Ok((records, offset)),
                Err(e) => bail!(
                    "{}: line {line_no} is not a valid record ({e}); fix or delete that line to resume",
                    path.display()
                ),
            }
        }
        offset += line.len();
    }
    Ok((records, offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        id: String,
        x: f64,
    }

    fn header(model: &str) -> RecordsHeader {
        RecordsHeader {
            task: "t".into(),
            model: model.into(),
            settings: serde_json::json!({"k": 1}),
        }
    }

    fn rec(id: &str) -> Rec {
        Rec {
            id: id.into(),
            x: 0.5,
        }
    }

    #[test]
    fn append_then_reopen_returns_everything() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/r.jsonl");
        let (mut f, old) = RecordsFile::open::<Rec>(&p, &header("m")).unwrap();
        assert!(old.is_empty());
        f.append(&[rec("a"), rec("b")]).unwrap();
        f.append(&[rec("c")]).unwrap();
        drop(f);
        let (_, old) = RecordsFile::open::<Rec>(&p, &header("m")).unwrap();
        assert_eq!(old, vec![rec("a"), rec("b"), rec("c")]);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with("{\"header\":{\"task\":\"t\",\"model\":\"m\""),
            "{text}"
        );
        assert_eq!(text.lines().count(), 4);
    }

    #[test]
    fn torn_last_line_is_dropped_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let (mut f, _) = RecordsFile::open::<Rec>(&p, &header("m")).unwrap();
        f.append(&[rec("a")]).unwrap();
        drop(f);
        let mut raw = OpenOptions::new().append(true).open(&p).unwrap();
        raw.write_all(b"{\"id\": \"b\", \"x").unwrap();
        drop(raw);
        let (mut f, old) = RecordsFile::open::<Rec>(&p, &header("m")).unwrap();
        assert_eq!(old, vec![rec("a")]);
        f.append(&[rec("b")]).unwrap();
        drop(f);
        let (_, old) = RecordsFile::open::<Rec>(&p, &header("m")).unwrap();
        assert_eq!(old, vec![rec("a"), rec("b")]);
    }

    #[test]
    fn other_runs_and_corrupt_lines_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let (mut f, _) = RecordsFile::open::<Rec>(&p, &header("m")).unwrap();
        f.append(&[rec("a")]).unwrap();
        drop(f);
        let e = RecordsFile::open::<Rec>(&p, &header("other"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds records of another run"), "{e}");
        let mut raw = OpenOptions::new().append(true).open(&p).unwrap();
        raw.write_all(b"not json\n{\"id\":\"c\",\"x\":1}\n")
            .unwrap();
        drop(raw);
        let e = RecordsFile::open::<Rec>(&p, &header("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3 is not a valid record"), "{e}");
        std::fs::write(&p, "{\"id\":\"a\",\"x\":1}\n").unwrap();
        let e = RecordsFile::open::<Rec>(&p, &header("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1 is not a records header"), "{e}");
    }
}
