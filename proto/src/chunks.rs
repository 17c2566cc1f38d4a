//! The chunk index (`chunks.idx`) of a chunked (format 2) bundle.
//!
//! Binary, little-endian: the 8-byte magic [`MAGIC`], then one [`RECORD_LEN`]-byte record per
//! chunk, in image order:
//!
//! | bytes | field         | meaning                                              |
//! |-------|---------------|------------------------------------------------------|
//! | 32    | `sha256`      | digest of the chunk's uncompressed bytes             |
//! | 8     | `offset`      | offset of the chunk in the image                     |
//! | 4     | `size`        | uncompressed length                                  |
//! | 8     | `data_offset` | offset of its zstd frame in the `chunks.zst` entry   |
//! | 4     | `data_len`    | length of that frame                                 |
//!
//! Offsets in `chunks.zst` are relative to that entry (the entry's place in the bundle depends
//! on the manifest's length, which depends on the index's digest). [`ChunkIndex::parse`] accepts
//! only an index that tiles the image exactly (each chunk starts where the previous one ended,
//! the last ends at `image.size`), whose frames lie inside `chunks.zst` in increasing order
//! without overlapping, and whose sizes respect the manifest's `max_size`: whatever a hostile
//! index says, a device reads, allocates and writes only within those bounds.

use crate::manifest::{ChunksInfo, ContextInfo};
pub use crate::manifest::{INDEX_MAGIC as MAGIC, INDEX_RECORD_LEN as RECORD_LEN, index_len};

/// [`RECORD_LEN`] as a `usize`, for slicing.
#[allow(clippy::cast_possible_truncation, reason = "56 fits every usize")]
const RECORD_BYTES: usize = RECORD_LEN as usize;

/// Largest zstd frame a chunk of `size` bytes may take: zstd's own compress bound
/// (`ZSTD_COMPRESSBOUND`) plus room for the frame header and checksum.
pub fn compressed_bound(size: u32) -> u64 {
    let size = u64::from(size);
    let small = if size < 128 * 1024 {
        (128 * 1024 - size) >> 11
    } else {
        0
    };
    size + (size >> 8) + small + 64
}

/// The image range `[start, end)` whose bytes are the zstd dictionary of the frame of the chunk
/// at image offset `offset` (see [`ContextInfo`]); empty (`start == end`) in the first segment.
pub fn context_range(offset: u64, context: &ContextInfo) -> (u64, u64) {
    let segment = u64::from(context.segment.max(1));
    let end = offset / segment * segment;
    (end.saturating_sub(u64::from(context.window)), end)
}

/// One chunk of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    /// sha256 of the uncompressed bytes.
    pub sha256: [u8; 32],
    /// Offset in the image.
    pub offset: u64,
    /// Uncompressed length.
    pub size: u32,
    /// Offset of its zstd frame in `chunks.zst`.
    pub data_offset: u64,
    /// Length of the frame.
    pub data_len: u32,
}

impl Chunk {
    /// End of the chunk in the image.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.size)
    }

    /// End of its frame in `chunks.zst`.
    pub fn data_end(&self) -> u64 {
        self.data_offset + u64::from(self.data_len)
    }
}

/// Why a chunk index is refused. Every message names the chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    /// The index is not `magic + count × record` bytes.
    #[error("chunk index is {len} bytes, expected {expected} for {count} chunks")]
    Length {
        /// Actual length.
        len: u64,
        /// Length for the manifest's count.
        expected: u64,
        /// The manifest's chunk count.
        count: u64,
    },
    /// The magic is wrong.
    #[error("chunk index does not start with {:?}", String::from_utf8_lossy(MAGIC))]
    Magic,
    /// A chunk does not start where the previous one ended: chunks overlap or leave a hole.
    #[error(
        "chunk {index} starts at image offset {offset}, expected {expected} (chunks overlap or leave a hole)"
    )]
    Overlap {
        /// Chunk number.
        index: usize,
        /// Its offset.
        offset: u64,
        /// Where the previous chunk ended.
        expected: u64,
    },
    /// A chunk's frame starts before the previous frame ended.
    #[error(
        "chunk {index} data at {data_offset} overlaps the previous chunk's data (ends at {previous_end})"
    )]
    DataOverlap {
        /// Chunk number.
        index: usize,
        /// Its frame offset.
        data_offset: u64,
        /// End of the previous frame.
        previous_end: u64,
    },
    /// A chunk's frame lies (partly) outside `chunks.zst`.
    #[error("chunk {index} data ends at {end}, outside the {data_size}-byte chunk data of the bundle")]
    OutsideBundle {
        /// Chunk number.
        index: usize,
        /// End of its frame.
        end: u64,
        /// Length of `chunks.zst`.
        data_size: u64,
    },
    /// A chunk is empty or larger than the manifest's `max_size`.
    #[error("chunk {index} is {size} bytes, not within 1..={max}")]
    Size {
        /// Chunk number.
        index: usize,
        /// Its size.
        size: u32,
        /// `max_size`.
        max: u32,
    },
    /// A frame is empty or longer than any frame of its chunk's size can be.
    #[error("chunk {index} data is {len} bytes, not within 1..={bound} for a {size}-byte chunk")]
    DataLen {
        /// Chunk number.
        index: usize,
        /// Frame length.
        len: u32,
        /// [`compressed_bound`] of the size.
        bound: u64,
        /// Chunk size.
        size: u32,
    },
    /// The chunks do not end at `image.size`.
    #[error("the chunks cover {end} bytes but the image has {image_size}")]
    Coverage {
        /// End of the last chunk.
        end: u64,
        /// `image.size`.
        image_size: u64,
    },
}

/// The parsed, checked index.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkIndex {
    /// The chunks in image order.
    pub chunks: Vec<Chunk>,
}

impl ChunkIndex {
    /// The binary form described in the module docs.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + self.chunks.len() * RECORD_BYTES);
        out.extend_from_slice(MAGIC);
        for c in &self.chunks {
            out.extend_from_slice(&c.sha256);
            out.extend_from_slice(&c.offset.to_le_bytes());
            out.extend_from_slice(&c.size.to_le_bytes());
            out.extend_from_slice(&c.data_offset.to_le_bytes());
            out.extend_from_slice(&c.data_len.to_le_bytes());
        }
        out
    }

    /// Decodes an index without checking it against a manifest (for a device's own cache).
    pub fn decode(bytes: &[u8]) -> Result<Self, IndexError> {
        let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or(IndexError::Magic)?;
        if !(body.len() as u64).is_multiple_of(RECORD_LEN) {
            let count = body.len() as u64 / RECORD_LEN;
            return Err(IndexError::Length {
                len: bytes.len() as u64,
                expected: index_len(count).unwrap_or(0),
                count,
            });
        }
        let chunks = body
            .chunks_exact(RECORD_BYTES)
            .map(|r| {
                let u64_at = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().unwrap_or([0; 8]));
                let u32_at = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().unwrap_or([0; 4]));
                let mut sha256 = [0u8; 32];
                sha256.copy_from_slice(&r[..32]);
                Chunk {
                    sha256,
                    offset: u64_at(32),
                    size: u32_at(40),
                    data_offset: u64_at(44),
                    data_len: u32_at(52),
                }
            })
            .collect();
        Ok(Self { chunks })
    }

    /// Decodes and checks an index against its (already authenticated) manifest section.
    pub fn parse(bytes: &[u8], image_size: u64, info: &ChunksInfo) -> Result<Self, IndexError> {
        let expected = index_len(info.count).unwrap_or(u64::MAX);
        if bytes.len() as u64 != expected {
            return Err(IndexError::Length {
                len: bytes.len() as u64,
                expected,
                count: info.count,
            });
        }
        let index = Self::decode(bytes)?;
        let mut end = 0u64;
        let mut data_end = 0u64;
        for (i, c) in index.chunks.iter().enumerate() {
            if c.size == 0 || c.size > info.max_size {
                return Err(IndexError::Size {
                    index: i,
                    size: c.size,
                    max: info.max_size,
                });
            }
            let bound = compressed_bound(c.size);
            if c.data_len == 0 || u64::from(c.data_len) > bound {
                return Err(IndexError::DataLen {
                    index: i,
                    len: c.data_len,
                    bound,
                    size: c.size,
                });
            }
            if c.offset != end {
                return Err(IndexError::Overlap {
                    index: i,
                    offset: c.offset,
                    expected: end,
                });
            }
            if c.data_offset < data_end {
                return Err(IndexError::DataOverlap {
                    index: i,
                    data_offset: c.data_offset,
                    previous_end: data_end,
                });
            }
            let frame_end = c.data_offset.checked_add(u64::from(c.data_len));
            match frame_end {
                Some(fe) if fe <= info.data_size => data_end = fe,
                _ => {
                    return Err(IndexError::OutsideBundle {
                        index: i,
                        end: frame_end.unwrap_or(u64::MAX),
                        data_size: info.data_size,
                    });
                }
            }
            end = c.end();
        }
        if end != image_size {
            return Err(IndexError::Coverage { end, image_size });
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(count: u64, data_size: u64) -> ChunksInfo {
        ChunksInfo {
            chunker: crate::manifest::CHUNKER.into(),
            min_size: 64,
            avg_size: 256,
            max_size: 256,
            compression: crate::manifest::COMPRESSION.into(),
            count,
            index_size: index_len(count).unwrap(),
            index_sha256: "00".repeat(32),
            data_size,
            context: None,
        }
    }

    fn chunk(offset: u64, size: u32, data_offset: u64, data_len: u32) -> Chunk {
        Chunk {
            sha256: [offset.to_le_bytes()[0]; 32],
            offset,
            size,
            data_offset,
            data_len,
        }
    }

    type Case = (Vec<Chunk>, u64, fn(&IndexError) -> bool);

    #[test]
    fn round_trips_and_checks_every_bound() {
        let good = ChunkIndex {
            chunks: vec![chunk(0, 200, 0, 50), chunk(200, 100, 50, 40)],
        };
        let bytes = good.encode();
        assert_eq!(bytes.len() as u64, index_len(2).unwrap());
        assert_eq!(ChunkIndex::parse(&bytes, 300, &info(2, 90)).unwrap(), good);

        let cases: Vec<Case> = vec![
            (vec![chunk(0, 200, 0, 50), chunk(150, 150, 50, 40)], 90, |e| {
                matches!(e, IndexError::Overlap { index: 1, .. })
            }),
            (vec![chunk(0, 200, 0, 50), chunk(200, 100, 40, 40)], 90, |e| {
                matches!(e, IndexError::DataOverlap { index: 1, .. })
            }),
            (vec![chunk(0, 200, 0, 50), chunk(200, 100, 60, 40)], 90, |e| {
                matches!(e, IndexError::OutsideBundle { index: 1, .. })
            }),
            (
                vec![chunk(0, 200, 0, 50), chunk(200, 100, u64::MAX - 5, 40)],
                90,
                |e| matches!(e, IndexError::OutsideBundle { .. }),
            ),
            (vec![chunk(0, 300, 0, 50)], 50, |e| {
                matches!(e, IndexError::Size { .. })
            }),
            (vec![chunk(0, 200, 0, 5000)], 5000, |e| {
                matches!(e, IndexError::DataLen { .. })
            }),
            (vec![chunk(0, 200, 0, 50)], 50, |e| {
                matches!(e, IndexError::Coverage { .. })
            }),
        ];
        for (chunks, data_size, expect) in cases {
            let n = chunks.len() as u64;
            let idx = ChunkIndex { chunks };
            let err = ChunkIndex::parse(&idx.encode(), 300, &info(n, data_size)).unwrap_err();
            assert!(expect(&err), "{err}");
        }
        let err = ChunkIndex::parse(&bytes[..bytes.len() - 1], 300, &info(2, 90)).unwrap_err();
        assert!(matches!(err, IndexError::Length { .. }), "{err}");
    }

    #[test]
    fn context_is_the_window_before_the_segment() {
        let c = ContextInfo {
            window: 1000,
            segment: 4096,
        };
        assert_eq!(context_range(0, &c), (0, 0));
        assert_eq!(context_range(4095, &c), (0, 0));
        assert_eq!(context_range(4096, &c), (3096, 4096));
        assert_eq!(context_range(10_000, &c), (7192, 8192));
        let wide = ContextInfo {
            window: 1 << 20,
            segment: 4096,
        };
        assert_eq!(context_range(8192, &wide), (0, 8192));
    }
}
