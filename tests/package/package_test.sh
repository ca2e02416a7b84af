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
echo "package: $passed passed, 0 failed"
