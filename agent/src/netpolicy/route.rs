//! Which interface the kernel sends packets for an address through, and whether it counts as
//! metered.
//!
//! The route is the kernel's own answer: a UDP socket `connect`ed to the address (no packet is
//! sent) gets the source address the routing table, policy rules included, picks; the interface
//! holding that address is the link. This follows `ip route replace` at once, which is what a
//! modem manager or a dock script does when the link changes.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Why the link of an address cannot be told.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No route to the address, or the socket could not be made.
    #[error("no route to {addr}")]
    NoRoute {
        /// The destination.
        addr: IpAddr,
        /// Why.
        source: io::Error,
    },
    /// The interface list could not be read.
    #[error("cannot list the network interfaces (getifaddrs)")]
    Interfaces(#[source] io::Error),
    /// The source address the kernel picked is on no interface (it went away meanwhile).
    #[error("the route to {addr} leaves from {local}, which no interface holds")]
    NoInterface {
        /// The destination.
        addr: IpAddr,
        /// The source address of the route.
        local: IpAddr,
    },
}

/// The name of the interface the kernel routes packets for `addr` through.
pub fn route_interface(addr: IpAddr) -> Result<String, RouteError> {
    let no_route = |source| RouteError::NoRoute { addr, source };
    let bind: SocketAddr = match addr {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind).map_err(no_route)?;
    // Any port: a UDP connect only looks the route up.
    socket.connect((addr, 9)).map_err(no_route)?;
    let local = socket.local_addr().map_err(no_route)?.ip();
    interface_holding(local)
        .map_err(RouteError::Interfaces)?
        .ok_or(RouteError::NoInterface { addr, local })
}

/// The interface that holds address `local`, from getifaddrs(3).
#[allow(
    clippy::cast_ptr_alignment,
    reason = "getifaddrs returns sockaddr_in/sockaddr_in6 behind a sockaddr pointer, aligned for them"
)]
fn interface_holding(local: IpAddr) -> io::Result<Option<String>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that is freed below, once.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its real type.
        let ip = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: AF_INET: a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6: a sockaddr_in6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        if ip == local {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once; no reference into it survives.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// Shell-style glob match of an interface name: `*` any run, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matcher with one backtrack point (the last `*`), linear in practice.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// NetworkManager's `GENERAL.METERED` of a device, from `nmcli -t -f GENERAL.METERED device show
/// IFACE`: `yes` and `yes (guessed)` are metered; `no`, `no (guessed)` and `unknown` are not.
/// `None` when the output holds no such line.
pub fn parse_nmcli_metered(output: &str) -> Option<bool> {
    output.lines().find_map(|line| {
        let value = line.trim().strip_prefix("GENERAL.METERED:")?.trim();
        Some(value == "yes" || value.starts_with("yes "))
    })
}

/// Asks NetworkManager whether `interface` is metered. `Ok(None)`: nmcli is not installed (or
/// gave no answer for the device), so NetworkManager has no say.
pub fn nmcli_metered(interface: &str, timeout: Duration) -> Result<Option<bool>, String> {
    let mut cmd = Command::new("nmcli");
    cmd.args(["-t", "-f", "GENERAL.METERED", "device", "show", interface])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match crate::child::run(&mut cmd, None, timeout) {
        Err(crate::child::ChildError::Spawn(e)) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("nmcli device show {interface}: {e}")),
        Ok(done) if !done.status.success() => Err(format!(
            "nmcli device show {interface}: {} {}",
            done.status,
            String::from_utf8_lossy(&done.stderr).trim()
        )),
        Ok(done) => Ok(parse_nmcli_metered(&String::from_utf8_lossy(&done.stdout))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_interface_names() {
        for (p, n) in [
            ("wwan*", "wwan0"),
            ("wwan*", "wwan"),
            ("ppp0", "ppp0"),
            ("*", "eth0"),
            ("w?an*", "wlan12"),
            ("*0", "usb0"),
            ("e*h*", "enp0s3eth"),
        ] {
            assert!(glob_match(p, n), "{p} {n}");
        }
        for (p, n) in [
            ("wwan*", "wlan0"),
            ("ppp0", "ppp01"),
            ("?", ""),
            ("eth?", "eth10"),
            ("", "x"),
        ] {
            assert!(!glob_match(p, n), "{p} {n}");
        }
    }

    #[test]
    fn nmcli_metered_values_are_parsed() {
        for (out, want) in [
            ("GENERAL.METERED:yes\n", Some(true)),
            ("GENERAL.METERED:yes (guessed)\n", Some(true)),
            ("GENERAL.METERED:no\n", Some(false)),
            ("GENERAL.METERED:no (guessed)\n", Some(false)),
            ("GENERAL.METERED:unknown\n", Some(false)),
            ("", None),
            ("Error: Device 'wwan9' not found.\n", None),
        ] {
            assert_eq!(parse_nmcli_metered(out), want, "{out:?}");
        }
    }

    #[test]
    fn loopback_routes_over_lo() {
        assert_eq!(route_interface(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap(), "lo");
    }
}
