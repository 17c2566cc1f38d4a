//! The fault plan: what the server answers to one request, given the stored bytes and the
//! [`Fault`] configured for its path.

use super::{Request, State};
use std::sync::Arc;
use std::time::Duration;

/// What goes wrong when a path is requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Serve normally.
    None,
    /// Send the body up to and including the byte at absolute offset `offset`, then close the
    /// connection (the client then holds `offset + 1` bytes and should resume with
    /// `Range: bytes={offset+1}-`). Applies to the next `times` requests whose range covers
    /// `offset`; afterwards the path is served normally.
    CutAt {
        /// Absolute offset of the last byte sent.
        offset: u64,
        /// How many responses are cut.
        times: u32,
    },
    /// Send the headers and the body bytes before absolute offset `after`, then send nothing
    /// more but keep the connection open until the client closes it. `after: 0` = headers only.
    Stall {
        /// Absolute offset where the body stops.
        after: u64,
    },
    /// Read the request and never answer (no status line), keeping the connection open.
    NoResponse,
    /// Answer with this status and an empty body.
    Status(u16),
    /// Serve these bytes instead of the stored ones (`Range` applies to them).
    Replace(Vec<u8>),
    /// `200` without `Content-Length` (close-delimited): the stored bytes, then filler bytes
    /// (`0xEE`) forever. `Range` is ignored.
    Endless,
    /// Claim `Content-Length: claimed` but send the real remainder, then close.
    WrongContentLength {
        /// The announced length.
        claimed: u64,
    },
    /// Send the body one byte per `interval`.
    SlowLoris {
        /// Delay between bytes.
        interval: Duration,
    },
    /// `302` to the same path with a changing query, forever.
    RedirectLoop,
    /// `302` to this location (a path on this server or a full URL).
    RedirectTo(String),
    /// Answer `Range` requests with `200` and the whole body.
    IgnoreRange,
    /// Answer `Range: bytes=N-` with a `206` for `bytes=N+shift-` (an honest `Content-Range`
    /// that does not start where the client asked).
    ShiftedRange(u64),
}

impl Fault {
    /// The classic slow loris: one byte per second.
    pub fn slow_loris() -> Self {
        Fault::SlowLoris {
            interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug)]
pub(super) struct FaultSlot {
    pub(super) fault: Fault,
    /// Requests left before the fault clears itself (`None` = until changed).
    pub(super) remaining: Option<u32>,
}

/// `bytes=N-` or `bytes=N-M` → (N, Some(M)); anything else (multi-range, suffix) → None.
fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let start = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => None,
        b => Some(b.parse().ok()?),
    };
    if end.is_some_and(|e| e < start) {
        return None;
    }
    Some((start, end))
}

pub(super) enum After {
    Close,
    Stall,
    Endless,
}

pub(super) enum Plan {
    /// Status line + headers, empty body.
    Bare {
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// Never answer.
    Hang,
    Body {
        status: u16,
        headers: Vec<(String, String)>,
        data: Arc<Vec<u8>>,
        from: usize,
        to: usize,
        slow: Option<Duration>,
        after: After,
    },
}

pub(super) fn plan(st: &mut State, req: &Request) -> Plan {
    if req.method != "GET" {
        return Plan::Bare {
            status: 405,
            headers: vec![("Allow".into(), "GET".into())],
        };
    }
    let Some(stored) = st.files.get(&req.path).cloned() else {
        return Plan::Bare {
            status: 404,
            headers: vec![],
        };
    };
    let mut fault = Fault::None;
    let mut clear = false;
    let from_sequence = st
        .sequences
        .get_mut(&req.path)
        .and_then(std::collections::VecDeque::pop_front);
    let sequenced = from_sequence.is_some();
    if let Some(f) = from_sequence {
        fault = f;
    } else if let Some(slot) = st.faults.get_mut(&req.path) {
        fault = slot.fault.clone();
        if let Some(n) = slot.remaining.as_mut() {
            *n = n.saturating_sub(1);
            clear = *n == 0;
        }
    }
    if clear {
        st.faults.remove(&req.path);
    }

    match &fault {
        Fault::Status(code) => {
            return Plan::Bare {
                status: *code,
                headers: vec![],
            };
        }
        Fault::NoResponse => return Plan::Hang,
        Fault::RedirectLoop => {
            let n: u64 = req
                .target
                .split_once("?loop=")
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or(0);
            return Plan::Bare {
                status: 302,
                headers: vec![("Location".into(), format!("{}?loop={}", req.path, n + 1))],
            };
        }
        Fault::RedirectTo(location) => {
            return Plan::Bare {
                status: 302,
                headers: vec![("Location".into(), location.clone())],
            };
        }
        Fault::Endless => {
            let to = stored.len();
            return Plan::Body {
                status: 200,
                headers: vec![],
                data: stored,
                from: 0,
                to,
                slow: None,
                after: After::Endless,
            };
        }
        _ => {}
    }

    let data = match &fault {
        Fault::Replace(bytes) => Arc::new(bytes.clone()),
        _ => stored,
    };
    let len = data.len() as u64;
    let range = match &fault {
        Fault::IgnoreRange => None,
        _ => req.range.as_deref().and_then(parse_range),
    };
    let (status, start, end) = match range {
        None => (200, 0, len),
        Some((start, end)) => {
            let start = match &fault {
                Fault::ShiftedRange(shift) => start.saturating_add(*shift),
                _ => start,
            };
            if start >= len {
                return Plan::Bare {
                    status: 416,
                    headers: vec![("Content-Range".into(), format!("bytes */{len}"))],
                };
            }
            let end = end.map_or(len, |e| e.saturating_add(1).min(len));
            (206, start, end)
        }
    };
    let mut headers = Vec::new();
    if status == 206 {
        headers.push(("Content-Range".into(), format!("bytes {start}-{}/{len}", end - 1)));
    }
    let claimed = match &fault {
        Fault::WrongContentLength { claimed } => *claimed,
        _ => end - start,
    };
    headers.push(("Content-Length".into(), claimed.to_string()));

    let mut to = end;
    let mut after = After::Close;
    let mut slow = None;
    match &fault {
        Fault::CutAt { offset, times } if *times > 0 && *offset >= start && *offset < end => {
            to = offset + 1;
            let times = times - 1;
            if sequenced {
                // a sequence entry is used up by its request
            } else if let Some(slot) = st.faults.get_mut(&req.path) {
                if times == 0 {
                    st.faults.remove(&req.path);
                } else {
                    slot.fault = Fault::CutAt {
                        offset: *offset,
                        times,
                    };
                }
            }
        }
        Fault::Stall { after: at } => {
            to = (*at).clamp(start, end);
            after = After::Stall;
        }
        Fault::SlowLoris { interval } => slow = Some(*interval),
        _ => {}
    }
    Plan::Body {
        status,
        headers,
        data,
        from: usize::try_from(start).unwrap_or(usize::MAX),
        to: usize::try_from(to).unwrap_or(usize::MAX),
        slow,
        after,
    }
}
