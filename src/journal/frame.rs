//! The journal's on-disk form, pure: an entry is a frame
//!
//! ```text
//! len: u32 LE | crc32: u32 LE | body (len bytes)
//! body = op: u8 (1 put, 2 delete) | space: u8 | key_len: u16 LE | key | [value_len: u32 LE | value]
//! ```
//!
//! Why this form: each frame carries its own length and checksum, so
//! reading stops at the first frame that is cut short or damaged and keeps
//! everything before it; a put or delete is absolute (replaying it twice
//! leaves the same state), so a snapshot plus any suffix of the journal
//! replays right; and nothing is parsed on recovery but the frames (a
//! record's JSON is kept as the bytes it was).

use std::sync::Arc;

use bytes::Bytes;

/// What a key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// The snapshot's own facts (which journals it covers).
    Meta = 0,
    /// Registry records, by name (the value: who wrote it, then the record
    /// as published; see `registry::state::persist`).
    Records = 1,
    /// Retained messages on the bus, by topic (the value: see
    /// `bus::router::message::stored_head`).
    Retained = 2,
}

/// One change. Keys and values are shared with what the registry and the
/// router hold (the journal's copy of the state costs no payload twice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        space: Space,
        key: Arc<str>,
        value: Value,
    },
    Delete {
        space: Space,
        key: Arc<str>,
    },
}

/// A value in two parts, written one after the other: a small head of the
/// journal's own (an owner, a message's properties) and a body shared with
/// its holder (a payload). Read back, it is one body.
#[derive(Debug, Clone, Default)]
pub struct Value {
    pub head: Bytes,
    pub body: Bytes,
}

impl Value {
    pub fn whole(body: Bytes) -> Value {
        Value {
            head: Bytes::new(),
            body,
        }
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Head and body as one.
    pub fn to_bytes(&self) -> Bytes {
        if self.head.is_empty() {
            return self.body.clone();
        }
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.body);
        Bytes::from(v)
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        self.to_bytes() == other.to_bytes()
    }
}

impl Eq for Value {}

const PUT: u8 = 1;
const DELETE: u8 = 2;
const HEADER: usize = 8;

/// The largest body read back (a larger length is damage, not an entry):
/// above the largest payload a client may publish (256 MiB).
pub const MAX_BODY: usize = 320 << 20;

/// Appends `op`'s frame to `out`.
pub fn encode(op: &Op, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    let (code, space, key, value) = match op {
        Op::Put { space, key, value } => (PUT, space, key, Some(value)),
        Op::Delete { space, key } => (DELETE, space, key, None),
    };
    out.push(code);
    out.push(*space as u8);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    if let Some(v) = value {
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(&v.head);
        out.extend_from_slice(&v.body);
    }
    let body_len = (out.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What reading a journal's bytes found.
#[derive(Debug, PartialEq, Eq)]
pub struct Read {
    pub ops: Vec<Op>,
    /// Bytes of whole, intact frames (the file is cut back to this).
    pub intact: usize,
    /// Bytes after them that could not be read (a torn or damaged tail).
    pub lost_bytes: usize,
    /// Frames whose length could still be read in that tail: the entries
    /// lost, at least.
    pub lost_entries: usize,
}

/// Reads frames until the first that is cut short or damaged.
pub fn decode(bytes: &[u8]) -> Read {
    let mut ops = Vec::new();
    let mut at = 0;
    while let Some((op, len)) = frame_at(&bytes[at..]) {
        ops.push(op);
        at += len;
    }
    Read {
        ops,
        intact: at,
        lost_bytes: bytes.len() - at,
        lost_entries: count_lost(&bytes[at..]),
    }
}

/// The frames that seem to start in a damaged tail (by their lengths).
fn count_lost(mut tail: &[u8]) -> usize {
    let mut n = 0;
    while !tail.is_empty() {
        n += 1;
        let Some(len) = tail
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
        else {
            break;
        };
        if len > MAX_BODY || HEADER + len > tail.len() {
            break;
        }
        tail = &tail[HEADER + len..];
    }
    n
}

fn frame_at(b: &[u8]) -> Option<(Op, usize)> {
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
    if len > MAX_BODY {
        return None;
    }
    let body = b.get(HEADER..HEADER + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some((body_op(body)?, HEADER + len))
}

fn body_op(body: &[u8]) -> Option<Op> {
    let (&code, rest) = body.split_first()?;
    let (&space, rest) = rest.split_first()?;
    let space = match space {
        0 => Space::Meta,
        1 => Space::Records,
        2 => Space::Retained,
        _ => return None,
    };
    let klen = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let key: Arc<str> = std::str::from_utf8(rest.get(2..2 + klen)?).ok()?.into();
    let rest = &rest[2 + klen..];
    match code {
        PUT => {
            let vlen = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let value = rest.get(4..4 + vlen)?;
            (rest.len() == 4 + vlen).then(|| Op::Put {
                space,
                key,
                value: Value::whole(Bytes::copy_from_slice(value)),
            })
        }
        DELETE => rest.is_empty().then_some(Op::Delete { space, key }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn put(key: &str, value: &str) -> Op {
        Op::Put {
            space: Space::Records,
            key: key.into(),
            value: Value {
                head: Bytes::from_static(b"h"),
                body: Bytes::from(value.to_string()),
            },
        }
    }

    fn del(key: &str) -> Op {
        Op::Delete {
            space: Space::Retained,
            key: key.into(),
        }
    }

    fn encoded(ops: &[Op]) -> Vec<u8> {
        let mut out = Vec::new();
        for op in ops {
            encode(op, &mut out);
        }
        out
    }

    #[test]
    fn frames_round_trip() {
        let ops = vec![put("web", r#"{"host":"h"}"#), del("a/b"), put("", "")];
        let bytes = encoded(&ops);
        let read = decode(&bytes);
        assert_eq!(read.ops, ops);
        assert_eq!(
            (read.intact, read.lost_bytes, read.lost_entries),
            (bytes.len(), 0, 0)
        );
    }

    #[test]
    fn a_torn_tail_loses_only_its_own_entries() {
        let ops: Vec<Op> = (0..10).map(|i| put(&format!("n{i}"), "{}")).collect();
        let bytes = encoded(&ops);
        let cut = &bytes[..bytes.len() - 3];
        let read = decode(cut);
        assert_eq!(read.ops, ops[..9]);
        assert_eq!(read.lost_entries, 1);
        assert_eq!(read.intact + read.lost_bytes, cut.len());
    }

    #[test]
    fn a_damaged_frame_stops_the_reading_and_counts_what_follows() {
        let ops: Vec<Op> = (0..10).map(|i| put(&format!("n{i}"), "{}")).collect();
        let mut bytes = encoded(&ops);
        let one = bytes.len() / 10;
        bytes[one * 4 + 10] ^= 0xff; // inside the fifth frame's body
        let read = decode(&bytes);
        assert_eq!(read.ops, ops[..4]);
        assert_eq!(
            read.lost_entries, 6,
            "the damaged one and the five after it"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Any bytes: a prefix of whole frames, never a panic.
        #[test]
        fn any_bytes_decode_to_an_intact_prefix(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let read = decode(&bytes);
            prop_assert_eq!(read.intact + read.lost_bytes, bytes.len());
            prop_assert_eq!(decode(&bytes[..read.intact]).ops, read.ops);
        }
    }
}
