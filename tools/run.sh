#!/usr/bin/env bash
# Set up everything zipfs needs on a fresh Debian/Ubuntu machine, then run one job:
#   bash tools/run.sh demo   ingest a real model family, verify it, print the savings
#   bash tools/run.sh test   lint and run the test suite
set -euo pipefail
cd "$(dirname "$0")/.."

setup() {
    local py="${PYTHON:-}" need=() sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    if [ -z "$py" ]; then
        for c in python3.11 python3.12 python3; do command -v "$c" >/dev/null && { py=$c; break; }; done
    fi
    [ -n "$py" ] || need+=(python3 python3-venv python3-dev)
    # rsync: the write tests copy models in with it; autoconf, automake, perl: pjdfstest builds and runs
    for p in fuse3 libfuse3-dev libzstd-dev pkg-config gcc rsync autoconf automake perl; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
    if [ -n "$py" ]; then  # Debian's own Python needs its venv module and headers (pyfuse3 compiles)
        "$py" -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
        "$py" -c 'import os, sysconfig; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' \
            2>/dev/null || need+=(python3-dev)
    fi
    if ((${#need[@]})); then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
        [ -n "$py" ] || py=python3
    fi
    [ -x .venv/bin/python ] || "$py" -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,hf]'
}

case "${1:-}" in
    demo)
        setup
        exec .venv/bin/python tools/demo.py "${@:2}"
        ;;
    test)
        setup
        .venv/bin/python -m ruff check zipfs tools tests
        rc=0
        .venv/bin/python -m pytest "${@:2}" || rc=$?
        if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
        exit "$rc"
        ;;
    *)
        echo "usage: bash tools/run.sh demo|test [args]" >&2
        exit 2
        ;;
esac
