//! Any bytes as a `model.safetensors.index.json`: never panics; shard names stay bare names.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(map) = dimcut::checkpoint::parse_index(data) {
        for file in map.values() {
            assert!(dimcut::checkpoint::is_plain_file_name(file));
        }
    }
});
