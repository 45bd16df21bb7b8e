//! The manifest dimcut writes into every output: each file's size and SHA-256, checked by
//! `dimcut verify`.

use crate::error::{io_error, Result};
use crate::shards::{sync_dir, write_at};
use std::fs::File;
use std::path::Path;

/// The manifest dimcut writes into every output: each file's size and SHA-256.
pub const MANIFEST_FILE: &str = "dimcut-manifest.json";
pub const MANIFEST_SCHEMA: &str = "dimcut.manifest/1";

/// Hashes every regular file of `dir` and writes the manifest (sorted by file name).
pub(crate) fn write_manifest(dir: &Path) -> Result<()> {
    use rayon::prelude::*;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != MANIFEST_FILE && entry.file_type().map_err(io_error(dir))?.is_file() {
            names.push(name);
        }
    }
    names.sort();
    let hashed: Vec<(String, u64, String)> = names
        .into_par_iter()
        .map(|name| {
            let path = dir.join(&name);
            let (size, sha) = hash_file(&path).map_err(io_error(&path))?;
            Ok((name, size, sha))
        })
        .collect::<Result<_>>()?;
    let files: serde_json::Map<String, serde_json::Value> = hashed
        .into_iter()
        .map(|(name, size, sha)| (name, serde_json::json!({"size": size, "sha256": sha})))
        .collect();
    let manifest = serde_json::json!({"schema": MANIFEST_SCHEMA, "files": files});
    let path = dir.join(MANIFEST_FILE);
    let text = serde_json::to_string_pretty(&manifest).expect("JSON values always serialize");
    let file = File::create(&path).map_err(io_error(&path))?;
    write_at(&file, text.as_bytes(), 0).map_err(io_error(&path))?;
    file.sync_all().map_err(io_error(&path))?;
    sync_dir(dir)
}

/// Size and hex SHA-256 of a file; also syncs it to disk.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    file.sync_all()?;
    let digest = hasher.finalize();
    Ok((size, digest.iter().map(|b| format!("{b:02x}")).collect()))
}
