//! Parquet rows as JSON values (the layout `EleutherAI/coqa` ships on the
//! Hugging Face hub). Uses the `parquet` crate's record API, built with the
//! snappy codec only.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

/// Every row of the parquet file at `path`, as a JSON object (structs become
/// objects, lists arrays).
pub fn read_rows(path: &Path) -> Result<Vec<Value>> {
    let hint = "convert it to JSON Lines elsewhere (Python: \
                pandas.read_parquet(PATH).to_json(OUT, orient='records', lines=True)) \
                and pass that file with --data";
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| {
        anyhow!(
            "{}: not a readable parquet file ({e}); {hint}",
            path.display()
        )
    })?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| anyhow!("{}: cannot read parquet rows ({e}); {hint}", path.display()))?;
    rows.enumerate()
        .map(|(i, row)| {
            row.map(|r| r.to_json_value())
                .map_err(|e| anyhow!("{}: parquet row {i}: {e}; {hint}", path.display()))
        })
        .collect()
}
