//! Reading and writing `.safetensors` files as [`HostTensor`]s.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::tensor::{DType, HostTensor};

/// Encodes a host tensor's values in its storage dtype.
pub fn encode(t: &HostTensor) -> (Dtype, Vec<u8>) {
    match t.dtype {
        DType::F32 => (
            Dtype::F32,
            t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            t.data
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            t.data
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
    }
}

/// A tensor already in serialized form (any safetensors dtype, e.g. packed
/// integer codes of a quantized format).
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl From<&HostTensor> for RawTensor {
    fn from(t: &HostTensor) -> Self {
        let (dtype, bytes) = encode(t);
        RawTensor {
            dtype,
            shape: t.shape.clone(),
            bytes,
        }
    }
}

/// Writes tensors to one `.safetensors` file with optional string metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, RawTensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (name.clone(), v))
                .with_context(|| format!("tensor '{name}' has inconsistent shape and data"))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, metadata, path)
        .with_context(|| format!("{}: cannot write safetensors file", path.display()))
}

/// Decodes one floating-point (F32, F16 or BF16) tensor view; `name` is
/// used in errors.
pub fn decode(name: &str, view: &TensorView<'_>) -> Result<HostTensor> {
    let bytes = view.data();
    let (dtype, data): (DType, Vec<f32>) = match view.dtype() {
        Dtype::F32 => (
            DType::F32,
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        Dtype::F16 => (
            DType::F16,
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => (
            DType::BF16,
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        other => anyhow::bail!("tensor '{name}' has dtype {other:?}; expected F32, F16 or BF16"),
    };
    HostTensor::new(view.shape().to_vec(), dtype, data)
}

/// Name of the single-file checkpoint in an HF directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index of a sharded HF checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// A memory-mapped `.safetensors` file whose header has been validated.
pub struct MappedSafetensors {
    path: PathBuf,
    mmap: Mmap,
}

impl MappedSafetensors {
    /// Maps `path` and checks that its header and data are complete.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("{}: cannot read file size", path.display()))?
            .len();
        if len < 8 {
            bail!(
                "{}",
                corrupt_message(path, "shorter than the 8-byte header length")
            );
        }
        // SAFETY: the map is read-only; checkpoints are not modified while loaded.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot memory-map", path.display()))?;
        let mapped = MappedSafetensors {
            path: path.to_path_buf(),
            mmap,
        };
        mapped.parse()?;
        Ok(mapped)
    }

    /// The parsed view of the file (cheap: re-reads only the JSON header).
    pub fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .map_err(|e| anyhow::anyhow!("{}", corrupt_message(&self.path, &e.to_string())))
    }

    /// The file this map was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The message for a file that cannot be parsed as safetensors.
fn corrupt_message(path: &Path, detail: &str) -> String {
    format!(
        "{} is truncated or corrupt ({detail}); re-download it",
        path.display()
    )
}

/// Reads every tensor of one `.safetensors` file as F32/F16/BF16 host tensors.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, HostTensor>> {
    let mapped = MappedSafetensors::open(path)?;
    let st = mapped.parse()?;
    st.iter()
        .map(|(name, view)| {
            decode(name, &view)
                .map(|t| (name.to_string(), t))
                .with_context(|| format!("{}", path.display()))
        })
        .collect()
}

/// Reads every tensor of one `.safetensors` file in its serialized form (any
/// dtype: packed integer codes of quantized checkpoints included).
pub fn read_safetensors_raw(path: &Path) -> Result<HashMap<String, RawTensor>> {
    let mapped = MappedSafetensors::open(path)?;
    let st = mapped.parse()?;
    Ok(st
        .iter()
        .map(|(name, view)| {
            let raw = RawTensor {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            };
            (name.to_string(), raw)
        })
        .collect())
}

/// The `weight_map` of a sharded checkpoint's index: tensor name → shard file.
pub fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read shard index", path.display()))?;
    let index: Index = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a valid safetensors index (expected a \"weight_map\" object); re-download it",
            path.display()
        )
    })?;
    Ok(index.weight_map)
}

/// The safetensors files of an HF checkpoint directory, with the tensors each
/// one must hold (empty for a single `model.safetensors`: anything it has).
pub fn checkpoint_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<String>)>> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let mut shards: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (tensor, shard) in read_index(&index_path)? {
            shards.entry(shard).or_default().push(tensor);
        }
        return shards
            .into_iter()
            .map(|(shard, tensors)| {
                let path = dir.join(&shard);
                if !path.is_file() {
                    bail!(
                        "{}: shard '{shard}' listed in {INDEX_FILE} is missing; download it into {}",
                        path.display(),
                        dir.display()
                    );
                }
                Ok((path, tensors))
            })
            .collect();
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![(single, vec![])]);
    }
    bail!(
        "{}: no {SINGLE_FILE} or {INDEX_FILE}; an HF checkpoint directory needs its weights in safetensors format",
        dir.display()
    )
}

/// Reads all tensors of an HF checkpoint directory (single file or shards)
/// with `read`, checking that each shard holds what the index lists.
fn read_checkpoint_with<T>(
    dir: &Path,
    read: impl Fn(&Path) -> Result<HashMap<String, T>>,
) -> Result<HashMap<String, T>> {
    let mut all = HashMap::new();
    for (path, expected) in checkpoint_files(dir)? {
        let tensors = read(&path)?;
        if let Some(missing) = expected.iter().find(|n| !tensors.contains_key(*n)) {
            bail!(
                "{}: {INDEX_FILE} lists tensor '{missing}' in this shard but the shard lacks it; re-download the checkpoint",
                path.display()
            );
        }
        all.extend(tensors);
    }
    Ok(all)
}

/// Reads all floating-point tensors of an HF checkpoint directory.
pub fn read_checkpoint(dir: &Path) -> Result<HashMap<String, HostTensor>> {
    read_checkpoint_with(dir, read_safetensors)
}

/// Reads all tensors of an HF checkpoint directory in serialized form (for
/// loaders of quantized checkpoints).
pub fn read_checkpoint_raw(dir: &Path) -> Result<HashMap<String, RawTensor>> {
    read_checkpoint_with(dir, read_safetensors_raw)
}
