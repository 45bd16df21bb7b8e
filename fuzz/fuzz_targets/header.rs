//! Any bytes as a whole safetensors file: our parser never panics, and accepts exactly what the
//! reference parser accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ours = dimcut::checkpoint::parse_header(data, 0);
    let reference = safetensors::SafeTensors::read_metadata(data);
    assert_eq!(ours.is_ok(), reference.is_ok(), "{:?}", ours.err());
    if let Ok(entries) = ours {
        let covered: usize = entries.iter().map(|(_, e)| e.range.len()).sum();
        assert!(entries.iter().all(|(_, e)| e.range.end <= data.len()));
        assert!(covered <= data.len());
    }
});
