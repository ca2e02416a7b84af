#!/usr/bin/env bash
# The test command of the README and of CI: installs what is missing, builds, runs every test
# (unit, integration with real processes, examples, a short benchmark run) and the fuzzers for a
# bounded time. FUZZ_SECONDS (default 20) sets the time per fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j 2 --timeout 600
bash scripts/fuzz.sh "${FUZZ_SECONDS:-20}"
