//! Property-based fuzzing of everything the engine reads from the outside: safetensors headers,
//! index files and plans. Each target must return `Ok` or an error, never panic, and never
//! allocate from a hostile size before checking it.
//!
//! The default `cargo test` runs a short seeded run. A long run (a few minutes):
//!
//! ```sh
//! DIMCUT_FUZZ_CASES=200000 DIMCUT_FUZZ_SEED=random cargo test --release --test fuzz
//! ```

use dimcut::checkpoint::{parse_header, parse_index, MAX_HEADER_BYTES};
use dimcut::{rewrite_checkpoint, rewrite_tensors, ArrayData, ArrayRef, Arrays, Backing, Options};
use dimcut::{FloatDtype, Precision, Shortcut, TensorOp};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::OnceLock;

/// Cases per target: `DIMCUT_FUZZ_CASES` (default 256); seed `DIMCUT_FUZZ_SEED` (a number,
/// or `random`; default fixed so that the suite is reproducible).
fn config() -> Config {
    let cases = std::env::var("DIMCUT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let rng_seed = match std::env::var("DIMCUT_FUZZ_SEED").as_deref() {
        Ok("random") => RngSeed::Random,
        Ok(seed) => RngSeed::Fixed(seed.parse().unwrap_or(0x5eed)),
        Err(_) => RngSeed::Fixed(0x5eed),
    };
    Config {
        cases,
        rng_seed,
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    }
}

const DTYPES: [&str; 16] = [
    "F32", "F16", "BF16", "F64", "I64", "I32", "U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2", "U16",
    "F4", "F6_E2M3", "F128", "",
];

fn dtype_bits(dtype: &str) -> usize {
    match dtype {
        "F64" | "I64" => 64,
        "F32" | "I32" => 32,
        "F16" | "BF16" | "U16" => 16,
        "F4" => 4,
        "F6_E2M3" => 6,
        _ => 8,
    }
}

/// A well-formed safetensors file holding `tensors` (name, dtype, shape).
fn build_file(tensors: &[(String, &str, Vec<usize>)]) -> (Value, usize) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * dtype_bits(dtype) / 8;
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    (Value::Object(header), offset)
}

fn encode(header: &Value, data_len: usize) -> Vec<u8> {
    let text = serde_json::to_vec(header).unwrap();
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&text);
    file.resize(file.len() + data_len, 0);
    file
}

#[derive(Clone, Debug)]
enum Mutation {
    /// Adds `delta` to one number of a tensor's data_offsets.
    Offset(usize, bool, i64),
    /// Sets one shape dimension (possibly huge).
    Dim(usize, usize, u64),
    Dtype(usize, &'static str),
    /// Replaces a tensor's info by an arbitrary JSON value.
    Info(usize, u8),
    /// Sets the length prefix.
    Prefix(u64),
    Truncate(usize),
    Append(Vec<u8>),
    Byte(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<bool>(), -20i64..20)
            .prop_map(|(t, end, d)| Mutation::Offset(t, end, d)),
        (
            any::<usize>(),
            any::<usize>(),
            prop_oneof![0u64..10, Just(u64::MAX), Just(1 << 62), Just(1 << 33)]
        )
            .prop_map(|(t, i, v)| Mutation::Dim(t, i, v)),
        (any::<usize>(), proptest::sample::select(&DTYPES[..]))
            .prop_map(|(t, d)| Mutation::Dtype(t, d)),
        (any::<usize>(), any::<u8>()).prop_map(|(t, k)| Mutation::Info(t, k)),
        prop_oneof![
            any::<u64>(),
            0u64..300,
            Just(MAX_HEADER_BYTES),
            Just(MAX_HEADER_BYTES + 1)
        ]
        .prop_map(Mutation::Prefix),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Byte(i, b)),
    ]
}

fn tensors() -> impl Strategy<Value = Vec<(String, &'static str, Vec<usize>)>> {
    proptest::collection::vec(
        (
            "[a-z.]{0,6}",
            proptest::sample::select(&DTYPES[..8]),
            proptest::collection::vec(0usize..5, 0..4),
        ),
        0..6,
    )
}

fn mutate_header(header: &mut Value, m: &Mutation) {
    let names: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    // Only tensors whose info is still an object take field edits (JSON indexing of other
    // values would panic in the harness, not in the code under test).
    let pick = |t: usize| names.get(t % names.len().max(1)).cloned();
    let object = |header: &Value, name: &Option<String>| {
        name.as_ref().is_some_and(|n| header[n].is_object())
    };
    match *m {
        Mutation::Offset(t, end, delta) => {
            let name = pick(t);
            if object(header, &name) && header[name.as_ref().unwrap()]["data_offsets"].is_array() {
                let slot = &mut header[name.unwrap()]["data_offsets"][usize::from(end)];
                let v = slot.as_i64().unwrap_or(0) + delta;
                *slot = json!(v.max(0));
            }
        }
        Mutation::Dim(t, i, v) => {
            let name = pick(t);
            if object(header, &name) {
                if let Some(shape) = header[name.unwrap()]["shape"].as_array_mut() {
                    let n = shape.len();
                    if n > 0 {
                        shape[i % n] = json!(v);
                    } else {
                        shape.push(json!(v));
                    }
                }
            }
        }
        Mutation::Dtype(t, d) => {
            let name = pick(t);
            if object(header, &name) {
                header[name.unwrap()]["dtype"] = json!(d);
            }
        }
        Mutation::Info(t, k) => {
            if let Some(name) = pick(t) {
                header[&name] = match k % 6 {
                    0 => json!(null),
                    1 => json!("F32"),
                    2 => json!({"dtype": "F32", "shape": [1]}),
                    3 => json!({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}),
                    4 => json!({"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}),
                    _ => json!([1, 2, 3]),
                };
            } else {
                header["__metadata__"] = json!({"format": k});
            }
        }
        _ => {}
    }
}

fn mutate_bytes(file: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Prefix(n) if file.len() >= 8 => file[..8].copy_from_slice(&n.to_le_bytes()),
        Mutation::Truncate(at) => {
            let len = file.len();
            file.truncate(at % (len + 1));
        }
        Mutation::Append(bytes) => file.extend_from_slice(bytes),
        Mutation::Byte(i, b) => {
            let len = file.len();
            if len > 0 {
                file[i % len] = *b;
            }
        }
        _ => {}
    }
}

/// Our parser and the reference one accept exactly the same files, and agree on them.
fn check_header(file: &[u8]) -> Result<(), TestCaseError> {
    let ours = parse_header(file, 0);
    let reference = SafeTensors::read_metadata(file);
    prop_assert_eq!(
        ours.is_ok(),
        reference.is_ok(),
        "ours: {:?}, reference: {:?}",
        ours.as_ref().err(),
        reference.as_ref().err()
    );
    if let (Ok(entries), Ok((n, metadata))) = (ours, reference) {
        let mut covered = 0;
        for (name, entry) in &entries {
            let info = metadata.info(name).unwrap();
            prop_assert_eq!(&entry.shape, &info.shape);
            prop_assert_eq!(entry.range.start, 8 + n + info.data_offsets.0);
            prop_assert!(entry.range.end <= file.len());
            covered += entry.range.len();
        }
        prop_assert_eq!(covered, file.len() - 8 - n);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_header_random_bytes(file in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_header(&file)?;
    }

    #[test]
    fn fuzz_header_mutated(
        tensors in tensors(),
        mutations in proptest::collection::vec(mutation(), 0..4),
    ) {
        let (mut header, data_len) = build_file(&tensors);
        for m in &mutations {
            mutate_header(&mut header, m);
        }
        let mut file = encode(&header, data_len);
        for m in &mutations {
            mutate_bytes(&mut file, m);
        }
        check_header(&file)?;
    }

    #[test]
    fn fuzz_index(
        entries in proptest::collection::vec(("[a-z.]{0,5}", "[a-z./\\\\\\x00-]{0,8}"), 0..5),
        shape in 0u8..8,
        cut in any::<usize>(),
    ) {
        let map: serde_json::Map<String, Value> =
            entries.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let index = match shape {
            0 => json!({"weight_map": map}),
            1 => json!({"metadata": {"total_size": 1}, "weight_map": map}),
            2 => json!({"weight_map": [1, 2]}),
            3 => json!({"weight_map": {"a": 3}}),
            4 => json!([map]),
            5 => json!(null),
            _ => json!({"weight_map": map, "x": {"weight_map": 1}}),
        };
        let mut text = serde_json::to_vec(&index).unwrap();
        if shape == 7 {
            let len = text.len();
            text.truncate(cut % (len + 1));
        }
        if let Ok(map) = parse_index(&text) {
            for file in map.values() {
                prop_assert!(!file.contains('/') && !file.contains('\\') && !file.is_empty());
                prop_assert!(file != "." && file != "..");
            }
        }
    }
}

// ------------------------------------------------------------------------------------- plans

/// A small checkpoint with tensors of every rank and a few dtypes, written once.
fn checkpoint_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![
            ("w".to_string(), "F32", vec![6, 4]),
            ("b".to_string(), "F32", vec![6]),
            ("n".to_string(), "BF16", vec![4]),
            ("h".to_string(), "F16", vec![4, 6]),
            ("e".to_string(), "F32", vec![3, 2, 2]),
            ("i".to_string(), "I64", vec![5]),
            ("z".to_string(), "F32", vec![0, 4]),
        ];
        let (header, data_len) = build_file(&tensors);
        let mut file = encode(&header, 0);
        // Small finite values; the data section in header order.
        let start = file.len();
        file.resize(start + data_len, 0);
        for (k, byte) in file[start..].iter_mut().enumerate() {
            *byte = if k % 2 == 0 { 0x3c } else { (k % 7) as u8 };
        }
        std::fs::write(dir.path().join("model.safetensors"), file).unwrap();
        dir
    })
    .path()
}

struct OwnedArray {
    data: Result<Vec<f32>, Vec<f64>>,
    shape: Vec<usize>,
}

fn owned_arrays() -> Vec<(&'static str, OwnedArray)> {
    let f32s = |shape: Vec<usize>| OwnedArray {
        data: Ok((0..shape.iter().product::<usize>())
            .map(|i| (i as f32 * 0.37).sin())
            .collect()),
        shape,
    };
    let f64s = |shape: Vec<usize>| OwnedArray {
        data: Err((0..shape.iter().product::<usize>())
            .map(|i| (i as f64 * 0.11).cos())
            .collect()),
        shape,
    };
    vec![
        ("Q4", f64s(vec![4, 4])),
        ("Q6", f32s(vec![6, 6])),
        ("R", f32s(vec![4, 3])),
        ("L", f64s(vec![2, 3])),
        ("V", f32s(vec![3])),
        ("T", f32s(vec![2, 2, 2])),
        ("E", f32s(vec![0, 0])),
    ]
}

fn names() -> impl Strategy<Value = Option<String>> {
    proptest::option::weighted(
        0.4,
        proptest::sample::select(vec![
            "w", "b", "n", "h", "e", "i", "z", "Q4", "Q6", "R", "L", "V", "T", "E", "missing",
        ])
        .prop_map(String::from),
    )
}

fn keep() -> impl Strategy<Value = Option<usize>> {
    proptest::option::weighted(0.4, prop_oneof![0usize..8, Just(usize::MAX)])
}

fn op() -> impl Strategy<Value = TensorOp> {
    (
        proptest::sample::select(vec!["o1", "o2", "o3", ""]),
        (names(), names(), names(), keep(), names(), keep()),
        proptest::option::weighted(0.2, (names(), names(), 0usize..7, 0usize..7)),
        proptest::option::weighted(
            0.3,
            proptest::sample::select(vec!["F32", "F16", "BF16", "F64"]),
        ),
    )
        .prop_map(
            |(
                name,
                (source, literal, col_scale, in_keep, in_rotation, out_keep),
                shortcut,
                dtype,
            )| {
                let out_rotation = in_rotation.clone().filter(|_| in_keep.is_none());
                TensorOp {
                    name: name.into(),
                    source,
                    col_scale,
                    in_rotation: in_rotation.filter(|_| out_keep.is_some()),
                    in_keep,
                    out_rotation,
                    out_keep,
                    shortcut: shortcut.map(|(a, b, keep_a, keep_b)| Shortcut {
                        a: a.unwrap_or_default(),
                        b: b.unwrap_or_default(),
                        keep_a,
                        keep_b,
                    }),
                    literal,
                    dtype: dtype.map(|d| d.parse::<FloatDtype>().unwrap()),
                }
            },
        )
}

proptest! {
    #![proptest_config(Config { cases: config().cases / 4 + 1, ..config() })]

    /// Any plan is either refused or executed; execution never panics and never exceeds the
    /// shapes validation promised.
    #[test]
    fn fuzz_plan(
        ops in proptest::collection::vec(op(), 0..4),
        f64_precision in any::<bool>(),
        budget in prop_oneof![0usize..4096, Just(usize::MAX / 2)],
        write in 0u8..8,
    ) {
        let owned = owned_arrays();
        let arrays: Arrays<'_> = owned
            .iter()
            .map(|(name, array)| {
                let data = match &array.data {
                    Ok(v) => ArrayData::F32(v),
                    Err(v) => ArrayData::F64(v),
                };
                (name.to_string(), ArrayRef { data, shape: array.shape.clone(), backing: Backing::Memory })
            })
            .collect();
        let precision = if f64_precision { Precision::F64 } else { Precision::F32 };
        let src = checkpoint_dir();
        if let Ok(outputs) = rewrite_tensors(src, &ops, &arrays, precision, budget, Some(1), &mut |_, _| Ok(())) {
            prop_assert_eq!(outputs.len(), ops.len());
        }
        if write == 0 {
            let out = tempfile::tempdir().unwrap();
            let target = out.path().join("out");
            let options = Options { memory_budget: budget, max_shard_size: 64, precision, threads: Some(1), ..Options::default() };
            let mut progress = |_: u64, _: u64| Ok(());
            let result = rewrite_checkpoint(src, &target, &ops, &arrays, &[], &options, &mut progress);
            // Success leaves exactly the output; failure leaves nothing at all.
            let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().flatten().map(|e| e.file_name()).collect();
            if result.is_ok() {
                prop_assert_eq!(left, vec![std::ffi::OsString::from("out")]);
            } else {
                prop_assert!(left.is_empty(), "left behind: {:?}", left);
            }
        }
    }
}
