//! The pooled pass of a chunked install (`download.chunk_workers` > 1): workers (`worker`)
//! decompress the fetched frames and read the chunks a slot holds, and check every chunk against
//! its signed sha256, so the cores of a companion computer share what one thread does in the
//! inline pass.
//!
//! This thread keeps the pass's order: it fetches the frames (while the workers decompress the
//! chunks before them), takes the results in whatever order they come and hands them on to the
//! writer in image order, each only once it is verified and every chunk before it is.
//!
//! A frame is decompressed against its context, the image bytes before its segment, so it goes
//! to a worker only once every chunk before its segment is in the window: the chunks of one
//! segment decompress in parallel (about four at the default 256 KiB segment and 64 KiB chunks),
//! and the next segment's frames are fetched meanwhile. The window is behind a lock that the
//! workers read while decompressing and this thread takes to add the chunks in order; adding a
//! chunk drops only bytes before its own context, which no later chunk needs.
//!
//! A chunk's error is reported when the pass reaches it in image order, so the first bad chunk is
//! named and every chunk before it reaches the slot, as in the inline pass. Memory on top of the
//! inline pass: at most [`IN_FLIGHT_PER_WORKER`] × workers chunks (at least [`MIN_IN_FLIGHT`])
//! with their frames between this thread and the window.

use super::worker::{Done, Input, Job, Outcome, local, work};
use super::{Inputs, Plan, Run, Sink, Tally, Times, chunk_stop, interrupt, timed};
use crate::bundle::chunked::{self, Window};
use crate::engine::{Engine, Stop};
use flightnode_proto::ErrorCode;
use flightnode_proto::chunks::context_range;
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Mutex, PoisonError, RwLock, RwLockWriteGuard, TryLockError};
use std::time::Duration;

/// Chunks handed out per worker and not yet passed on: enough that a worker finds the next job
/// waiting while this thread fetches, few enough that memory stays a few chunks per worker.
const IN_FLIGHT_PER_WORKER: usize = 4;
/// Chunks handed out at least, whatever the workers.
const MIN_IN_FLIGHT: usize = 8;

/// Where a chunk's bytes come from, for where they go and the tally.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The target slot holds it: hashed, not written.
    Kept,
    /// From the running slot.
    Copied,
    /// Fetched and decompressed.
    Fetched,
}

/// A chunk between being handed out and being passed on.
enum Pending {
    /// With a worker.
    Busy(Kind),
    /// Verified; passed on once every chunk before it is.
    Ready(Vec<u8>, Kind),
    /// The slot did not hold it after all: fetched when the pass reaches it.
    NotHeld,
    Invalid(chunked::ChunkError),
    Failed(String),
}

/// Fetches chunk `i`'s frame into the buffer.
type Fetch<'f> = dyn FnMut(usize, &mut Vec<u8>) -> Result<(), Stop> + 'f;

fn internal(message: String) -> Stop {
    Stop::Upgrade(ErrorCode::Internal, message)
}

/// The order-keeping side of the pooled pass (see the module docs).
struct Pass<'s> {
    at: &'s Inputs<'s>,
    /// The image bytes frames refer to; `None` for independent frames.
    window: Option<&'s RwLock<Window>>,
    jobs: Sender<Job<'s>>,
    done: Receiver<Done>,
    /// Chunks `[base, base + held.len())`: handed out, not yet passed on to the writer and
    /// the window.
    held: VecDeque<Pending>,
    base: usize,
    /// Jobs with a worker.
    busy: usize,
    cap: usize,
    spare: Vec<Vec<u8>>,
    spare_frames: Vec<Vec<u8>>,
    /// For a chunk the slot did not hold after all, decompressed on this thread.
    dctx: zstd::zstd_safe::DCtx<'static>,
    sink: Sink,
    tally: Tally,
    times: Times,
}

impl<'s> Pass<'s> {
    fn new(
        at: &'s Inputs<'s>,
        window: Option<&'s RwLock<Window>>,
        jobs: Sender<Job<'s>>,
        done: Receiver<Done>,
        workers: usize,
        sink: Sink,
        tally: Tally,
    ) -> Self {
        let cap = (IN_FLIGHT_PER_WORKER * workers).max(MIN_IN_FLIGHT);
        Self {
            at,
            window,
            jobs,
            done,
            held: VecDeque::with_capacity(cap),
            base: 0,
            busy: 0,
            cap,
            spare: Vec::new(),
            spare_frames: Vec::new(),
            dctx: chunked::decompressor(),
            sink,
            tally,
            times: Times::default(),
        }
    }

    /// Chunk `i`, the next in image order: to a worker, with its frame fetched first when the
    /// plan fetches it.
    fn next(&mut self, i: usize, fetch: &mut Fetch<'_>) -> Result<(), Stop> {
        while self.held.len() >= self.cap {
            self.settle(true, Some(&mut *fetch))?;
        }
        let at = self.at;
        let c = &at.chunks[i];
        let (input, kind) = match at.plan[i] {
            // Hashed while planning; the image's sha256 at the end covers it again.
            Plan::Held => (local(at.existing, c.offset, false), Kind::Kept),
            Plan::Target => (local(at.existing, c.offset, true), Kind::Kept),
            Plan::Running(offset) => {
                let Some(file) = at.running_file else {
                    self.held.push_back(Pending::NotHeld);
                    return self.settle(false, Some(&mut *fetch));
                };
                (local(file, offset, true), Kind::Copied)
            }
            Plan::Fetch => (Input::Frame, Kind::Fetched),
        };
        let mut frame = self.spare_frames.pop().unwrap_or_default();
        if matches!(input, Input::Frame) {
            fetch(i, &mut frame)?;
            let needs = at.info.context.map_or(0, |ctx| context_range(c.offset, &ctx).1);
            while self.passed_on() < needs {
                self.settle(true, Some(&mut *fetch))?;
            }
        }
        self.held.push_back(Pending::Busy(kind));
        let job = Job {
            i,
            input,
            out: self.spare.pop().unwrap_or_default(),
            frame,
        };
        self.busy += 1;
        self.jobs
            .send(job)
            .map_err(|_| internal("the chunk workers stopped".into()))?;
        self.settle(false, Some(fetch))
    }

    /// Image offset up to which chunks are passed on (in the window).
    fn passed_on(&self) -> u64 {
        self.at.chunks.get(self.base).map_or(u64::MAX, |c| c.offset)
    }

    /// Takes what the workers finished and passes on what is next in order; with `block`,
    /// waits for a worker when nothing moved (the next chunk is with one, or one holds the
    /// window). Without `fetch`, stops at a chunk that is not verified instead of fetching it or
    /// failing.
    fn settle(&mut self, block: bool, fetch: Option<&mut Fetch<'_>>) -> Result<(), Stop> {
        while let Ok(done) = self.done.try_recv() {
            self.take(done)?;
        }
        let moved = self.pass_on(fetch)?;
        if block && !moved {
            self.wait_one()?;
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<(), Stop> {
        if self.busy == 0 {
            return Err(internal(format!(
                "waiting at chunk {} for a chunk no worker has",
                self.base
            )));
        }
        let done = timed(&mut self.times.waiting, || self.done.recv())
            .map_err(|_| internal("the chunk workers stopped".into()))?;
        self.take(done)
    }

    fn take(&mut self, done: Done) -> Result<(), Stop> {
        let lost = || internal(format!("chunk {} came back unasked", done.i));
        let Some(slot) = done.i.checked_sub(self.base).and_then(|k| self.held.get_mut(k)) else {
            return Err(lost());
        };
        let Pending::Busy(kind) = *slot else {
            return Err(lost());
        };
        self.busy -= 1;
        self.times.decoding += done.busy;
        self.spare_frames.push(done.frame);
        *slot = match done.outcome {
            Outcome::Verified => Pending::Ready(done.out, kind),
            Outcome::NotHeld => {
                self.spare.push(done.out);
                Pending::NotHeld
            }
            Outcome::Invalid(e) => {
                self.spare.push(done.out);
                Pending::Invalid(e)
            }
            Outcome::Failed(message) => {
                self.spare.push(done.out);
                Pending::Failed(message)
            }
        };
        Ok(())
    }

    /// Passes the verified chunks next in image order on to the window and the writer. A chunk
    /// the slot did not hold is fetched and decompressed here; a bad one ends the pass. Stops
    /// while a worker reads the window rather than wait for it: a worker that lets go of it
    /// hands back a chunk, which `settle` waits for, and waiting for the lock instead would keep
    /// the other workers from it too. True when any chunk moved.
    fn pass_on(&mut self, mut fetch: Option<&mut Fetch<'_>>) -> Result<bool, Stop> {
        let mut moved = false;
        loop {
            match self.held.front() {
                None | Some(Pending::Busy(_)) => break,
                Some(Pending::Ready(..)) => {}
                Some(Pending::NotHeld | Pending::Invalid(_) | Pending::Failed(_)) => {
                    let Some(fetch) = fetch.as_deref_mut() else {
                        break;
                    };
                    match self.held.pop_front() {
                        Some(Pending::NotHeld) => {
                            let bytes = self.refetch(fetch)?;
                            self.held.push_front(Pending::Ready(bytes, Kind::Fetched));
                        }
                        Some(Pending::Invalid(e)) => return Err(chunk_stop(e)),
                        Some(Pending::Failed(message)) => return Err(internal(message)),
                        _ => return Err(internal("the chunk pass lost its order".into())),
                    }
                }
            }
            let window = match self.window {
                None => None,
                Some(w) => match w.try_write() {
                    Ok(guard) => Some(guard),
                    Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                    Err(TryLockError::WouldBlock) => break,
                },
            };
            let Some(Pending::Ready(bytes, kind)) = self.held.pop_front() else {
                return Err(internal("the chunk pass lost its order".into()));
            };
            self.push(window, &bytes, kind)?;
            self.spare.push(bytes);
            moved = true;
        }
        Ok(moved)
    }

    /// Chunk `base`, verified, to the window (through its lock, if any) and the writer.
    fn push(
        &mut self,
        window: Option<RwLockWriteGuard<'_, Window>>,
        bytes: &[u8],
        kind: Kind,
    ) -> Result<(), Stop> {
        let c = &self.at.chunks[self.base];
        if let Some(mut window) = window {
            window.append(c, bytes);
        }
        match kind {
            Kind::Kept => self.tally.kept += u64::from(c.size),
            Kind::Copied => self.tally.copied += u64::from(c.size),
            Kind::Fetched => {
                self.tally.fetched += u64::from(c.data_len);
                self.tally.fetched_chunks += 1;
            }
        }
        let (write, fetched) = (kind != Kind::Kept, self.tally.fetched);
        if !timed(&mut self.times.queueing, || {
            self.sink.push(c.offset, bytes, write, fetched)
        }) {
            return Err(self.sink.stopped());
        }
        self.base += 1;
        Ok(())
    }

    /// Chunk `base` was not in the slot its plan named: fetched and decompressed here, against
    /// the window, which holds every chunk before it.
    fn refetch(&mut self, fetch: &mut Fetch<'_>) -> Result<Vec<u8>, Stop> {
        let i = self.base;
        let c = self.at.chunks[i];
        let mut frame = self.spare_frames.pop().unwrap_or_default();
        fetch(i, &mut frame)?;
        self.tally.to_fetch += u64::from(c.data_len);
        let mut out = self.spare.pop().unwrap_or_default();
        out.resize(c.size as usize, 0);
        let window = self
            .window
            .map(|w| w.read().unwrap_or_else(PoisonError::into_inner));
        let dict = match &window {
            None => &[][..],
            Some(w) => w
                .context(&c)
                .ok_or_else(|| internal(format!("chunk {i}'s context is not in the window")))?,
        };
        let decoded = timed(&mut self.times.decoding, || {
            chunked::decompress(i, &c, &frame, dict, &mut out, &mut self.dctx)
        });
        drop(window);
        self.spare_frames.push(frame);
        decoded.map_err(chunk_stop)?;
        Ok(out)
    }

    /// Waits until every chunk is passed on.
    fn drain(&mut self, fetch: &mut Fetch<'_>) -> Result<(), Stop> {
        while !self.held.is_empty() {
            self.settle(true, Some(&mut *fetch))?;
        }
        Ok(())
    }

    /// An interrupted pass: waits for the workers, passes on the chunks verified in order up to
    /// the first that is not (a resume finds them in the slot), and lets the writer finish.
    fn stop(mut self, stop: Stop) -> Stop {
        while self.busy > 0 && self.wait_one().is_ok() {}
        let _ = self.pass_on(None);
        interrupt(self.sink, self.at.file, stop)
    }
}

impl Engine {
    /// The pass with `workers` chunk workers (see the module docs).
    pub(super) fn pooled_pass(
        &mut self,
        at: &Inputs<'_>,
        workers: usize,
        sink: Sink,
        tally: Tally,
        times: &mut Times,
    ) -> Result<(Sink, Tally), Stop> {
        let window = at.info.context.map(|_| RwLock::new(Window::new(at.info)));
        let (job_tx, job_rx) = channel();
        let job_rx = Mutex::new(job_rx);
        let (done_tx, done_rx) = channel();
        let mut fetching = Duration::ZERO;
        let (sink, tally, pass_times) = std::thread::scope(|scope| {
            // Owns the job queue: however this ends, dropping it lets the workers go.
            let mut pass = Pass::new(at, window.as_ref(), job_tx, done_rx, workers, sink, tally);
            for w in 0..workers {
                let (jobs, done, window) = (&job_rx, done_tx.clone(), window.as_ref());
                std::thread::Builder::new()
                    .name(format!("chunk-worker-{w}"))
                    .spawn_scoped(scope, move || work(jobs, &done, at.chunks, window))
                    .map_err(|e| internal(format!("cannot start chunk worker {w} of {workers}: {e}")))?;
            }
            drop(done_tx);
            let mut run: Option<Run> = None;
            let mut reported = 0;
            for i in 0..at.chunks.len() {
                if let Some(stop) = self.interrupted() {
                    return Err(pass.stop(stop));
                }
                let mut fetch = |j: usize, frame: &mut Vec<u8>| {
                    let c = &at.chunks[j];
                    let end = at.ends[j].max(c.data_end());
                    timed(&mut fetching, || {
                        self.read_frame(&mut run, at.source, at.data_offset, c, end, frame)
                    })
                };
                pass.next(i, &mut fetch)?;
                if pass.tally.fetched != reported {
                    reported = pass.tally.fetched;
                    self.observer.progress(reported, pass.tally.to_fetch);
                }
            }
            let mut fetch = |j: usize, frame: &mut Vec<u8>| {
                let c = &at.chunks[j];
                let end = at.ends[j].max(c.data_end());
                timed(&mut fetching, || {
                    self.read_frame(&mut run, at.source, at.data_offset, c, end, frame)
                })
            };
            pass.drain(&mut fetch)?;
            if pass.tally.fetched != reported {
                self.observer.progress(pass.tally.fetched, pass.tally.to_fetch);
            }
            Ok((pass.sink, pass.tally, pass.times))
        })?;
        *times = Times {
            fetching,
            ..pass_times
        };
        Ok((sink, tally))
    }
}
