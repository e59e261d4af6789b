#!/usr/bin/env bash
# netfence developer entry point. Installs what it needs, then runs one job:
#   ./run.sh demo    the lab demo: a flannel-shaped cluster in network namespaces (root)
#   ./run.sh test    the whole test suite (root for kernel and lab tests)
#   ./run.sh setup   only install (system packages, .venv, netfence in editable mode)
#   ./run.sh python  only print the Python that setup makes the .venv with (none: exit 1)
# On Debian as root it installs everything from a bare system, Python included.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES="nftables libnftables1 iproute2 iperf3 kmod procps util-linux containernetworking-plugins"
# Only when no usable Python is found: Debian's python3 (3.11 on bookworm, 3.13 on trixie) and
# python3-venv, without which `python3 -m venv` fails (Debian splits ensurepip out of python3).
APT_PYTHON_PACKAGES="python3 python3-venv"

# The first Python >= 3.11 that can make a virtualenv. python3.11 first: a pyenv 3.11 where one
# is installed; a pyenv shim of a version that is not selected fails the check and is skipped.
find_python() {
    local candidate
    for candidate in python3.11 python3.13 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

venv_usable() {
    [ -x .venv/bin/python ] && .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

setup() {
    local packages="$APT_PACKAGES" python
    if ! venv_usable && ! find_python >/dev/null; then
        packages="$packages $APT_PYTHON_PACKAGES"
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
    else
        echo "run.sh: not root (or no apt-get): skipping system packages ($packages)" >&2
    fi
    if ! venv_usable; then
        if ! python=$(find_python); then
            echo "run.sh: no Python >= 3.11 with venv found (tried python3.11, python3.13, python3.12, python3);" \
                 "install python3 and python3-venv (Debian 12 or newer), or run this as root on Debian" >&2
            exit 1
        fi
        "$python" -m venv --clear .venv
    fi
    .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
}

case "${1:-}" in
    setup)
        setup ;;
    python)
        find_python || { echo "run.sh: no Python >= 3.11 with venv found" >&2; exit 1; } ;;
    demo)
        setup
        exec .venv/bin/netfence lab demo ;;
    test)
        setup
        shift
        # pytest exits 5 when it collected no tests; that is a failure here too.
        exec .venv/bin/pytest "$@" ;;
    *)
        echo "usage: $0 demo|test|setup|python" >&2
        exit 2 ;;
esac
