//! Hugging Face model directories: config.json, tokenizer.json, and single or sharded
//! safetensors (model.safetensors or model.safetensors.index.json), memory-mapped.

use crate::{Backing, DType, FormatError, Result, TensorData};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct HfDirectory {
    pub dir: PathBuf,
    /// config.json, parsed but not interpreted (the model layer knows what the keys mean).
    pub config: serde_json::Value,
    pub tensors: BTreeMap<String, TensorData>,
}

impl HfDirectory {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let config = parse_config(&read_text(&config_path)?, &config_path)?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            shard_names(&read_text(&index)?, &index)?
                .into_iter()
                .map(|s| dir.join(s))
                .collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(FormatError::Other(format!(
                    "{}: no model.safetensors or model.safetensors.index.json",
                    dir.display()
                )));
            }
            vec![single]
        };
        let mut tensors = BTreeMap::new();
        for f in files {
            for t in read_safetensors(&f)? {
                tensors.insert(t.name.clone(), t);
            }
        }
        Ok(HfDirectory {
            dir,
            config,
            tensors,
        })
    }

    pub fn tokenizer_json(&self) -> Option<PathBuf> {
        let p = self.dir.join("tokenizer.json");
        p.exists().then_some(p)
    }

    pub fn tensor(&self, name: &str) -> Result<TensorData> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| FormatError::Tensor {
                name: name.to_string(),
                what: format!("is missing from {}", self.dir.display()),
            })
    }
}

fn read_text(path: &Path) -> Result<String> {
    crate::text::read_text(path, crate::text::MAX_TEXT_BYTES)
}

fn parse_json(text: &str, path: &Path) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| FormatError::Malformed {
        path: path.to_path_buf(),
        what: format!("invalid JSON: {e}"),
    })
}

/// Parses config.json's text (`path` names it in errors); the keys are the model layer's.
pub fn parse_config(text: &str, path: &Path) -> Result<serde_json::Value> {
    parse_json(text, path)
}

/// The shard file names a `model.safetensors.index.json` text lists in its `weight_map`,
/// sorted and deduplicated; a name that would leave the model directory is an error.
pub fn shard_names(text: &str, path: &Path) -> Result<Vec<String>> {
    let v = parse_json(text, path)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| FormatError::Malformed {
            path: path.to_path_buf(),
            what: "no \"weight_map\" object".into(),
        })?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    for s in &shards {
        if s.contains('/') || s.contains('\\') || s.starts_with('.') {
            return Err(FormatError::Malformed {
                path: path.to_path_buf(),
                what: format!("shard name {s:?} leaves the model directory"),
            });
        }
    }
    Ok(shards)
}

/// Memory-maps one safetensors file and lists its tensors (F32, F16 and BF16).
pub fn read_safetensors(path: &Path) -> Result<Vec<TensorData>> {
    let io = |err| FormatError::Io {
        path: path.to_path_buf(),
        err,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: read-only map of a model file (see GgufFile::open).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let backing: Backing = Arc::new(map);
    safetensors_from_backing(path, backing)
}

pub fn safetensors_from_backing(path: &Path, backing: Backing) -> Result<Vec<TensorData>> {
    let bytes: &[u8] = (*backing).as_ref();
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| FormatError::Malformed {
        path: path.to_path_buf(),
        what: format!("not a valid safetensors file: {e}"),
    })?;
    let base = bytes.as_ptr() as usize;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(FormatError::Tensor {
                    name,
                    what: format!("has dtype {other:?}; only F32, F16 and BF16 are supported"),
                })
            }
        };
        let start = view.data().as_ptr() as usize - base;
        let range = start..start + view.data().len();
        let mut shape = view.shape().to_vec();
        if shape.is_empty() {
            shape.push(1);
        }
        out.push(TensorData::new(name, dtype, shape, backing.clone(), range)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_are_sorted_unique_and_stay_in_the_directory() {
        let index = Path::new("model.safetensors.index.json");
        let ok = r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}}"#;
        assert_eq!(
            shard_names(ok, index).unwrap(),
            ["m-1.safetensors", "m-2.safetensors"]
        );
        for bad in ["../x.safetensors", "/etc/passwd", "sub\\\\x", ".hidden"] {
            let text = format!(r#"{{"weight_map": {{"a": "{bad}"}}}}"#);
            let err = shard_names(&text, index).unwrap_err().to_string();
            assert!(err.contains("leaves the model directory"), "{bad}: {err}");
        }
        let err = shard_names(r#"{"weight_map": []}"#, index).unwrap_err();
        assert!(
            err.to_string().contains("no \"weight_map\" object"),
            "{err}"
        );
        let err = parse_config("{", Path::new("config.json")).unwrap_err();
        assert!(
            err.to_string().starts_with("config.json: invalid JSON"),
            "{err}"
        );
    }
}
