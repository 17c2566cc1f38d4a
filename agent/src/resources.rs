//! Resource metrics for heartbeats (to be implemented): sysinfo CPU, memory, disk, load, uptime, temperature.
