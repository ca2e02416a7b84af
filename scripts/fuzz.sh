#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (build-fuzz/) and runs each for SECONDS (default 20),
# starting from tests/fuzz/corpus/<target> (copied, so the repository is not modified).
# A crash fails the script and leaves the crashing input in build-fuzz/artifacts/; add it to the
# corpus as a regression test. Longer runs: scripts/fuzz.sh 3600
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DEVMESH_FUZZ=ON -DEVMESH_BUILD_TESTS=OFF -DEVMESH_BUILD_EXAMPLES=OFF -DEVMESH_BUILD_BENCH=OFF >/dev/null
cmake --build build-fuzz -j "$(nproc)" --target fuzz_event_decode fuzz_beacon_decode fuzz_config_load fuzz_stats_decode \
  fuzz_cloudevents_parse fuzz_ingest_parse
mkdir -p build-fuzz/artifacts
status=0
targets=(event_decode beacon_decode config_load stats_decode cloudevents_parse ingest_parse)
for target in "${targets[@]}"; do
  t="${target%_*}"
  work="build-fuzz/corpus-$t"
  rm -rf "$work" && mkdir -p "$work" && cp tests/fuzz/corpus/$t/* "$work/"
  echo "fuzz: ${target} for ${seconds}s"
  if ! ./build-fuzz/tests/fuzz_${target} "$work" -max_total_time="$seconds" -max_len=4096 \
       -artifact_prefix=build-fuzz/artifacts/ -print_final_stats=1 2>build-fuzz/fuzz-$t.log; then
    status=1
    tail -40 build-fuzz/fuzz-$t.log
  fi
  grep -E "^stat::number_of_executed_units|^Done" build-fuzz/fuzz-$t.log || true
done
if [ $status -eq 0 ]; then echo "fuzz: ${#targets[@]} passed, 0 failed"; else echo "fuzz: FAILED (see build-fuzz/artifacts)"; fi
exit $status
