#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each):  fuzz/run.sh [SECONDS]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). There is no nightly toolchain here:
# RUSTC_BOOTSTRAP=1 lets the stable compiler accept the -Z flags cargo-fuzz passes
# (-Zsanitizer=address and the sanitizer-coverage passes). That works as is on stable
# (checked with rustc 1.95 and cargo-fuzz 0.13.2): AddressSanitizer links, so the default
# `--sanitizer address` is kept, and so is cargo-fuzz's default release build with debug
# assertions (overflow checks on, as in `cargo test`). -Zbuild-std is not needed.
#
# First the seed corpora are (re)written to fuzz/seeds/<target> by the `fuzz_seeds` example of
# the agent (a plain workspace build): valid commands, encoded heartbeats and bundles signed with
# the key the bundle_reader target trusts; without those the bundle target never gets past the
# signature check. libFuzzer reads them next to fuzz/corpus/<target> and adds what it finds to
# the latter. Crashes land in fuzz/artifacts/<target>; see fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
cargo run --quiet --locked --manifest-path ../Cargo.toml -p flightnode-agent --example fuzz_seeds -- seeds
export RUSTC_BOOTSTRAP=1
for target in mqtt_command bundle_reader heartbeat; do
    echo "== $target for ${secs}s"
    mkdir -p "corpus/$target"
    cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$secs" -rss_limit_mb=1024 -timeout=10
done
