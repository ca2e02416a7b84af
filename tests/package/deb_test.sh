#!/usr/bin/env bash
# The .deb (issue 16): cpack builds it, dpkg installs it, the installed node starts from the
# installed config and finds the installed plugins, systemd-analyze accepts the unit, and dpkg
# purges it all again. Needs root; skipped (77) otherwise, or when an evmesh package is already
# installed on this machine (never replaced by a test).
set -euo pipefail
build=$1
[ "$(id -u)" = 0 ] || { echo "SKIP: dpkg -i needs root"; exit 77; }
if dpkg-query -W -f='${Status}' evmesh 2>/dev/null | grep -q "install ok installed"; then
    echo "SKIP: an evmesh package is installed on this machine; the test does not replace it"
    exit 77
fi
work=$(mktemp -d /tmp/evmesh-deb.XXXXXX)
node_pid=""
installed=""
cleanup() {
    if [ -n "$node_pid" ]; then kill -9 "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true; fi
    if [ -n "$installed" ]; then dpkg --purge evmesh >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; [ -f "$work/node.log" ] && cat "$work/node.log"; exit 1; }

(cd "$build" && cpack -G DEB -B "$work/pkg") >"$work/cpack.log" 2>&1 || { cat "$work/cpack.log"; fail "cpack"; }
deb=$(ls "$work"/pkg/evmesh_*_*.deb)
echo "package: $(basename "$deb"), $(du -h "$deb" | cut -f1)"
contents=$(dpkg-deb -c "$deb")
for f in ./usr/bin/evmesh-node ./usr/bin/mesh-inspector ./usr/lib/evmesh/channels/evmesh_channel_webhook.so \
         ./lib/systemd/system/evmesh-node.service ./etc/evmesh/evmesh-node.toml ./var/lib/evmesh/ \
         ./usr/share/man/man1/evmesh-node.1 ./usr/share/man/man1/mesh-inspector.1 \
         ./usr/include/evmesh/node.hpp ./usr/lib/cmake/evmesh/evmesh-config.cmake ./usr/lib/pkgconfig/evmesh.pc; do
    grep -q " $f\$" <<<"$contents" || fail "$f is not in the package"
done
# every channel plugin this build made (webhook, email, file, exec, http, the broker bridges)
for so in "$build"/channels/evmesh_channel_*.so; do
    name=$(basename "$so")
    [ "$name" = evmesh_channel_stdout-example.so ] && continue  # an example, not installed
    grep -q " ./usr/lib/evmesh/channels/$name\$" <<<"$contents" || fail "$name is not in the package"
done
dpkg-deb -f "$deb" Depends | grep -q libzmq5 || fail "Depends has no libzmq5"
[ "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)" = "/etc/evmesh/evmesh-node.toml" ] || fail "conffiles"

installed=1
dpkg -i "$deb" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i"; }
dpkg -s evmesh | grep -q "Status: install ok installed" || fail "not installed"
/usr/bin/evmesh-node --version
/usr/bin/evmesh-node --check-config /etc/evmesh/evmesh-node.toml || fail "the installed config does not validate"
out=$(systemd-analyze verify /lib/systemd/system/evmesh-node.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify says: $out"
grep -q '^Type=notify' /lib/systemd/system/evmesh-node.service || fail "unit is not Type=notify"

# The installed node, from the installed config plus one webhook channel: the plugin must be
# found in the installed plugin directory (no EVMESH_CHANNEL_PATH, no --plugin-dir).
cat /etc/evmesh/evmesh-node.toml - >"$work/node.toml" <<CONF
[[channel]]
name = "partner"
plugin = "webhook"
topics = ["orders.>"]
[channel.settings]
url = "http://127.0.0.1:9/none"
allow_private = true
CONF
sed -i "s|^path = \"/var/lib/evmesh/outbox.db\"|path = \"$work/outbox.db\"|" "$work/node.toml"
env -u EVMESH_CHANNEL_PATH /usr/bin/evmesh-node --config "$work/node.toml" --no-mesh \
    --pub-endpoint 'tcp://127.0.0.1:*' --sub-endpoint 'tcp://127.0.0.1:*' --http 127.0.0.1:0 \
    --ready-file "$work/ready.json" >"$work/stdout" 2>"$work/node.log" &
node_pid=$!
for _ in $(seq 100); do [ -s "$work/ready.json" ] && break; sleep 0.1; done
[ -s "$work/ready.json" ] || fail "the installed node did not become ready"
http=$(/usr/bin/python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$work/ready.json")
[ "$(curl -fsS "http://$http/healthz")" = "ok" ] || fail "healthz"
grep -q "plugin webhook (/usr/lib/evmesh/channels/evmesh_channel_webhook.so)" "$work/node.log" \
    || fail "the webhook plugin was not loaded from the installed directory"
kill -TERM "$node_pid"
wait "$node_pid" || fail "the node did not stop cleanly"
node_pid=""

dpkg --purge evmesh >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg --purge"; }
installed=""
[ ! -e /usr/bin/evmesh-node ] || fail "purge left /usr/bin/evmesh-node"
[ ! -e /etc/evmesh/evmesh-node.toml ] || fail "purge left the conffile"
echo "deb_test: passed"
