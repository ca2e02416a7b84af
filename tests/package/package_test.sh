#!/usr/bin/env bash
# Installs the build into a temporary prefix and builds a separate consumer project against it,
# once with find_package(evmesh CONFIG) and once with pkg-config (evmesh.pc). Removes the prefix.
#   package_test.sh BUILD_DIR SOURCE_DIR(tests/package)
set -euo pipefail
build=$1
src=$2
tmp=$(mktemp -d /tmp/evmesh-package-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
passed=0
cmake -S "$src/consumer" -B "$tmp/cmake-build" -G Ninja -DCMAKE_PREFIX_PATH="$tmp/prefix" >"$tmp/cmake.log" 2>&1 \
    || { cat "$tmp/cmake.log"; exit 1; }
cmake --build "$tmp/cmake-build" >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
"$tmp/cmake-build/consumer"
passed=$((passed + 1))
pc_dir=$(dirname "$(find "$tmp/prefix" -name evmesh.pc | head -1)")
flags=$(PKG_CONFIG_PATH="$pc_dir" pkg-config --cflags --libs evmesh)
c++ -std=c++20 "$src/consumer/main.cpp" -o "$tmp/pc-consumer" $flags
# a shared build: the loader finds the library in the prefix (CMake's consumer has an RPATH)
LD_LIBRARY_PATH="$(PKG_CONFIG_PATH="$pc_dir" pkg-config --variable=libdir evmesh)" "$tmp/pc-consumer"
passed=$((passed + 1))

# A shared build of the libraries (BUILD_SHARED_LIBS=ON, hidden visibility): it exports the API
# marked EVMESH_API and none of the internals, and the consumer runs against it.
root=$(cd "$src/../.." && pwd)
cmake -S "$root" -B "$tmp/shared" -G Ninja -DBUILD_SHARED_LIBS=ON -DEVMESH_BUILD_TESTS=OFF \
    -DEVMESH_BUILD_EXAMPLES=OFF -DEVMESH_BUILD_BENCH=OFF >"$tmp/shared.log" 2>&1 || { cat "$tmp/shared.log"; exit 1; }
cmake --build "$tmp/shared" --target evmesh_core evmesh_channels >"$tmp/shared-build.log" 2>&1 \
    || { cat "$tmp/shared-build.log"; exit 1; }
exported=$(nm -DC --defined-only "$tmp/shared/core/libevmesh_core.so" | awk '$2 == "T" || $2 == "W"' | cut -d' ' -f3-)
grep -q '^evmesh::node::create(' <<<"$exported" || { echo "FAIL: evmesh::node::create is not exported"; exit 1; }
grep -q '^evmesh::decode_event(' <<<"$exported" || { echo "FAIL: evmesh::decode_event is not exported"; exit 1; }
if leaked=$(grep -E '^evmesh::detail::(node_impl|peer_table|repair|msgpack|codec|history)|^evmesh::(detail::)?(discovery|codec|history)::' <<<"$exported"); then
    echo "FAIL: internals exported from libevmesh_core.so:"; head -5 <<<"$leaked"; exit 1
fi
echo "shared libevmesh_core.so exports $(wc -l <<<"$exported") symbols, no internals"
channels_exported=$(nm -DC --defined-only "$tmp/shared/core/libevmesh_channels.so")
grep -q 'evmesh::channels::channel_runtime::start' <<<"$channels_exported" \
    || { echo "FAIL: channel_runtime::start is not exported"; exit 1; }
c++ -std=c++20 -I"$root/core/include" "$src/consumer/main.cpp" -o "$tmp/shared-consumer" \
    -L"$tmp/shared/core" -levmesh_core -Wl,-rpath,"$tmp/shared/core"
"$tmp/shared-consumer"
passed=$((passed + 1))
echo "package: $passed passed, 0 failed"
