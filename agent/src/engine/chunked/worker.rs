//! The chunk workers of the pooled pass (`pool`): each takes the next job from one queue (chunk
//! sizes vary fourfold, so a fixed share per worker would leave some idle), decompresses a
//! fetched frame against its context or reads the bytes a slot should hold, checks them against
//! the chunk's signed sha256 and hands the result back with its buffers.

use super::read_verified;
use crate::bundle::chunked::{self, Window};
use flightnode_proto::chunks::Chunk;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

/// What a worker makes a chunk from.
pub(super) enum Input<'a> {
    /// The job's frame, fetched.
    Frame,
    /// The bytes a slot should hold at `offset`; `verify`: hash them (not yet done while
    /// planning).
    Local {
        file: &'a File,
        offset: u64,
        verify: bool,
    },
}

/// Chunk `i` to make: its bytes go to `out`, a recycled buffer.
pub(super) struct Job<'a> {
    pub(super) i: usize,
    pub(super) input: Input<'a>,
    pub(super) out: Vec<u8>,
    pub(super) frame: Vec<u8>,
}

pub(super) enum Outcome {
    /// `out` holds the chunk, checked against its sha256 (unless planning did).
    Verified,
    /// The slot did not hold the chunk (unreadable, or other bytes): fetch it.
    NotHeld,
    /// The frame does not decompress to the chunk.
    Invalid(chunked::ChunkError),
    /// A fault of the pass itself (a panic), not of the bundle.
    Failed(String),
}

/// A finished job, with its buffers back for reuse.
pub(super) struct Done {
    pub(super) i: usize,
    pub(super) out: Vec<u8>,
    pub(super) frame: Vec<u8>,
    pub(super) outcome: Outcome,
    /// Time the worker spent on it.
    pub(super) busy: Duration,
}

pub(super) fn local(file: &File, offset: u64, verify: bool) -> Input<'_> {
    Input::Local { file, offset, verify }
}

pub(super) fn work(
    jobs: &Mutex<Receiver<Job<'_>>>,
    done: &Sender<Done>,
    chunks: &[Chunk],
    window: Option<&RwLock<Window>>,
) {
    let mut dctx = chunked::decompressor();
    loop {
        // The lock is held only while waiting for the next job.
        let next = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(Job {
            i,
            input,
            mut out,
            frame,
        }) = next
        else {
            return;
        };
        let started = Instant::now();
        let c = &chunks[i];
        out.resize(c.size as usize, 0);
        let outcome = match input {
            Input::Frame => {
                // A panic would otherwise leave this thread waiting for a chunk no worker has.
                std::panic::catch_unwind(AssertUnwindSafe(|| {
                    decode(i, c, &frame, window, &mut out, &mut dctx)
                }))
                .unwrap_or_else(|_| {
                    dctx = chunked::decompressor();
                    Outcome::Failed(format!("decompressing chunk {i} panicked"))
                })
            }
            Input::Local { file, offset, verify } => {
                let held = if verify {
                    read_verified(file, offset, c, &mut out)
                } else {
                    file.read_exact_at(&mut out, offset).is_ok()
                };
                if held { Outcome::Verified } else { Outcome::NotHeld }
            }
        };
        let finished = Done {
            i,
            out,
            frame,
            outcome,
            busy: started.elapsed(),
        };
        if done.send(finished).is_err() {
            return;
        }
    }
}

fn decode(
    i: usize,
    c: &Chunk,
    frame: &[u8],
    window: Option<&RwLock<Window>>,
    out: &mut [u8],
    dctx: &mut zstd::zstd_safe::DCtx<'static>,
) -> Outcome {
    let decoded = match window {
        None => chunked::decompress(i, c, frame, &[], out, dctx),
        Some(window) => {
            let window = window.read().unwrap_or_else(PoisonError::into_inner);
            let Some(dict) = window.context(c) else {
                return Outcome::Failed(format!(
                    "chunk {i} was handed out before its context was in the window"
                ));
            };
            chunked::decompress(i, c, frame, dict, out, dctx)
        }
    };
    match decoded {
        Ok(()) => Outcome::Verified,
        Err(e) => Outcome::Invalid(e),
    }
}
