//! Helpers shared by the integration tests: the session file's layout (`session_file.rs`: magic
//! and version in 12 bytes, the header's length, the JSON header, then the body and a checksum).
#![allow(dead_code)] // each test crate uses some of them

use std::path::Path;

/// A session file's JSON header, and the bytes after it (body and checksum).
pub fn session_header(bytes: &[u8]) -> (serde_json::Value, &[u8]) {
    let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[16..16 + header_len]).unwrap();
    (header, &bytes[16 + header_len..])
}

/// Write to `out` the session file at `path` with `edit` applied to its JSON header. The checksum
/// is left as it was: loading checks the header before it.
pub fn write_with_edited_header(
    path: &Path,
    out: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    let bytes = std::fs::read(path).unwrap();
    let (mut header, rest) = session_header(&bytes);
    edit(&mut header);
    let header = serde_json::to_vec(&header).unwrap();
    let mut edited = bytes[..12].to_vec();
    edited.extend_from_slice(&(header.len() as u32).to_le_bytes());
    edited.extend_from_slice(&header);
    edited.extend_from_slice(rest);
    std::fs::write(out, edited).unwrap();
}
