//! A Hugging Face checkpoint directory, memory-mapped: `model.safetensors`, or
//! `model.safetensors.index.json` plus the shards it names. Every header is validated by the
//! `safetensors` crate when the checkpoint is opened, before anything else happens.

use crate::error::{io_error, DimcutError, Result};
use memmap2::Mmap;
use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Indexes are small JSON files; refuse to read anything absurd into memory.
const MAX_INDEX_BYTES: u64 = 100 << 20;

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the shard file (header included in the offset).
    pub range: Range<usize>,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Shard {
    file_name: String,
    map: Mmap,
}

pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    tensors: HashMap<String, TensorEntry>,
}

impl Checkpoint {
    /// Opens and validates every header of the checkpoint in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(DimcutError::MissingFile {
                path: dir.to_path_buf(),
                reason: "checkpoint directory does not exist".into(),
            });
        }
        let index_path = dir.join(INDEX_FILE);
        let (shard_names, weight_map) = if index_path.is_file() {
            let weight_map = read_weight_map(&index_path)?;
            let names: BTreeSet<String> = weight_map.values().cloned().collect();
            (names.into_iter().collect(), Some(weight_map))
        } else if dir.join(SINGLE_FILE).is_file() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            return Err(DimcutError::MissingFile {
                path: dir.to_path_buf(),
                reason: format!("neither {SINGLE_FILE} nor {INDEX_FILE} found"),
            });
        };

        let mut shards = Vec::with_capacity(shard_names.len());
        let mut tensors = HashMap::new();
        for (shard_index, file_name) in shard_names.into_iter().enumerate() {
            let path = dir.join(&file_name);
            if !path.is_file() {
                return Err(DimcutError::MissingFile {
                    path,
                    reason: format!("shard named by {INDEX_FILE} does not exist"),
                });
            }
            let map = map_file(&path)?;
            let invalid = |reason: String| DimcutError::InvalidCheckpoint {
                path: path.clone(),
                reason,
            };
            for (name, entry) in parse_header(&map, shard_index).map_err(invalid)? {
                if let Some(previous) = tensors.insert(name.clone(), entry) {
                    let other = &shards_name(&shards, previous.shard);
                    return Err(DimcutError::InvalidCheckpoint {
                        path,
                        reason: format!("tensor {name:?} is also stored in {other}"),
                    });
                }
            }
            shards.push(Shard { file_name, map });
        }

        if let Some(weight_map) = weight_map {
            for (name, file_name) in &weight_map {
                let stored_in = tensors
                    .get(name)
                    .map(|entry| &shards[entry.shard].file_name);
                if stored_in != Some(file_name) {
                    return Err(DimcutError::InvalidCheckpoint {
                        path: index_path.clone(),
                        reason: format!("tensor {name:?} is not in its shard {file_name}"),
                    });
                }
            }
            if let Some(name) = tensors.keys().find(|name| !weight_map.contains_key(*name)) {
                return Err(DimcutError::InvalidCheckpoint {
                    path: index_path,
                    reason: format!(
                        "tensor {name:?} is stored in a shard but missing from the index"
                    ),
                });
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            tensors,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorEntry)> {
        self.tensors
            .iter()
            .map(|(name, entry)| (name.as_str(), entry))
    }

    pub fn shard_file_name(&self, entry: &TensorEntry) -> &str {
        &self.shards[entry.shard].file_name
    }

    /// The raw little-endian bytes of a tensor (a view into the memory map).
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.shards[entry.shard].map[entry.range.clone()]
    }

    /// Asks the kernel to start reading the pages of `range` (relative to the tensor's bytes) in
    /// the background, so the next tile's disk reads overlap this tile's arithmetic. Best effort.
    pub fn prefetch(&self, entry: &TensorEntry, range: Range<usize>) {
        #[cfg(unix)]
        if !range.is_empty() {
            let start = entry.range.start + range.start;
            let _ = self.shards[entry.shard].map.advise_range(
                memmap2::Advice::WillNeed,
                start,
                range.len(),
            );
        }
        #[cfg(not(unix))]
        let _ = (entry, range);
    }

    /// Drops the mapped pages of `range` (relative to the tensor's bytes) from this process,
    /// so resident memory stays bounded while streaming a large checkpoint. Best effort.
    pub fn release(&self, entry: &TensorEntry, range: Range<usize>) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let start = (entry.range.start + range.start) / PAGE * PAGE;
            let end = entry.range.start + range.end;
            if end > start {
                // SAFETY: the map is read-only and its file is never written by us, so
                // dropped pages are re-read unchanged if they are touched again.
                let _ = unsafe {
                    self.shards[entry.shard].map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (entry, range);
    }
}

fn shards_name(shards: &[Shard], index: usize) -> String {
    shards
        .get(index)
        .map_or_else(|| "another shard".into(), |s| s.file_name.clone())
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(io_error(path))?;
    let len = file.metadata().map_err(io_error(path))?.len();
    if len < 8 {
        return Err(DimcutError::InvalidCheckpoint {
            path: path.to_path_buf(),
            reason: format!("file is {len} bytes, too small to hold a safetensors header"),
        });
    }
    // SAFETY: the engine never writes its inputs; a concurrent external writer would be a
    // misuse that safetensors' own loaders do not guard against either.
    unsafe { Mmap::map(&file) }.map_err(io_error(path))
}

/// `weight_map` of an index file: tensor name → shard file name.
fn read_weight_map(path: &Path) -> Result<HashMap<String, String>> {
    let invalid = |reason: String| DimcutError::InvalidCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let len = std::fs::metadata(path).map_err(io_error(path))?.len();
    if len > MAX_INDEX_BYTES {
        return Err(invalid(format!(
            "index is {len} bytes, larger than {MAX_INDEX_BYTES}"
        )));
    }
    let text = std::fs::read(path).map_err(io_error(path))?;
    parse_index(&text).map_err(invalid)
}

/// Parses the text of a `model.safetensors.index.json`: tensor name → shard file name.
/// Every shard name must be a bare file name (no directory part).
pub fn parse_index(text: &[u8]) -> Result<HashMap<String, String>, String> {
    if text.len() as u64 > MAX_INDEX_BYTES {
        return Err(format!(
            "index is {} bytes, larger than {MAX_INDEX_BYTES}",
            text.len()
        ));
    }
    let index: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("index is not JSON: {e}"))?;
    let weight_map = index
        .get("weight_map")
        .and_then(|map| map.as_object())
        .ok_or_else(|| "index has no \"weight_map\" object".to_string())?;
    weight_map
        .iter()
        .map(|(name, file)| {
            let file = file
                .as_str()
                .filter(|file| is_plain_file_name(file))
                .ok_or_else(|| format!("tensor {name:?} maps to {file}, not a file name"))?;
            Ok((name.clone(), file.to_string()))
        })
        .collect()
}

/// The largest header we read, like the `safetensors` crate: a hostile length prefix cannot
/// make us allocate (or parse) more than this.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The JSON header of a safetensors file, as the format defines it.
#[derive(serde::Deserialize)]
struct RawHeader {
    #[serde(rename = "__metadata__")]
    #[allow(dead_code)]
    metadata: Option<HashMap<String, String>>,
    #[serde(flatten)]
    tensors: HashMap<String, TensorInfo>,
}

/// Parses and validates the header of a whole safetensors file (`bytes` is the file), naming
/// the offending tensor in every error: the length prefix must fit the file, the header must be
/// JSON, every tensor's byte range must match its shape and dtype, and the ranges must tile the
/// data section exactly (no overlap, no gap, nothing past or short of the end of the file).
/// Sizes are checked before anything is allocated from them.
pub fn parse_header(bytes: &[u8], shard: usize) -> Result<Vec<(String, TensorEntry)>, String> {
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.get(..8) else {
        return Err(format!(
            "file is {file_len} bytes, too small to hold a safetensors header"
        ));
    };
    let header_len = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} is larger than the {MAX_HEADER_BYTES}-byte limit"
        ));
    }
    if header_len > file_len - 8 {
        return Err(format!(
            "header length {header_len} is larger than the file ({file_len} bytes): truncated \
             or not a safetensors file"
        ));
    }
    let data_start = 8 + header_len as usize;
    let text = std::str::from_utf8(&bytes[8..data_start])
        .map_err(|e| format!("header is not UTF-8 text: {e}"))?;
    let header: RawHeader =
        serde_json::from_str(text).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let data_len = bytes.len() - data_start;

    let mut tensors: Vec<(String, TensorInfo)> = header.tensors.into_iter().collect();
    tensors.sort_by(|(a_name, a), (b_name, b)| {
        (a.data_offsets, a_name).cmp(&(b.data_offsets, b_name))
    });
    let mut end_of_previous: Option<(&str, usize)> = None;
    for (name, info) in &tensors {
        let (begin, end) = info.data_offsets;
        if end < begin {
            return Err(format!(
                "tensor {name:?}: data_offsets [{begin}, {end}] end before they begin"
            ));
        }
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor {name:?}: shape {:?} overflows", info.shape))?;
        let bits = numel
            .checked_mul(info.dtype.bitsize())
            .ok_or_else(|| format!("tensor {name:?}: shape {:?} overflows", info.shape))?;
        if bits % 8 != 0 {
            return Err(format!(
                "tensor {name:?}: {numel} elements of {} do not fill whole bytes",
                info.dtype
            ));
        }
        if end - begin != bits / 8 {
            return Err(format!(
                "tensor {name:?}: data_offsets [{begin}, {end}] hold {} bytes, but shape {:?} \
                 of {} needs {}",
                end - begin,
                info.shape,
                info.dtype,
                bits / 8
            ));
        }
        match end_of_previous {
            None if begin != 0 => {
                return Err(format!(
                    "tensor {name:?} starts at byte {begin} of the data section, leaving a gap \
                     before it (the first tensor must start at 0)"
                ))
            }
            Some((previous, previous_end)) if begin < previous_end => {
                return Err(format!(
                    "tensors {previous:?} and {name:?} overlap (bytes {begin}..{previous_end})"
                ))
            }
            Some((previous, previous_end)) if begin > previous_end => {
                return Err(format!(
                    "gap of {} bytes between tensors {previous:?} and {name:?}",
                    begin - previous_end
                ))
            }
            _ => {}
        }
        if end > data_len {
            return Err(format!(
                "tensor {name:?} ends at byte {end} of the data section, past the end of the \
                 file ({data_len} data bytes): the file is truncated"
            ));
        }
        end_of_previous = Some((name, end));
    }
    let covered = end_of_previous.map_or(0, |(_, end)| end);
    if covered != data_len {
        return Err(format!(
            "the tensors cover {covered} bytes but the data section has {data_len}: \
             trailing bytes after the last tensor"
        ));
    }
    // The reference parser must agree (it is what every loader of our output uses).
    SafeTensors::read_metadata(bytes).map_err(|e| format!("invalid safetensors file: {e}"))?;
    Ok(tensors
        .into_iter()
        .map(|(name, info)| {
            let (begin, end) = info.data_offsets;
            let entry = TensorEntry {
                shard,
                dtype: info.dtype,
                shape: info.shape,
                range: data_start + begin..data_start + end,
            };
            (name, entry)
        })
        .collect())
}

/// A bare file name: no directory part, so an index cannot point outside its directory.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}
