#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each):  fuzz/run.sh [SECONDS]
# Needs cargo-fuzz (`cargo install cargo-fuzz`). On a stable toolchain, RUSTC_BOOTSTRAP=1 lets it
# use the sanitizer flags it needs.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
export RUSTC_BOOTSTRAP=1
for target in mqtt_command bundle_reader heartbeat; do
    echo "== $target for ${secs}s"
    cargo fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=1024
done
