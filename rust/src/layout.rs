//! Where every output tensor goes: tensors split into shards in plan order, each shard's
//! safetensors header computed before any data is written, and the index naming the shards.

use crate::checkpoint::{INDEX_FILE, SINGLE_FILE};
use crate::error::{io_error, DimcutError, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::Path;

/// What the layout needs to know about an output tensor.
#[derive(Clone, Debug)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl OutputTensor {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// One output file: its header bytes and where each of its tensors starts.
#[derive(Clone, Debug)]
pub struct ShardLayout {
    pub file_name: String,
    /// The 8-byte length prefix followed by the JSON header, padded to 8 bytes.
    pub header: Vec<u8>,
    /// `(index into the tensor list, absolute byte offset in the file)`.
    pub placements: Vec<(usize, usize)>,
    /// Every tensor's `[start, end)` bytes in the file with its name and dtype, by start.
    pub extents: Vec<Extent>,
    pub file_len: usize,
}

/// Where one tensor's bytes lie in a shard file.
#[derive(Clone, Debug)]
pub struct Extent {
    pub start: usize,
    pub end: usize,
    pub name: String,
    pub dtype: Dtype,
}

/// Where every tensor goes.
#[derive(Clone, Debug)]
pub struct Layout {
    pub shards: Vec<ShardLayout>,
    /// For tensor `i`: `(shard, absolute offset)`.
    pub location: Vec<(usize, usize)>,
    pub total_size: usize,
}

/// Splits `tensors` (in order) into shards of at most `max_shard_size` data bytes (a tensor
/// larger than that gets a shard of its own) and computes each shard's header.
pub fn plan_layout(tensors: &[OutputTensor], max_shard_size: usize) -> Result<Layout> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut current_size = 0;
    for (index, tensor) in tensors.iter().enumerate() {
        let size = tensor.nbytes();
        match groups.last_mut() {
            Some(group) if current_size + size <= max_shard_size => group.push(index),
            _ => {
                groups.push(vec![index]);
                current_size = 0;
            }
        }
        current_size += size;
    }
    if groups.is_empty() {
        groups.push(Vec::new());
    }

    let count = groups.len();
    let mut shards = Vec::with_capacity(count);
    let mut location = vec![(0, 0); tensors.len()];
    for (shard_index, mut group) in groups.into_iter().enumerate() {
        // Like safetensors' own writer: widest dtype first, so every tensor is aligned to its
        // element size (the data section starts 8-aligned).
        group.sort_by_key(|&i| std::cmp::Reverse(tensors[i].dtype.bitsize()));
        let mut offset = 0;
        let mut infos = Vec::with_capacity(group.len());
        let mut relative = Vec::with_capacity(group.len());
        for &i in &group {
            let tensor = &tensors[i];
            let end = offset + tensor.nbytes();
            infos.push((
                tensor.name.clone(),
                TensorInfo {
                    dtype: tensor.dtype,
                    shape: tensor.shape.clone(),
                    data_offsets: (offset, end),
                },
            ));
            relative.push((i, offset));
            offset = end;
        }
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let header = encode_header(Metadata::new(Some(metadata), infos).map_err(|e| {
            DimcutError::InvalidPlan(format!("cannot build a safetensors header: {e}"))
        })?)?;
        let placements: Vec<_> = relative
            .into_iter()
            .map(|(i, offset)| (i, header.len() + offset))
            .collect();
        for &(i, at) in &placements {
            location[i] = (shard_index, at);
        }
        let extents = placements
            .iter()
            .map(|&(i, at)| Extent {
                start: at,
                end: at + tensors[i].nbytes(),
                name: tensors[i].name.clone(),
                dtype: tensors[i].dtype,
            })
            .collect();
        shards.push(ShardLayout {
            file_name: shard_file_name(shard_index, count),
            file_len: header.len() + offset,
            header,
            placements,
            extents,
        });
    }
    let total_size = tensors.iter().map(OutputTensor::nbytes).sum();
    Ok(Layout {
        shards,
        location,
        total_size,
    })
}

fn encode_header(metadata: Metadata) -> Result<Vec<u8>> {
    let mut json = serde_json::to_vec(&metadata)
        .map_err(|e| DimcutError::InvalidPlan(format!("cannot serialize a header: {e}")))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    Ok(header)
}

/// `model.safetensors`, or the Hugging Face name `model-00001-of-00003.safetensors`.
pub fn shard_file_name(index: usize, count: usize) -> String {
    if count == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
    }
}

/// The `model.safetensors.index.json` text for a multi-shard layout.
pub fn index_json(layout: &Layout, tensors: &[OutputTensor]) -> String {
    let weight_map: serde_json::Map<String, serde_json::Value> = layout
        .shards
        .iter()
        .flat_map(|shard| {
            shard
                .placements
                .iter()
                .map(|&(i, _)| (tensors[i].name.clone(), shard.file_name.clone().into()))
        })
        .collect();
    let index = serde_json::json!({
        "metadata": {"total_size": layout.total_size},
        "weight_map": weight_map,
    });
    serde_json::to_string_pretty(&index).expect("JSON values always serialize")
}

/// Writes the index when there are several shards.
pub fn write_index(dir: &Path, layout: &Layout, tensors: &[OutputTensor]) -> Result<()> {
    if layout.shards.len() > 1 {
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, index_json(layout, tensors)).map_err(io_error(&path))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use safetensors::SafeTensors;

    pub(crate) fn tensor(name: &str, dtype: Dtype, shape: &[usize]) -> OutputTensor {
        OutputTensor {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn one_shard_is_named_model_safetensors() {
        let tensors = [
            tensor("a", Dtype::BF16, &[3, 5]),
            tensor("b", Dtype::F32, &[2]),
        ];
        let layout = plan_layout(&tensors, 1 << 20).unwrap();
        assert_eq!(layout.shards.len(), 1);
        assert_eq!(layout.shards[0].file_name, "model.safetensors");
        assert_eq!(layout.total_size, 30 + 8);
    }

    #[test]
    fn empty_plan_writes_one_empty_shard() {
        let layout = plan_layout(&[], 100).unwrap();
        assert_eq!(layout.shards.len(), 1);
        let file = layout.shards[0].header.clone();
        SafeTensors::read_metadata(&file).unwrap();
    }

    proptest! {
        #[test]
        fn layouts_are_valid_safetensors(
            sizes in proptest::collection::vec((0usize..40, 0usize..4), 1..30),
            max_shard in 1usize..400,
        ) {
            let dtypes = [Dtype::BF16, Dtype::F32, Dtype::F64, Dtype::U8];
            let tensors: Vec<_> = sizes
                .iter()
                .enumerate()
                .map(|(i, &(n, d))| tensor(&format!("t{i}"), dtypes[d], &[n, 3]))
                .collect();
            let layout = plan_layout(&tensors, max_shard).unwrap();
            prop_assert_eq!(layout.total_size, tensors.iter().map(|t| t.nbytes()).sum::<usize>());

            let mut seen = vec![false; tensors.len()];
            let mut previous_last = None;
            for (s, shard) in layout.shards.iter().enumerate() {
                // A zero-filled file of the right size must parse with the safetensors crate
                // and agree with our placements.
                let mut file = shard.header.clone();
                file.resize(shard.file_len, 0);
                let (n, metadata) = SafeTensors::read_metadata(&file).unwrap();
                prop_assert_eq!(n + 8, shard.header.len());
                prop_assert_eq!(metadata.metadata().as_ref().unwrap()["format"].as_str(), "pt");
                let data: usize = shard.placements.iter().map(|&(i, _)| tensors[i].nbytes()).sum();
                prop_assert!(data <= max_shard || shard.placements.len() == 1);
                for &(i, at) in &shard.placements {
                    let info = metadata.info(&tensors[i].name).unwrap();
                    prop_assert_eq!(info.data_offsets.0 + n + 8, at);
                    prop_assert_eq!(at % (tensors[i].dtype.bitsize() / 8), 0);
                    prop_assert_eq!(layout.location[i], (s, at));
                    seen[i] = true;
                }
                // Shards hold consecutive runs of the plan order.
                let first = shard.placements.iter().map(|p| p.0).min().unwrap();
                let last = shard.placements.iter().map(|p| p.0).max().unwrap();
                prop_assert_eq!(last - first + 1, shard.placements.len());
                prop_assert_eq!(first, previous_last.map_or(0, |l: usize| l + 1));
                previous_last = Some(last);
            }
            prop_assert!(seen.iter().all(|&s| s));
            if layout.shards.len() > 1 {
                let index: serde_json::Value =
                    serde_json::from_str(&index_json(&layout, &tensors)).unwrap();
                prop_assert_eq!(index["metadata"]["total_size"].as_u64().unwrap() as usize, layout.total_size);
                prop_assert_eq!(index["weight_map"].as_object().unwrap().len(), tensors.len());
            }
        }
    }
}
