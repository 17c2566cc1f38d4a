//! U-Boot environment backend: `fw_printenv`/`fw_setenv` (libubootenv) with RAUC's variables.
//!
//! RAUC's U-Boot convention, so existing RAUC boot scripts work unchanged:
//! - `BOOT_ORDER="A B"`: slots in the order the boot script tries them, first = primary;
//! - `BOOT_A_LEFT`, `BOOT_B_LEFT`: remaining attempts. The boot script boots the first slot in
//!   `BOOT_ORDER` whose counter is above zero and decrements it before booting.
//!
//! | call | writes |
//! |---|---|
//! | `set_trial(s)` | `BOOT_ORDER="s other"`, `BOOT_s_LEFT=1` |
//! | `mark_good(s)` | `BOOT_ORDER="s other"`, `BOOT_s_LEFT=<attempts>` |
//! | `mark_bad(s)` | `BOOT_ORDER="other s"`, `BOOT_s_LEFT=0` |
//!
//! Every change is written by ONE `fw_setenv -c CFG -s -` call (`name=value` lines on stdin);
//! with a redundant environment (two lines in `fw_env.config`) libubootenv writes the inactive
//! copy and then flips its flag, so a power cut leaves either the old or the new environment,
//! never half a change. With a single copy there is no such guarantee. Each write is read back.
//!
//! Missing variables mean what RAUC's boot script assumes (`test -n "${BOOT_A_LEFT}" || setenv
//! BOOT_A_LEFT 3`): order `A B`, `attempts` left. The first write fills in missing variables.
//! An environment whose CRC is bad in every copy (blank flash) makes `fw_printenv` fail; it is
//! then read as empty and the first write creates it (`-f /dev/null`). That write holds only
//! RAUC's variables — U-Boot would otherwise have used its built-in default environment, so boards
//! that need more should ship `/etc/u-boot-initial-env`, which libubootenv uses by itself.

use super::{
    BootBackend, BootError, booted_from_cmdline, env_name, order_value, parse_env_lines, parse_order,
    run_tool,
};
use crate::config::BootConfig;
use flightnode_proto::Slot;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tracing::{debug, info, warn};

const PRINTENV: &str = "fw_printenv";
const SETENV: &str = "fw_setenv";
const ORDER: &str = "BOOT_ORDER";

/// U-Boot backend. See the module docs for the variables and their meaning.
#[derive(Debug, Clone)]
pub struct UBoot {
    fw_env_config: PathBuf,
    cmdline: PathBuf,
    attempts: u32,
}

/// The environment as read: variables, and whether no valid copy existed.
struct Env {
    vars: BTreeMap<String, String>,
    blank: bool,
}

fn left_key(slot: Slot) -> String {
    format!("BOOT_{}_LEFT", env_name(slot))
}

impl UBoot {
    /// Uses `cfg.fw_env_config`, `cfg.cmdline` and `cfg.attempts`.
    pub fn new(cfg: &BootConfig) -> Result<Self, BootError> {
        if cfg.attempts == 0 {
            return Err(BootError::Env {
                location: "boot.attempts".into(),
                problem: "must be at least 1 (0 would make a committed slot unbootable)".into(),
            });
        }
        if !cfg.fw_env_config.is_file() {
            return Err(BootError::Env {
                location: cfg.fw_env_config.display().to_string(),
                problem: "fw_env.config does not exist (set boot.fw_env_config)".into(),
            });
        }
        Ok(Self {
            fw_env_config: cfg.fw_env_config.clone(),
            cmdline: cfg.cmdline.clone(),
            attempts: cfg.attempts,
        })
    }

    fn cfg_arg(&self) -> String {
        self.fw_env_config.to_string_lossy().into_owned()
    }

    fn location(&self) -> String {
        format!("{PRINTENV} -c {}", self.fw_env_config.display())
    }

    fn read(&self) -> Result<Env, BootError> {
        let cfg = self.cfg_arg();
        match run_tool(PRINTENV, &["-c", &cfg], None) {
            Ok(out) => Ok(Env {
                vars: parse_env_lines(&out),
                blank: false,
            }),
            Err(err @ BootError::Tool { .. }) => {
                // No valid copy (bad CRC, e.g. blank flash) fails without a default environment;
                // a broken fw_env.config fails either way, and then the first error is the one.
                match run_tool(PRINTENV, &["-c", &cfg, "-f", "/dev/null"], None) {
                    Ok(out) => {
                        warn!(config = %cfg, error = %err,
                            "no valid U-Boot environment; reading it as empty (RAUC defaults)");
                        Ok(Env {
                            vars: parse_env_lines(&out),
                            blank: true,
                        })
                    }
                    Err(_) => Err(err),
                }
            }
            Err(err) => Err(err),
        }
    }

    fn order(&self, env: &Env) -> Result<Vec<Slot>, BootError> {
        match env.vars.get(ORDER) {
            None => Ok(vec![Slot::A, Slot::B]),
            Some(v) => parse_order(v).ok_or_else(|| BootError::Env {
                location: self.location(),
                problem: format!("{ORDER}={v:?} names neither A nor B"),
            }),
        }
    }

    fn left(&self, env: &Env, slot: Slot) -> Result<u32, BootError> {
        let key = left_key(slot);
        match env.vars.get(&key) {
            None => Ok(self.attempts),
            Some(v) => v.trim().parse().map_err(|_| BootError::Env {
                location: self.location(),
                problem: format!("{key}={v:?} is not a number of attempts"),
            }),
        }
    }

    /// Writes `changes` (plus RAUC's defaults for missing variables) in one `fw_setenv` call,
    /// then reads the environment back to make sure it took.
    fn write(&self, slot: Slot, changes: &[(String, String)]) -> Result<(), BootError> {
        let env = self.read()?;
        let mut all: BTreeMap<String, String> = BTreeMap::new();
        if !env.vars.contains_key(ORDER) {
            all.insert(ORDER.into(), "A B".into());
        }
        for s in [Slot::A, Slot::B] {
            if !env.vars.contains_key(&left_key(s)) {
                all.insert(left_key(s), self.attempts.to_string());
            }
        }
        for (k, v) in changes {
            all.insert(k.clone(), v.clone());
        }
        let script: String = all.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let cfg = self.cfg_arg();
        let mut args = vec!["-c", cfg.as_str()];
        if env.blank {
            warn!(%slot, config = %cfg, "creating the U-Boot environment from scratch");
            args.extend(["-f", "/dev/null"]);
        }
        args.extend(["-s", "-"]);
        debug!(%slot, vars = %script.trim_end().replace('\n', " "), "fw_setenv");
        run_tool(SETENV, &args, Some(&script))?;

        let back = self.read()?;
        for (k, v) in &all {
            if back.vars.get(k) != Some(v) {
                return Err(BootError::Env {
                    location: self.location(),
                    problem: format!(
                        "wrote {k}={v:?} with {SETENV} but read back {:?}",
                        back.vars.get(k)
                    ),
                });
            }
        }
        Ok(())
    }
}

impl BootBackend for UBoot {
    fn name(&self) -> &'static str {
        "uboot"
    }

    fn booted(&self) -> Result<Slot, BootError> {
        booted_from_cmdline(&self.cmdline)
    }

    fn primary(&self) -> Result<Slot, BootError> {
        let env = self.read()?;
        for slot in self.order(&env)? {
            if self.left(&env, slot)? > 0 {
                return Ok(slot);
            }
        }
        Err(BootError::Env {
            location: self.location(),
            problem: format!(
                "no slot in {ORDER}={:?} has attempts left: U-Boot has nothing to boot",
                env.vars.get(ORDER).map_or("A B", String::as_str)
            ),
        })
    }

    fn is_good(&self, slot: Slot) -> Result<bool, BootError> {
        let env = self.read()?;
        Ok(self.left(&env, slot)? > 0)
    }

    fn set_trial(&self, slot: Slot) -> Result<(), BootError> {
        self.write(
            slot,
            &[(ORDER.into(), order_value(slot)), (left_key(slot), "1".into())],
        )?;
        info!(%slot, backend = "uboot", "slot set for a single trial boot");
        Ok(())
    }

    fn mark_good(&self, slot: Slot) -> Result<(), BootError> {
        self.write(
            slot,
            &[
                (ORDER.into(), order_value(slot)),
                (left_key(slot), self.attempts.to_string()),
            ],
        )?;
        info!(%slot, backend = "uboot", attempts = self.attempts, "slot marked good and primary");
        Ok(())
    }

    fn mark_bad(&self, slot: Slot) -> Result<(), BootError> {
        self.write(
            slot,
            &[
                (ORDER.into(), order_value(slot.other())),
                (left_key(slot), "0".into()),
            ],
        )?;
        info!(%slot, backend = "uboot", "slot marked bad");
        Ok(())
    }
}
