//! Exec output (pure): capped capture for buffered answers, and UTF-8-safe chunking for
//! streamed ones. Output that is not UTF-8 comes back intact as base64, never mangled.

use base64::Engine as _;
use serde::Serialize;

/// How a text field carries bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum Encoding {
    #[serde(rename = "utf-8")]
    Utf8,
    #[serde(rename = "base64")]
    Base64,
}

/// Bytes as text: UTF-8 when they are, else base64.
pub fn encode(bytes: &[u8]) -> (String, Encoding) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), Encoding::Utf8),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            Encoding::Base64,
        ),
    }
}

/// One stream's output, kept up to a limit; the rest is counted and dropped.
#[derive(Debug)]
pub struct Capture {
    limit: usize,
    kept: Vec<u8>,
    seen: u64,
}

impl Capture {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            kept: Vec::new(),
            seen: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        let room = self.limit.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    pub fn truncated(&self) -> bool {
        self.seen > self.kept.len() as u64
    }

    /// All bytes the stream produced, kept or not.
    pub fn total_bytes(&self) -> u64 {
        self.seen
    }

    /// The kept bytes as text. A cut that split a UTF-8 character drops the partial
    /// character rather than turning the whole output into base64.
    pub fn finish(mut self) -> (String, Encoding) {
        if self.truncated() {
            if let Err(e) = std::str::from_utf8(&self.kept) {
                if e.error_len().is_none() {
                    self.kept.truncate(e.valid_up_to());
                }
            }
        }
        encode(&self.kept)
    }
}

/// Splits a byte stream into chunks that never cut a UTF-8 character in two: an incomplete
/// character at a chunk's end waits for the next chunk. Bytes that are not UTF-8 at all
/// pass through (they are sent as base64).
#[derive(Debug, Default)]
pub struct Utf8Chunker {
    carry: Vec<u8>,
}

impl Utf8Chunker {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(bytes);
        if let Err(e) = std::str::from_utf8(&buf) {
            // Only an incomplete (not an invalid) tail is held back, at most 3 bytes.
            if e.error_len().is_none() && buf.len() - e.valid_up_to() <= 3 {
                self.carry = buf.split_off(e.valid_up_to());
            }
        }
        buf
    }

    /// What is left at the end of the stream.
    pub fn finish(self) -> Vec<u8> {
        self.carry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_up_to_the_limit_and_counts_the_rest() {
        let mut c = Capture::new(5);
        c.push(b"hello ");
        c.push(b"world");
        assert!(c.truncated());
        assert_eq!(c.total_bytes(), 11);
        assert_eq!(c.finish(), ("hello".to_string(), Encoding::Utf8));
    }

    #[test]
    fn invalid_utf8_comes_back_as_base64_and_a_split_character_is_dropped() {
        let mut c = Capture::new(100);
        c.push(&[0xff, 0x00, b'a']);
        assert_eq!(c.finish(), ("/wBh".to_string(), Encoding::Base64));
        let mut c = Capture::new(2);
        c.push("aé".as_bytes()); // 'é' is two bytes; the cut falls inside it
        assert_eq!(c.finish(), ("a".to_string(), Encoding::Utf8));
    }

    #[test]
    fn the_chunker_never_splits_a_character() {
        let mut ch = Utf8Chunker::default();
        let euro = "€".as_bytes(); // three bytes
        assert_eq!(ch.push(&[b'x', euro[0]]), b"x");
        assert_eq!(ch.push(&euro[1..]), euro);
        assert_eq!(ch.push(&[0xff]), vec![0xff]);
        assert!(ch.finish().is_empty());
    }
}
