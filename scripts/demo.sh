#!/usr/bin/env bash
# The main job: installs what is missing, builds, and runs a live mesh on this host.
#   three evmesh-node sidecars find each other (host-only discovery), an embedded C++ service
#   joins with its own node, a Python "orders service" publishes, a C++ "partner" and a Python
#   "audit" subscriber receive on other nodes. Ends by itself after DEMO_SECONDS (default 12) or
#   on Ctrl-C, and cleans up every process it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/build.sh
exec /usr/bin/python3 examples/open-platform/demo.py "$@"
