#!/usr/bin/env bash
# Soak test of the merge engine's crash safety (ARCHITECTURE.md, "The merge
# invariant"): runs tests/merge_crash.rs in release mode with many runs.
# Each run builds a random snapshot tree, SIGKILLs a merge at a random
# moment (mounted or offline), and checks every visible point, qemu-img
# check and that the merge completes afterwards.
#
# Usage: scripts/merge_crash_soak.sh [RUNS]      (default 1000)
#   SNAPTREE_TEST_SEED=N       replay the runs of a printed seed
#   SNAPTREE_KEEP_TEST_DIRS=1  keep every run's directory for a post-mortem
#   SNAPTREE_CRASH_STRICT_LEAKS=1  fail on leaked clusters after a kill too
# Needs root (or FUSE access), /dev/fuse, qemu-img and qemu-io; without
# them the test prints SKIP and passes.
set -euo pipefail

runs="${1:-1000}"
case "$runs" in
'' | *[!0-9]*)
    echo "usage: $0 [RUNS]" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/.."
export SNAPTREE_CRASH_RUNS="$runs"
start=$(date +%s)
status=0
cargo test --release --test merge_crash -- --nocapture || status=$?
echo "merge_crash_soak: $runs runs, exit $status, $(($(date +%s) - start)) s" >&2
exit "$status"
