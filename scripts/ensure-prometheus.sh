#!/usr/bin/env bash
# Makes sure `prometheus` and `promtool` are installed for the alert tests
# (tests/tests/alerts.rs): installs Debian's `prometheus` package when either
# is missing, without its recommends (node exporter, web assets). The
# package's own service is not started here; the tests run their own
# Prometheus on a free loopback port.
set -euo pipefail

say() { echo "ensure-prometheus: $*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  say "Prometheus is not installed; installing it from Debian's packages"
  as_root apt-get update -qq
  # policy-rc.d-free environments (containers) would start the packaged
  # service: RUNLEVEL=1 keeps invoke-rc.d from doing so.
  as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get install -y -qq --no-install-recommends prometheus
fi
say "$(promtool --version 2>&1 | head -n1)"
