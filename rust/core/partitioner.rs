//! Built-in partitioners, computed in Rust without touching Python.

use sha2::{Digest, Sha256};

/// A partitioner that depends on the origin stream name only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinPartitioner {
    /// depeche-db's `StreamNamePartitioner`: the first two bytes of sha256(stream),
    /// little endian (0..=65535).
    StreamName,
    /// The first eight bytes of sha256(stream), little endian, modulo `n`.
    HashMod(u32),
}

impl BuiltinPartitioner {
    /// The partition of a message of `stream`.
    #[must_use]
    pub fn partition(self, stream: &str) -> i64 {
        let digest = Sha256::digest(stream.as_bytes());
        match self {
            BuiltinPartitioner::StreamName => i64::from(u16::from_le_bytes([digest[0], digest[1]])),
            BuiltinPartitioner::HashMod(n) => {
                let mut head = [0u8; 8];
                head.copy_from_slice(&digest[..8]);
                (u64::from_le_bytes(head) % u64::from(n.max(1))) as i64
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_name_matches_depeche_db() {
        // int.from_bytes(hashlib.sha256(b"account-1").digest()[:2], "little")
        let expected = {
            let d = Sha256::digest(b"account-1");
            i64::from(d[0]) + 256 * i64::from(d[1])
        };
        assert_eq!(
            BuiltinPartitioner::StreamName.partition("account-1"),
            expected
        );
        // sha256("") starts with e3 b0 -> 0xb0e3
        assert_eq!(BuiltinPartitioner::StreamName.partition(""), 0xb0e3);
    }

    #[test]
    fn hash_mod_is_in_range_and_stable() {
        let p = BuiltinPartitioner::HashMod(7);
        for i in 0..1000 {
            let s = format!("stream-{i}");
            let a = p.partition(&s);
            assert!((0..7).contains(&a));
            assert_eq!(a, p.partition(&s));
        }
        assert_eq!(BuiltinPartitioner::HashMod(1).partition("x"), 0);
    }
}
