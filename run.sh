#!/usr/bin/env bash
# netfence developer entry point. Installs what it needs, then runs one job:
#   ./run.sh demo    the lab demo: a flannel-shaped cluster in network namespaces (root)
#   ./run.sh test    the whole test suite (root for kernel and lab tests)
#   ./run.sh setup   only install (system packages, .venv, netfence in editable mode)
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES="nftables libnftables1 iproute2 iperf3 kmod procps"

setup() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT_PACKAGES >/dev/null
    else
        echo "run.sh: not root (or no apt-get): skipping system packages ($APT_PACKAGES)" >&2
    fi
    local python=python3.11
    command -v "$python" >/dev/null || python=python3
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
}

case "${1:-}" in
    setup)
        setup ;;
    demo)
        setup
        exec .venv/bin/netfence lab demo ;;
    test)
        setup
        shift
        # pytest exits 5 when it collected no tests; that is a failure here too.
        exec .venv/bin/pytest "$@" ;;
    *)
        echo "usage: $0 demo|test|setup" >&2
        exit 2 ;;
esac
