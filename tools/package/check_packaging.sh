#!/usr/bin/env bash
# Verifies packaging/edgemt.service with `systemd-analyze verify` and fails on ANY stderr
# output (systemd-analyze only warns, with exit status 0, about most problems).
#
# /usr/bin/edgemt usually does not exist on the build machine (it does once the .deb is
# installed), and verify complains about a missing ExecStart binary; so by default a temporary
# copy of the unit is verified whose ExecStart binary is replaced with an existing one
# (EDGEMT_BIN, default /bin/true), keeping the arguments. Pass --as-is to verify the unit
# untouched (e.g. on a board after installing the package).
#
# Installs systemd with apt-get if systemd-analyze is missing and apt is available (as root);
# otherwise skips with a message (exit 0). Also prints the `systemd-analyze security` score.
set -euo pipefail

cd "$(dirname "$0")/../.."
unit=packaging/edgemt.service
as_is=0
[[ "${1:-}" == "--as-is" ]] && as_is=1

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]]; then
        echo "check_packaging: installing systemd (for systemd-analyze) with apt-get" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
    else
        echo "check_packaging: SKIP: systemd-analyze not found and cannot apt-get install systemd"
        exit 0
    fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Same file name: verify derives the unit name and type from it.
if [[ $as_is -eq 1 ]]; then
    cp "$unit" "$tmp/edgemt.service"
else
    bin=${EDGEMT_BIN:-/bin/true}
    sed "s|^ExecStart=[^ ]*/edgemt |ExecStart=$bin |" "$unit" > "$tmp/edgemt.service"
    if ! grep -q "^ExecStart=$bin " "$tmp/edgemt.service"; then
        echo "check_packaging: FAIL: no 'ExecStart=<path>/edgemt ...' line in $unit to substitute"
        exit 1
    fi
    echo "check_packaging: verifying a copy of $unit with ExecStart binary $bin:"
    grep '^ExecStart=' "$tmp/edgemt.service"
fi

status=0
systemd-analyze verify "$tmp/edgemt.service" 2>"$tmp/stderr" || status=$?
if [[ -s "$tmp/stderr" || $status -ne 0 ]]; then
    echo "check_packaging: FAIL: systemd-analyze verify (exit $status) reported:"
    cat "$tmp/stderr"
    exit 1
fi
echo "check_packaging: systemd-analyze verify: OK (no output)"
systemd-analyze security --offline=true "$unit" 2>&1 | tail -n 1
