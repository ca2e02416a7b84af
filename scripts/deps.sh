#!/usr/bin/env bash
# Installs the Debian 12 packages evmesh needs to build, test and run its demo (only those
# missing). Run as root (or with sudo available).
set -euo pipefail
packages=(
  # toolchain
  build-essential cmake ninja-build pkg-config git
  # libraries (all found by find_package/pkg-config in cmake/evmesh_deps.cmake)
  libzmq3-dev cppzmq-dev libmsgpack-cxx-dev libspdlog-dev libexpected-dev libcli11-dev
  libtomlplusplus-dev nlohmann-json3-dev libcpp-httplib-dev libssl-dev zlib1g-dev libbrotli-dev
  libgtest-dev libgmock-dev libsodium-dev libcurl4-openssl-dev libsqlite3-dev libsystemd-dev
  libboost-dev  # Boost.Beast/Asio: the HTTP stack (docs/HTTP-STACK.md); msgpack needs it too
  # benchmark: NATS side by side (the benchmark starts and stops nats-server itself)
  libnats-dev nats-server
  # outbound broker bridges (docs/BRIDGES.md): client libraries, and the real brokers and clients
  # bridges_test and bridge_bench start themselves on free ports (never the system services)
  librdkafka-dev librabbitmq-dev libmosquitto-dev libhiredis-dev
  mosquitto mosquitto-clients redis-server redis-tools rabbitmq-server
  python3-paho-mqtt python3-redis python3-pika
  # fuzzing (libFuzzer ships in clang's runtime package)
  clang libclang-rt-14-dev
  # integration tests, examples and demo (Debian's /usr/bin/python3 and its modules)
  python3 python3-zmq python3-msgpack python3-cryptography python3-aiosmtpd python3-jsonschema python3-websockets nodejs node-ws openssl curl iproute2 procps graphviz bsdutils tcpdump
  # the dashboard test in a real browser (headless Chromium driven by Selenium)
  chromium chromium-driver python3-selenium
  # operations tests: promtool (prometheus), man page lint (groff), the .deb (dpkg-dev for cpack)
  prometheus groff-base dpkg-dev systemd
)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]} == 0)); then
  echo "deps: all ${#packages[@]} packages present"
  exit 0
fi
echo "deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
# Packages with a daemon (prometheus, mosquitto, redis-server, rabbitmq-server) must not start it: tests start their own servers on free
# ports. policy-rc.d answering 101 tells invoke-rc.d not to start services during this install.
cleanup_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod 755 /usr/sbin/policy-rc.d
  cleanup_policy=1
fi
trap 'if [ -n "$cleanup_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi' EXIT
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
