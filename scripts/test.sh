#!/usr/bin/env bash
# Install on a fresh machine and run the test suite (CPU, tiny CLIP config), lint and the docs build.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
# System tools the tests use against the real thing: a PACS (Orthanc + its DICOMweb plugin) and dcm2niix.
# Installed where this machine allows (root with apt); otherwise the tests that need them skip with the reason.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=""
    for pkg in orthanc orthanc-dicomweb dcm2niix; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        echo "installing system test tools:$missing"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing) \
            >/tmp/madclip-apt.log 2>&1 || echo "could not install$missing (see /tmp/madclip-apt.log): their tests will skip"
    fi
fi
ruff check .                  # lint (pyproject.toml [tool.ruff])
ruff format --check .         # formatting
mkdocs build --strict -q      # the docs site: a broken link or anchor fails
benchmarks/gpu_check.sh    # on a CPU-only machine: one line, exit 0; with a GPU: the full GPU check
python -m pytest -q "$@"   # exits 5 when no tests ran: never masked
