//! The download's link policy (`[download]` `metered_interfaces`, `networkmanager`,
//! `on_metered`, `max_rate`, `metered_max_rate`, `window`): may a bundle be fetched now, over the
//! link it would take, and how fast.
//!
//! - [`route`]: the interface the kernel routes a bundle server's address through, the globs of
//!   `metered_interfaces`, NetworkManager's metered flag.
//! - [`window`]: `download.window` in local time.
//! - [`bucket`]: the token bucket behind the rate caps.
//!
//! The engine asks [`LinkPolicy::check_source`] before each download (and holds the upgrade in
//! phase `waiting`, reason `metered_link` or `download_window`, until it says go); the HTTP task
//! asks [`LinkPolicy::check_addr`] with the address it is connected to every
//! [`RECHECK`] while the body streams, and stops (keeping what it has) when the answer turns to
//! a hold.

pub mod bucket;
pub mod route;
pub mod window;

use crate::config::{DownloadConfig, OnMetered};
use flightnode_proto::WaitReason;
use std::collections::HashMap;
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a streaming download asks the policy again (a route change, the window closing).
pub const RECHECK: Duration = Duration::from_secs(1);
/// NetworkManager's answer for an interface is reused this long (each asks runs nmcli).
const NM_CACHE: Duration = Duration::from_secs(30);
const NM_TIMEOUT: Duration = Duration::from_secs(5);

/// What the policy says about downloading now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkVerdict {
    /// Go, at most at `rate` bytes/s when set.
    Go {
        /// The cap in bytes/s.
        rate: Option<u64>,
    },
    /// Not now; the sentence names the interface or the window.
    Hold(WaitReason, String, Option<String>),
}

/// The `[download]` link policy of one agent.
pub struct LinkPolicy {
    cfg: DownloadConfig,
    clock: Box<dyn Fn() -> u16 + Send + Sync>,
    nm: Mutex<HashMap<String, (Instant, bool)>>,
}

impl std::fmt::Debug for LinkPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkPolicy").finish_non_exhaustive()
    }
}

impl LinkPolicy {
    /// The policy of `cfg`, on the local clock.
    pub fn new(cfg: &DownloadConfig) -> Self {
        Self::with_clock(cfg, Box::new(window::local_minute_of_day))
    }

    /// The policy of `cfg` with `clock` giving the local minute of the day (tests).
    pub fn with_clock(cfg: &DownloadConfig, clock: Box<dyn Fn() -> u16 + Send + Sync>) -> Self {
        Self {
            cfg: cfg.clone(),
            clock,
            nm: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the policy can ever hold or slow a download (else nothing needs asking).
    pub fn is_active(&self) -> bool {
        self.cfg.window.is_some() || self.cfg.max_rate.is_some() || self.metered_config()
    }

    fn metered_config(&self) -> bool {
        !self.cfg.metered_interfaces.is_empty() || self.cfg.networkmanager
    }

    /// For a bundle source: a local path always goes (at `max_rate`); an http(s) URL is judged by
    /// the route to its host's first address (as the HTTP client tries it first).
    pub fn check_source(&self, source: &str) -> LinkVerdict {
        if let Some(hold) = self.window_hold() {
            return hold;
        }
        let Some(host) = http_host(source) else {
            return LinkVerdict::Go {
                rate: self.cfg.max_rate,
            };
        };
        if !self.metered_config() {
            return LinkVerdict::Go {
                rate: self.cfg.max_rate,
            };
        }
        if let Ok(Some(addr)) = host.to_socket_addrs().map(|mut a| a.next()) {
            self.check_addr(addr.ip())
        } else {
            // The download itself reports the DNS failure, with its retries.
            tracing::debug!(source = %source, "cannot resolve the bundle host to judge its link");
            LinkVerdict::Go {
                rate: self.cfg.max_rate,
            }
        }
    }

    /// For a connection to `addr`: the window, then the link the route to it takes.
    pub fn check_addr(&self, addr: IpAddr) -> LinkVerdict {
        if let Some(hold) = self.window_hold() {
            return hold;
        }
        if !self.metered_config() {
            return LinkVerdict::Go {
                rate: self.cfg.max_rate,
            };
        }
        let interface = match route::route_interface(addr) {
            Ok(i) => i,
            Err(e) => {
                // Unroutable: the download fails and retries by itself; nothing to hold for.
                tracing::debug!(addr = %addr, "cannot tell the link of the bundle server: {}",
                    flightnode_proto::error::chain(&e));
                return LinkVerdict::Go {
                    rate: self.cfg.max_rate,
                };
            }
        };
        match self.metered_by(&interface) {
            None => LinkVerdict::Go {
                rate: self.cfg.max_rate,
            },
            Some(why) => match self.cfg.on_metered {
                OnMetered::Defer => LinkVerdict::Hold(
                    WaitReason::MeteredLink,
                    format!("the route to {addr} goes over {interface}, which is metered ({why})"),
                    Some(interface),
                ),
                OnMetered::Throttle => LinkVerdict::Go {
                    rate: min_some(self.cfg.max_rate, self.cfg.metered_max_rate),
                },
            },
        }
    }

    /// Why `interface` counts as metered, or `None`.
    pub fn metered_by(&self, interface: &str) -> Option<String> {
        if let Some(glob) = self
            .cfg
            .metered_interfaces
            .iter()
            .find(|g| route::glob_match(g, interface))
        {
            return Some(format!("download.metered_interfaces {glob:?}"));
        }
        (self.cfg.networkmanager && self.nm_metered(interface))
            .then(|| "NetworkManager says GENERAL.METERED yes".to_owned())
    }

    fn nm_metered(&self, interface: &str) -> bool {
        let now = Instant::now();
        let mut cache = self.nm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, metered)) = cache.get(interface)
            && now.duration_since(*at) < NM_CACHE
        {
            return *metered;
        }
        let metered = match route::nmcli_metered(interface, NM_TIMEOUT) {
            Ok(m) => m.unwrap_or(false),
            Err(e) => {
                // Not knowing is not metered: the interface globs are the sure way to defer.
                tracing::warn!(interface = %interface, "cannot ask NetworkManager whether the link is metered: {e}");
                false
            }
        };
        cache.insert(interface.to_owned(), (now, metered));
        metered
    }

    fn window_hold(&self) -> Option<LinkVerdict> {
        let w = self.cfg.window?;
        let minute = (self.clock)();
        (!w.contains(minute)).then(|| {
            LinkVerdict::Hold(
                WaitReason::DownloadWindow,
                format!(
                    "local time {:02}:{:02} is outside download.window {w}",
                    minute / 60,
                    minute % 60
                ),
                None,
            )
        })
    }
}

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `host:port` of an http(s) URL, `None` for anything else.
fn http_host(source: &str) -> Option<String> {
    let url = reqwest::Url::parse(source).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let port = url.port_or_known_default()?;
    // IPv6 hosts keep their brackets here, as `ToSocketAddrs` wants them.
    Some(format!("{}:{port}", url.host_str()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn policy(extra: &str, minute: u16) -> LinkPolicy {
        let text = format!(
            "device_id = \"d\"\nhardware = \"h\"\ntrusted_keys = [\"k\"]\n[slots]\nbackend = \"file\"\na = \"a\"\nb = \"b\"\n[download]\n{extra}"
        );
        let cfg = crate::config::Config::parse(&text, std::path::Path::new("x.toml")).unwrap();
        LinkPolicy::with_clock(&cfg.download, Box::new(move || minute))
    }

    #[test]
    fn the_window_holds_outside_its_hours_in_local_time() {
        let p = policy("window = \"22:00-06:00\"\n", 12 * 60 + 5);
        match p.check_source("http://127.0.0.1:1/b.fnb") {
            LinkVerdict::Hold(WaitReason::DownloadWindow, why, None) => {
                assert!(why.contains("12:05") && why.contains("22:00-06:00"), "{why}");
            }
            v => panic!("{v:?}"),
        }
        let p = policy("window = \"22:00-06:00\"\n", 23 * 60);
        assert_eq!(
            p.check_source("http://127.0.0.1:1/b.fnb"),
            LinkVerdict::Go { rate: None }
        );
        // A local bundle is held by the window too: it says when to do the work.
        let p = policy("window = \"22:00-06:00\"\n", 7 * 60);
        assert!(matches!(
            p.check_source("/data/b.fnb"),
            LinkVerdict::Hold(WaitReason::DownloadWindow, ..)
        ));
    }

    #[test]
    fn a_metered_interface_defers_or_throttles() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let p = policy("metered_interfaces = [\"l?\"]\n", 0);
        match p.check_addr(lo) {
            LinkVerdict::Hold(WaitReason::MeteredLink, why, interface) => {
                assert!(why.contains("over lo"), "{why}");
                assert_eq!(interface.as_deref(), Some("lo"));
            }
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            p.check_source("http://localhost:1/b"),
            LinkVerdict::Hold(WaitReason::MeteredLink, ..)
        ));
        let p = policy(
            "metered_interfaces = [\"lo\"]\non_metered = \"throttle\"\nmetered_max_rate = 1000\nmax_rate = 5000\n",
            0,
        );
        assert_eq!(p.check_addr(lo), LinkVerdict::Go { rate: Some(1000) });
        let p = policy("metered_interfaces = [\"wwan*\"]\nmax_rate = 5000\n", 0);
        assert_eq!(
            p.check_addr(lo),
            LinkVerdict::Go { rate: Some(5000) },
            "lo is not metered"
        );
        assert!(!policy("", 0).is_active());
    }

    #[test]
    fn hosts_are_taken_from_http_urls_only() {
        assert_eq!(http_host("http://h.example/b").as_deref(), Some("h.example:80"));
        assert_eq!(http_host("https://[::1]:8443/b").as_deref(), Some("[::1]:8443"));
        assert_eq!(http_host("/data/b.fnb"), None);
        assert_eq!(http_host("file:///data/b.fnb"), None);
    }
}
