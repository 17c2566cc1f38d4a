//! Resource metrics for heartbeats: CPU, memory, disk, load, uptime and temperature.
//!
//! Kept cheap for a small board sampled every few seconds: the [`Sampler`] refreshes only CPU
//! usage and memory in its `sysinfo::System`, reads one temperature sensor (chosen once), and asks
//! the kernel for free space with `statvfs(2)`. Nothing here fails: a value the platform does not
//! give is reported as zero (or `None` for the temperature) and logged at debug level.

use flightnode_proto::v1::Resources;
use std::path::{Path, PathBuf};
use sysinfo::{Components, CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// Which temperature to report.
enum Thermal {
    /// No sensor (or no `Components` support).
    None,
    /// The first sensor labelled like the CPU or SoC: index into the list.
    One(usize),
    /// No CPU/SoC label: the hottest of all sensors.
    Hottest,
}

/// Samples the device's resources; CPU usage is measured between two calls of [`Sampler::sample`].
pub struct Sampler {
    system: Option<System>,
    components: Option<Components>,
    thermal: Thermal,
    disk_path: PathBuf,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("disk_path", &self.disk_path)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler reporting free space on the filesystem holding `state_dir`. Takes the first CPU
    /// reading, so the first [`Sampler::sample`] already reports usage since construction.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let refresh = RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing().with_usage())
            .with_memory(MemoryRefreshKind::nothing().with_ram());
        let system = System::new_with_specifics(refresh)
            .map_err(|e| tracing::debug!(error = %e, "sysinfo: no system information"))
            .ok();
        let components = Components::new_with_refreshed_list()
            .map_err(|e| tracing::debug!(error = %e, "sysinfo: no temperature sensors"))
            .ok();
        let thermal = match &components {
            None => Thermal::None,
            Some(c) if c.is_empty() => Thermal::None,
            Some(c) => c
                .iter()
                .position(|c| {
                    let l = c.label().to_ascii_lowercase();
                    (l.contains("cpu") || l.contains("soc")) && c.temperature().is_some()
                })
                .map_or(Thermal::Hottest, Thermal::One),
        };
        Self {
            system,
            components,
            thermal,
            disk_path: state_dir.into(),
        }
    }

    /// Current values.
    pub fn sample(&mut self) -> Resources {
        let mut r = Resources::default();
        if let Some(sys) = self.system.as_mut() {
            sys.refresh_cpu_usage();
            sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
            r.cpu_percent = sys.global_cpu_usage();
            r.memory_used_bytes = sys.used_memory();
            r.memory_total_bytes = sys.total_memory();
        }
        match System::load_average() {
            Ok(l) => r.load1 = l.one,
            Err(e) => tracing::debug!(error = %e, "sysinfo: no load average"),
        }
        match System::uptime() {
            Ok(u) => r.uptime_seconds = u,
            Err(e) => tracing::debug!(error = %e, "sysinfo: no uptime"),
        }
        match free_bytes(&self.disk_path) {
            Ok(b) => r.disk_free_bytes = b,
            Err(e) => tracing::debug!(path = %self.disk_path.display(), error = %e, "statvfs failed"),
        }
        r.temperature_celsius = self.temperature();
        r
    }

    fn temperature(&mut self) -> Option<f32> {
        let components = self.components.as_mut()?;
        let sane = |t: f32| t.is_finite() && t > -100.0 && t < 250.0;
        match self.thermal {
            Thermal::None => None,
            Thermal::One(i) => {
                let c = components.get_mut(i)?;
                c.refresh();
                c.temperature().filter(|t| sane(*t))
            }
            Thermal::Hottest => components
                .iter_mut()
                .filter_map(|c| {
                    c.refresh();
                    c.temperature()
                })
                .filter(|t| sane(*t))
                .reduce(f32::max),
        }
    }
}

/// Bytes available to unprivileged users on the filesystem holding `path` (the nearest existing
/// ancestor, so a state dir that is not created yet still reports its filesystem). Also what
/// the file slots check before writing an image.
pub(crate) fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `statvfs` is plain old data; all-zero is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast, reason = "the field types differ between targets")]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_sane() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sampler::new(dir.path().join("not-yet-created"));
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let r = s.sample();
        assert!(r.memory_total_bytes > 0, "{r:?}");
        assert!(r.memory_used_bytes <= r.memory_total_bytes, "{r:?}");
        assert!(r.disk_free_bytes > 0, "{r:?}");
        assert!(r.uptime_seconds > 0, "{r:?}");
        assert!((0.0..=100.0).contains(&r.cpu_percent), "{r:?}");
        assert!(r.load1 >= 0.0, "{r:?}");
        if let Some(t) = r.temperature_celsius {
            assert!(t.is_finite(), "{r:?}");
        }
        // A second sample works too (CPU usage since the first).
        let r2 = s.sample();
        assert!(r2.memory_total_bytes > 0);
    }
}
