//! `kubectl-flightnode`: the kubectl plugin, a few hundred kilobytes that run the hub.
//!
//! The hub binary is multi-call: started under the name `kubectl-flightnode` it reads the
//! kubeconfig's cluster by default, as kubectl does. A symlink would do that on a workstation,
//! but a container image cannot hold one cheaply (a `COPY` of a symlink copies its target, which
//! doubled the hub image), and a Debian package is clearer with two real programs. So this
//! program only finds `flightnode-hub` (beside itself first, so a package or an image always
//! runs its own hub, then on `PATH`) and execs it with `argv[0]` = `kubectl-flightnode`.
//!
//! std only, no clap, no tokio, no library of the hub: its size is std's (422 KB in the static
//! musl release build; the shipping test holds it to 1 MiB).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The name the hub binary has on disk.
const HUB: &str = "flightnode-hub";
/// The name the hub must see in `argv[0]` to act as the plugin.
const PLUGIN: &str = "kubectl-flightnode";

/// The hub binary: beside this program (resolved through symlinks, so a link to this program on
/// `PATH` still finds the hub it was installed with), else the first on `PATH`.
fn find_hub() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(HUB)));
    if let Some(hub) = beside.filter(|p| is_executable(p)) {
        return Some(hub);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(HUB))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn main() -> ExitCode {
    let Some(hub) = find_hub() else {
        eprintln!(
            "{PLUGIN}: cannot find the {HUB} binary, which does the work of this plugin: it is \
             looked for beside {PLUGIN} and on PATH. Install the flightnode-hub package (it \
             ships both), or put {HUB} from the same release next to {PLUGIN}."
        );
        // kubectl's "command not found" code: the plugin cannot run at all.
        return ExitCode::from(127);
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    // exec replaces this process, so kubectl sees the hub's exit code and signals; it only
    // returns on failure.
    let err = Command::new(&hub).arg0(PLUGIN).args(args).exec();
    eprintln!(
        "{PLUGIN}: cannot run {}: {err}. Check that it is the {HUB} binary of this machine's \
         architecture and that it is executable (chmod 0755), or reinstall the flightnode-hub \
         package.",
        hub.display()
    );
    ExitCode::from(126)
}
