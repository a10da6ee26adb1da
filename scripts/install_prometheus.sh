#!/usr/bin/env bash
# Unpack Debian's `prometheus` package (server + promtool) into DIR without installing it, so no
# daemon is started and nothing listens on :9090. Idempotent: a second call only prints the paths.
#
#   scripts/install_prometheus.sh DIR
#
# Prints two lines: "prometheus=<path>" and "promtool=<path>".
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
dir=$1
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
prom="$dir/usr/bin/prometheus"
tool="$dir/usr/bin/promtool"

if [[ ! -x "$prom" || ! -x "$tool" ]]; then
    if ! command -v apt-get >/dev/null || ! command -v dpkg >/dev/null; then
        echo "install_prometheus.sh: apt-get and dpkg are needed to fetch Debian's prometheus package" >&2
        exit 1
    fi
    work=$(mktemp -d "$dir/.download.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    # `apt-get download` writes into the current directory; refresh the lists only when the
    # package is unknown (a fresh container has no lists).
    if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
        apt-get update -qq >/dev/null
        (cd "$work" && apt-get download prometheus >/dev/null)
    fi
    deb=$(ls "$work"/prometheus_*.deb)
    # Unpack into a scratch folder first, then move the binaries into place, so a killed run never
    # leaves a half-written binary that a later call would take as cached.
    dpkg -x "$deb" "$work/root"
    mkdir -p "$dir/usr/bin"
    for b in prometheus promtool; do
        if [[ ! -x "$work/root/usr/bin/$b" ]]; then
            echo "install_prometheus.sh: $deb has no usr/bin/$b" >&2
            exit 1
        fi
        mv -f "$work/root/usr/bin/$b" "$dir/usr/bin/$b.tmp"
        mv -f "$dir/usr/bin/$b.tmp" "$dir/usr/bin/$b"
    done
    # Keep the package's console templates/libraries too (the web UI flags reference them).
    if [[ -d "$work/root/usr/share/prometheus" ]]; then
        rm -rf "$dir/usr/share/prometheus"
        mkdir -p "$dir/usr/share"
        mv "$work/root/usr/share/prometheus" "$dir/usr/share/prometheus"
    fi
    basename "$deb" >"$dir/PACKAGE"
fi

echo "prometheus=$prom"
echo "promtool=$tool"
