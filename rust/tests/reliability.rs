//! Hostile inputs and output safety of the engine (the Python suite covers the command line).

use dimcut::checkpoint::parse_header;
use dimcut::manifest::MANIFEST_FILE;
use dimcut::{rewrite_checkpoint, Arrays, DimcutError, Options, TensorOp};
use serde_json::json;
use std::path::Path;

fn file_with(header: serde_json::Value, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(&header).unwrap();
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&text);
    file.extend_from_slice(data);
    file
}

fn error_of(file: &[u8]) -> String {
    parse_header(file, 0).unwrap_err()
}

#[test]
fn header_errors_name_the_problem_and_the_tensor() {
    let mut long = file_with(json!({}), &[]);
    long[..8].copy_from_slice(&1000u64.to_le_bytes());
    assert!(
        error_of(&long).contains("larger than the file"),
        "{}",
        error_of(&long)
    );
    let mut huge = file_with(json!({}), &[]);
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(error_of(&huge).contains("limit"));

    let mut not_json = b"\x05\0\0\0\0\0\0\0{oops".to_vec();
    not_json.extend_from_slice(&[0; 4]);
    assert!(error_of(&not_json).contains("not valid JSON"));

    let f32 = |a: usize, b: usize, shape: &[usize]| json!({"dtype": "F32", "shape": shape, "data_offsets": [a, b]});
    let overlap = file_with(
        json!({"a": f32(0, 8, &[2]), "b": f32(4, 12, &[2])}),
        &[0; 12],
    );
    let message = error_of(&overlap);
    assert!(
        message.contains("overlap") && message.contains("\"a\"") && message.contains("\"b\""),
        "{message}"
    );
    let gap = file_with(
        json!({"a": f32(0, 4, &[1]), "b": f32(8, 12, &[1])}),
        &[0; 12],
    );
    assert!(error_of(&gap).contains("gap of 4 bytes between tensors \"a\" and \"b\""));
    let wrong = file_with(json!({"w": f32(0, 12, &[2, 2])}), &[0; 12]);
    let message = error_of(&wrong);
    assert!(
        message.contains("\"w\"") && message.contains("needs 16"),
        "{message}"
    );
    let truncated = file_with(json!({"w": f32(0, 16, &[2, 2])}), &[0; 10]);
    assert!(error_of(&truncated).contains("truncated"));
    let trailing = file_with(json!({"w": f32(0, 4, &[1])}), &[0; 10]);
    assert!(error_of(&trailing).contains("trailing"));
    let overflow = file_with(json!({"w": f32(0, 4, &[1 << 40, 1 << 40])}), &[0; 4]);
    assert!(error_of(&overflow).contains("overflows"));
}

fn write_checkpoint(dir: &Path, values: &[f32]) {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let header =
        json!({"w": {"dtype": "F32", "shape": [values.len()], "data_offsets": [0, data.len()]}});
    std::fs::write(dir.join("model.safetensors"), file_with(header, &data)).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
}

fn copy_op() -> Vec<TensorOp> {
    vec![TensorOp {
        name: "w".into(),
        source: Some("w".into()),
        dtype: Some(dimcut::FloatDtype::F32),
        ..TensorOp::default()
    }]
}

fn run(src: &Path, out: &Path, overwrite: bool) -> dimcut::Result<dimcut::Stats> {
    let options = Options {
        overwrite,
        threads: Some(1),
        ..Options::default()
    };
    let mut progress = |_: u64, _: u64| Ok(());
    rewrite_checkpoint(
        src,
        out,
        &copy_op(),
        &Arrays::new(),
        &[],
        &options,
        &mut progress,
    )
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn non_finite_weights_are_refused_and_nothing_is_left() {
    let src = tempfile::tempdir().unwrap();
    write_checkpoint(src.path(), &[1.0, f32::NAN, 2.0]);
    let parent = tempfile::tempdir().unwrap();
    let err = run(src.path(), &parent.path().join("out"), false).unwrap_err();
    assert!(
        matches!(err, DimcutError::NonFinite { ref tensor, .. } if tensor == "w"),
        "{err}"
    );
    assert!(listing(parent.path()).is_empty());
    write_checkpoint(src.path(), &[1.0, f32::NEG_INFINITY]);
    assert!(run(src.path(), &parent.path().join("out"), false).is_err());
}

#[test]
fn outputs_carry_a_manifest_of_sha256() {
    let src = tempfile::tempdir().unwrap();
    write_checkpoint(src.path(), &[1.0, 2.0]);
    // A manifest in the source (an earlier output) must not be copied over the new one.
    std::fs::write(src.path().join(MANIFEST_FILE), "stale").unwrap();
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("out");
    run(src.path(), &out, false).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest["schema"], "dimcut.manifest/1");
    let files = manifest["files"].as_object().unwrap();
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["config.json", "model.safetensors"]
    );
    let (size, sha) = dimcut::manifest::hash_file(&out.join("model.safetensors")).unwrap();
    assert_eq!(files["model.safetensors"]["sha256"], sha.as_str());
    assert_eq!(files["model.safetensors"]["size"], size);
    assert_eq!(listing(parent.path()), ["out"]);
}

#[test]
fn a_locked_output_is_refused_and_stale_temporaries_are_removed() {
    let src = tempfile::tempdir().unwrap();
    write_checkpoint(src.path(), &[1.0]);
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("out");
    // What a SIGKILLed run leaves: a temporary directory of a dead process, and its lock file.
    let stale = parent.path().join(".out.dimcut-tmp-999999999-abc");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), "partial").unwrap();
    let live = parent
        .path()
        .join(format!(".out.dimcut-tmp-{}-x", std::process::id()));
    std::fs::create_dir(&live).unwrap();

    let lock_path = parent.path().join(".out.dimcut-lock");
    let holder = std::fs::File::create(&lock_path).unwrap();
    holder.lock().unwrap();
    let err = run(src.path(), &out, false).unwrap_err();
    assert!(matches!(err, DimcutError::OutputBusy(_)), "{err}");
    assert!(!out.exists());
    drop(holder);

    run(src.path(), &out, false).unwrap();
    assert!(
        !stale.exists(),
        "the dead run's temporary directory is cleaned up"
    );
    assert!(live.exists(), "ours (a live pid) is not touched");
    std::fs::remove_dir(&live).unwrap();
    assert_eq!(
        listing(parent.path()),
        ["out"],
        "the lock file is removed too"
    );

    // Overwriting swaps the directories atomically and removes the old one.
    std::fs::write(out.join("marker"), "old").unwrap();
    run(src.path(), &out, true).unwrap();
    assert!(!out.join("marker").exists());
    assert_eq!(listing(parent.path()), ["out"]);
    assert!(matches!(
        run(src.path(), &out, false),
        Err(DimcutError::OutputExists(_))
    ));
}
