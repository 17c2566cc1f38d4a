//! Device ids: the rule shared by the agent's config and the hub's heartbeat check.

/// Longest device id.
pub const MAX_DEVICE_ID_BYTES: usize = 64;

/// Checks a device id: 1 to 64 of `[A-Za-z0-9._-]`, never containing `..` (it names files,
/// MQTT topics and `FlightNode` objects). Same rule as the agent's config check.
pub fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DEVICE_ID_BYTES {
        return Err(format!(
            "device id {id:?} must be 1 to {MAX_DEVICE_ID_BYTES} characters"
        ));
    }
    if id == "." || id.contains("..") {
        return Err(format!("device id {id:?} must not contain \"..\""));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "device id {id:?} contains {c:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        for ok in ["drone-1", "D_2.a", "x"] {
            assert!(validate_device_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a..b", "a/b", "a b", "ä", &"x".repeat(65)] {
            assert!(validate_device_id(bad).is_err(), "{bad}");
        }
    }
}
