#!/usr/bin/env bash
# Checks the man pages in docs/man against the built binaries, so that the pages cannot drift:
#  * each page renders without a groff warning (`groff -man -Tutf8 -ww -z` prints nothing);
#  * evmesh-node.1 names every long option that `evmesh-node --help` prints;
#  * mesh-inspector.1 names every long option of `mesh-inspector --help`, has an entry for every
#    subcommand it lists, and names every long option of `mesh-inspector SUBCOMMAND --help`.
# Exit 0 when all checks pass, 1 when one fails (each failure is reported on stderr), 2 on misuse.
#   man_check.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
if [[ $# -ne 2 ]]; then
    echo "usage: $0 SOURCE_DIR BUILD_DIR" >&2
    exit 2
fi
src=$1
build=$2
tmp=$(mktemp -d /tmp/evmesh-man-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

fail() {
    echo "man_check: $*" >&2
    failed=$((failed + 1))
}

# The page's source with the roff escapes that can sit inside an option name removed:
# \- (minus), font changes (\fB, \f(CW, \f[B]), \& and \% (zero-width).
page_text() {
    sed -e 's/\\-/-/g' -e 's/\\f[BIRP]//g' -e 's/\\f([A-Za-z][A-Za-z]//g' -e 's/\\f\[[^]]*\]//g' \
        -e 's/\\&//g' -e 's/\\%//g' "$1"
}

# The long options (--name) printed in a --help output read from stdin.
long_options() {
    grep -oE -- '--[A-Za-z0-9][A-Za-z0-9-]*' | sort -u || true
}

# render PAGE: groff must print nothing on stderr and succeed.
render() {
    local page=$1 rc=0
    groff -man -Tutf8 -ww -z "$page" 2>"$tmp/groff.err" || rc=$?
    if [[ -s $tmp/groff.err || $rc -ne 0 ]]; then
        fail "$page: groff -man -Tutf8 -ww -z (exit $rc) printed:"
        sed 's/^/    /' "$tmp/groff.err" >&2
    else
        passed=$((passed + 1))
    fi
}

# options PAGE_TEXT LABEL: every option on stdin must appear in the page as a whole word
# (--mesh is not satisfied by --mesh-port).
options() {
    local text=$1 label=$2 opt missing=0
    while read -r opt; do
        [[ -n $opt ]] || continue
        if ! grep -qE -- "(^|[^A-Za-z0-9-])${opt}([^A-Za-z0-9-]|\$)" "$text"; then
            fail "$label: option $opt is missing from the page"
            missing=1
        fi
    done
    if [[ $missing -eq 0 ]]; then
        passed=$((passed + 1))
    fi
}

# help OUT BINARY ARGS...: writes BINARY ARGS --help to OUT; a failure when it cannot run.
help_of() {
    local out=$1 rc=0
    shift
    "$@" --help >"$out" 2>&1 || rc=$?
    if [[ $rc -ne 0 ]]; then
        fail "'$* --help' exited $rc"
        return 1
    fi
}

node_page=$src/docs/man/evmesh-node.1
inspector_page=$src/docs/man/mesh-inspector.1
node_bin=$build/nodes/evmesh-node
inspector_bin=$build/tools/mesh-inspector
for f in "$node_page" "$inspector_page" "$node_bin" "$inspector_bin"; do
    if [[ ! -e $f ]]; then
        fail "$f does not exist"
    fi
done
if [[ $failed -ne 0 ]]; then
    exit 1
fi

render "$node_page"
render "$inspector_page"

page_text "$node_page" >"$tmp/node.txt"
if help_of "$tmp/node.help" "$node_bin"; then
    options "$tmp/node.txt" "evmesh-node.1 (evmesh-node --help)" < <(long_options <"$tmp/node.help")
fi

page_text "$inspector_page" >"$tmp/inspector.txt"
if help_of "$tmp/inspector.help" "$inspector_bin"; then
    options "$tmp/inspector.txt" "mesh-inspector.1 (mesh-inspector --help)" < <(long_options <"$tmp/inspector.help")
    # the names listed under "Subcommands:", two spaces in
    subcommands=$(sed -n '/^Subcommands:/,$p' "$tmp/inspector.help" | sed -nE 's/^  ([a-z][a-z0-9-]*)( .*)?$/\1/p')
    if [[ -z $subcommands ]]; then
        fail "mesh-inspector --help lists no subcommands"
    fi
    for sub in $subcommands; do
        # an entry for the subcommand: a .TP tag in bold starting with its name (.B top, .BI "tail " ...)
        if awk 'tag { print } { tag = /^\.TP/ }' "$tmp/inspector.txt" \
            | grep -qE -- "^\.B[IR]?[[:space:]]+\"?${sub}([[:space:]\"]|\$)"; then
            passed=$((passed + 1))
        else
            fail "mesh-inspector.1: no entry for subcommand '$sub'"
        fi
        if help_of "$tmp/sub.help" "$inspector_bin" "$sub"; then
            options "$tmp/inspector.txt" "mesh-inspector.1 (mesh-inspector $sub --help)" < <(long_options <"$tmp/sub.help")
        fi
    done
fi

echo "man: $passed passed, $failed failed"
if [[ $failed -ne 0 ]]; then
    exit 1
fi
