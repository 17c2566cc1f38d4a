#!/usr/bin/env bash
# The whole test suite in one command, on a fresh Debian 12 machine with only a Rust toolchain.
#
#   ./test.sh            as root: installs the Debian packages and the rustup target the tests
#                        need, then runs `cargo test --workspace --locked`
#                        as another user: checks they are there; if not, prints the exact
#                        `apt-get install ...` / `rustup target add ...` lines and exits 2
#   ./test.sh -- ARGS    passes ARGS to `cargo test` (e.g. `./test.sh -- -p flightnode-agent`)
#
# Set FLIGHTNODE_TEST_NO_INSTALL=1 to only check, even as root.
set -euo pipefail
cd "$(dirname "$0")"

# One line each: why the tests need it.
PACKAGES=(
    mosquitto mosquitto-clients  # the real MQTT broker the agent and hub tests start and talk to
    libubootenv-tool             # fw_printenv/fw_setenv: the U-Boot boot backend's tools
    grub-common                  # grub-editenv: the GRUB boot backend's tool
    systemd                      # systemd-analyze verify of the agent's unit
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu  # link driver for the static aarch64 (musl) agent
    musl-tools                   # musl-gcc: C parts (ring) of the static x86_64 agent and hub
    qemu-user-static             # run the aarch64 agent on this x86_64 machine
    file                         # check the cross-built binary really is aarch64
    ca-certificates curl tar     # rustup and the bundle tooling
    etcd-server                  # etcd behind the real kube-apiserver of the controller tests
    xz-utils                     # unpack that kube-apiserver (kube-apiserver.xz)
    lintian                      # the agent's .deb packages must be lintian-clean
    mmdebstrap                   # a clean Debian 12 root to dpkg -i the packages into (cached in target/)
    buildah                      # builds the hub image from scratch, no registry needed
)
# Static release builds: the boards' agent (aarch64) and the amd64 package + hub image (x86_64).
RUST_TARGETS=(aarch64-unknown-linux-musl x86_64-unknown-linux-musl)
# cargo subcommands (crate name -> command), installed with `cargo install --locked`.
declare -A CARGO_TOOLS=(
    [cargo-deb]=cargo-deb        # builds the agent's Debian packages (tests/tests/packaging.rs)
)

# Which command proves each package is installed (package -> command on PATH).
declare -A PROVIDES=(
    [mosquitto]=mosquitto [mosquitto-clients]=mosquitto_pub [libubootenv-tool]=fw_setenv
    [grub-common]=grub-editenv [systemd]=systemd-analyze [gcc-aarch64-linux-gnu]=aarch64-linux-gnu-gcc
    [binutils-aarch64-linux-gnu]=aarch64-linux-gnu-ld [qemu-user-static]=qemu-aarch64-static
    [file]=file [curl]=curl [tar]=tar [etcd-server]=etcd [xz-utils]=xz
    [musl-tools]=musl-gcc [lintian]=lintian [mmdebstrap]=mmdebstrap [buildah]=buildah
)

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        if [[ -n "${PROVIDES[$p]:-}" ]]; then
            command -v "${PROVIDES[$p]}" >/dev/null 2>&1 || echo "$p"
        elif ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
            echo "$p"
        fi
    done
}

missing_targets() {
    local installed t
    installed=$(rustup target list --installed 2>/dev/null || true)
    for t in "${RUST_TARGETS[@]}"; do
        grep -qx "$t" <<<"$installed" || echo "$t"
    done
}

missing_cargo_tools() {
    local c
    for c in "${!CARGO_TOOLS[@]}"; do
        command -v "${CARGO_TOOLS[$c]}" >/dev/null 2>&1 || echo "$c"
    done
}

mapfile -t need_pkgs < <(missing_packages)
mapfile -t need_targets < <(missing_targets)
mapfile -t need_tools < <(missing_cargo_tools)

if ((${#need_pkgs[@]} + ${#need_targets[@]} + ${#need_tools[@]})); then
    if [[ $(id -u) -eq 0 && -z "${FLIGHTNODE_TEST_NO_INSTALL:-}" ]]; then
        if ((${#need_pkgs[@]})); then
            echo "test.sh: installing ${need_pkgs[*]}" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
        fi
        if ((${#need_targets[@]})); then
            echo "test.sh: rustup target add ${need_targets[*]}" >&2
            rustup target add "${need_targets[@]}"
        fi
        if ((${#need_tools[@]})); then
            echo "test.sh: cargo install --locked ${need_tools[*]}" >&2
            cargo install --locked "${need_tools[@]}"
        fi
    else
        echo "test.sh: the tests need tools that are not installed. Run as root:" >&2
        ((${#need_pkgs[@]})) && echo "  apt-get install -y --no-install-recommends ${need_pkgs[*]}" >&2
        ((${#need_targets[@]})) && echo "  rustup target add ${need_targets[*]}" >&2
        ((${#need_tools[@]})) && echo "  cargo install --locked ${need_tools[*]}" >&2
        echo "or run ./test.sh as root, which installs them." >&2
        exit 2
    fi
fi

[[ "${1:-}" == "--" ]] && shift
exec cargo test --workspace --locked "$@"
