#!/usr/bin/env bash
# Installs what edgemt's tests and demo need beyond the Rust toolchain: the mosquitto broker
# and its command-line clients from Debian's packages, and onnxruntime for the export test
# (each skipped when already installed).
set -euo pipefail
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "setup: installing ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# onnxruntime (in a venv under tools/) for the export round-trip test and the Python tools,
# and the Prometheus client's text-format parser for the metrics endpoint test.
cd "$(dirname "$0")/.."
if ! tools/.venv/bin/python -c "import onnxruntime, numpy, prometheus_client" >/dev/null 2>&1; then
  echo "setup: installing numpy, onnxruntime and prometheus-client into tools/.venv" >&2
  [ -x tools/.venv/bin/python ] || python3 -m venv tools/.venv
  tools/.venv/bin/pip install -q --disable-pip-version-check numpy onnxruntime prometheus-client==0.26.0
fi
