#!/usr/bin/env bash
# Cross-builds fleetgate and fleetgate-sim for Raspberry Pi-class hosts and packages them as
# .deb files, from an x86-64 Debian or Ubuntu machine, without Docker.
# Usage: packaging/build-debs.sh [arm64] [armhf]   (default: both)
# Output: target/debian/fleetgate_<version>-1_<arch>.deb and fleetgate-sim_<version>-1_<arch>.deb
#   (under $CARGO_TARGET_DIR instead of target/ when that is set)
#   arm64: aarch64-unknown-linux-gnu (64-bit Raspberry Pi OS, Pi 3/4/5, Zero 2 W)
#   armhf: armv7-unknown-linux-gnueabihf (32-bit OS on ARMv7 or later; not Pi 1 or Zero W)
# Installs what it lacks: the Rust targets (rustup) and the cross C toolchains (apt-get, which
# needs root or sudo). The binaries use the `dist` profile of the root Cargo.toml; the linkers
# are set in .cargo/config.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022
# Debian requires a maintainer address; set DEB_MAINTAINER to the real one when publishing.
maintainer=${DEB_MAINTAINER:-fleetgate developers <fleetgate@example.invalid>}

arches=("$@")
[ ${#arches[@]} -gt 0 ] || arches=(arm64 armhf)
for arch in "${arches[@]}"; do
  case "$arch" in
    arm64 | armhf) ;;
    *) echo "unknown architecture '$arch' (arm64 or armhf)" >&2; exit 64 ;;
  esac
done

triple() { case "$1" in arm64) echo aarch64-unknown-linux-gnu ;; armhf) echo armv7-unknown-linux-gnueabihf ;; esac; }
gnu() { case "$1" in arm64) echo aarch64-linux-gnu ;; armhf) echo arm-linux-gnueabihf ;; esac; }
# The C library for the target is only a Recommends of the cross compiler: named here.
apt_pkgs() { case "$1" in arm64) echo gcc-aarch64-linux-gnu libc6-dev-arm64-cross ;; armhf) echo gcc-arm-linux-gnueabihf libc6-dev-armhf-cross ;; esac; }

# --- what the build needs
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
need_apt=()
for arch in "${arches[@]}"; do
  g=$(gnu "$arch")
  if ! command -v "$g-gcc" >/dev/null 2>&1 || [ ! -e "/usr/$g/lib/libc.so" ]; then
    read -r -a pkgs <<< "$(apt_pkgs "$arch")"
    need_apt+=("${pkgs[@]}")
  fi
done
command -v dpkg-deb >/dev/null 2>&1 || need_apt+=(dpkg)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y --no-install-recommends "${need_apt[@]}" \
    || { "${sudo[@]}" apt-get update && "${sudo[@]}" apt-get install -y --no-install-recommends "${need_apt[@]}"; }
fi
for arch in "${arches[@]}"; do
  t=$(triple "$arch")
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done

version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "no version in [workspace.package] of Cargo.toml" >&2; exit 1; }
debversion="$version-1"
target_dir=${CARGO_TARGET_DIR:-target}
out=$target_dir/debian
mkdir -p "$out"

# Debian packages that provide the shared libraries a binary links (readelf NEEDED), with the
# newest glibc symbol version it uses as the libc6 lower bound.
depends() {
  local bin=$1 gnu=$2 libs glibc deps=() lib
  libs=$("$gnu-readelf" -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
  glibc=$("$gnu-objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
  deps+=("libc6 (>= $glibc)")
  for lib in $libs; do
    case "$lib" in
      libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | ld-linux*) ;;
      libgcc_s.so.1) deps+=("libgcc-s1") ;;
      *) echo "$bin links $lib: no Debian package known for it" >&2; return 1 ;;
    esac
  done
  local IFS=,
  echo "${deps[*]}" | sed 's/,/, /g'
}

# package NAME ARCH STAGE_DIR DEPENDS DESCRIPTION: writes DEBIAN/control and builds the .deb.
package() {
  local name=$1 arch=$2 stage=$3 deps=$4 description=$5 size
  size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
  mkdir -p "$stage/DEBIAN"
  cat > "$stage/DEBIAN/control" <<CONTROL
Package: $name
Version: $debversion
Architecture: $arch
Maintainer: $maintainer
Section: net
Priority: optional
Installed-Size: $size
Depends: $deps
Homepage: https://github.com/fleetgate/fleetgate
Description: $description
CONTROL
  dpkg-deb --root-owner-group -Zxz --build "$stage" "$out/${name}_${debversion}_${arch}.deb" >/dev/null
}

copyright() {
  cat <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fleetgate
Source: https://github.com/fleetgate/fleetgate

Files: *
Copyright: fleetgate developers
License: Apache-2.0
 On Debian systems the full text of the license is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
}

for arch in "${arches[@]}"; do
  t=$(triple "$arch")
  g=$(gnu "$arch")
  echo "== building for $arch ($t)"
  cargo build --locked --profile dist --target "$t" -p fleetgate -p fleetgate-sim
  bin="$target_dir/$t/dist"

  # fleetgate: the gateway, its config, its service.
  stage="$out/stage/fleetgate_$arch"
  rm -rf "$stage"
  install -D -m 0755 "$bin/fleetgate" "$stage/usr/bin/fleetgate"
  {
    cat <<'HEADER'
# /etc/fleetgate/fleetgate.toml: configuration of the fleetgate service. Your changes are kept
# on upgrade. Apply them with `systemctl restart fleetgate`; check them first with
# `fleetgate config check /etc/fleetgate/fleetgate.toml`.
#
# This file is the 512 MB preset (below). On a host with 1 GB or more, replace it with
# /usr/share/fleetgate/presets/1gb.toml. Every setting not named here keeps its default:
# `fleetgate config default` prints them all, each with its meaning.
#
# To register bundles, add your release key (`fleetgate keys generate` prints it) under
# [registry]: trusted_keys = ["<64 hex characters>"].
#
HEADER
    cat packaging/presets/512mb.toml
  } > "$out/fleetgate.toml"
  install -D -m 0640 "$out/fleetgate.toml" "$stage/etc/fleetgate/fleetgate.toml"
  install -D -m 0644 packaging/fleetgate.service "$stage/usr/lib/systemd/system/fleetgate.service"
  install -D -m 0644 packaging/presets/512mb.toml "$stage/usr/share/fleetgate/presets/512mb.toml"
  install -D -m 0644 packaging/presets/1gb.toml "$stage/usr/share/fleetgate/presets/1gb.toml"
  install -D -m 0644 README.md "$stage/usr/share/doc/fleetgate/README.md"
  copyright > "$stage/usr/share/doc/fleetgate/copyright"
  mkdir -p "$stage/DEBIAN"
  install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$stage/DEBIAN/"
  echo /etc/fleetgate/fleetgate.toml > "$stage/DEBIAN/conffiles"
  package fleetgate "$arch" "$stage" "adduser, $(depends "$bin/fleetgate" "$g")" \
    "edge gateway for fleets of TinyML devices
 MQTT front for devices, telemetry ingest, signed model and firmware registry,
 drift detection and staged rollouts with automatic rollback, behind an HTTP API.
 Runs as the systemd service fleetgate."

  # fleetgate-sim: simulated devices, for checking a site's gateway; no service.
  stage="$out/stage/fleetgate-sim_$arch"
  rm -rf "$stage"
  install -D -m 0755 "$bin/fleetgate-sim" "$stage/usr/bin/fleetgate-sim"
  mkdir -p "$stage/usr/share/doc/fleetgate-sim"
  copyright > "$stage/usr/share/doc/fleetgate-sim/copyright"
  package fleetgate-sim "$arch" "$stage" "$(depends "$bin/fleetgate-sim" "$g")" \
    "simulated devices for fleetgate
 Enrolls and runs simulated devices against a fleetgate gateway: telemetry,
 alerts, updates and rollbacks, for functional and load checks."
done
rm -rf "$out/stage" "$out/fleetgate.toml"

echo "== built"
for arch in "${arches[@]}"; do
  t=$(triple "$arch")
  ls -l "$target_dir/$t/dist/fleetgate" "$target_dir/$t/dist/fleetgate-sim"
  ls -l "$out/fleetgate_${debversion}_$arch.deb" "$out/fleetgate-sim_${debversion}_$arch.deb"
done
