#!/bin/sh
# Renders an SVG (e.g. from `edgemt replay --plot`) to a PNG with headless Chromium, to look
# at it the way a browser shows it:
#
#     tools/eval/plot_screenshot.sh timeline.svg [out.png] [WIDTHxHEIGHT]
#
# Needs Debian's `chromium` (apt-get install chromium). Writes out.png (default: the SVG's
# name with .png) at the window size (default 1200x800, which fits --plot's 1200 x 760).
set -eu
svg=${1:?usage: $0 FILE.svg [OUT.png] [WIDTHxHEIGHT]}
out=${2:-${svg%.svg}.png}
size=${3:-1200x800}
[ -f "$svg" ] || { echo "$0: no such file: $svg" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "$0: chromium not found (apt-get install chromium)" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
abs=$(cd "$(dirname "$svg")" && pwd)/$(basename "$svg")
case $out in /*) ;; *) out=$(pwd)/$out ;; esac
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --screenshot="$out" --window-size="${size%x*},${size#*x}" \
    "file://$abs" 2>/dev/null
[ -s "$out" ] || { echo "$0: chromium wrote no screenshot" >&2; exit 1; }
echo "$out"
