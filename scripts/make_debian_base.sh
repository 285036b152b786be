#!/usr/bin/env bash
# Make a local Debian base image for the cpu flavour when no image registry is reachable:
# debootstrap (minbase + python3, python3-venv, python3-dev, ca-certificates, libnuma1, g++) piped into
# `docker import` (the packages the Dockerfile's cpu stage would otherwise install with apt).
#
#   scripts/make_debian_base.sh [TAG]        (default: ddtree-vllm-base:bookworm)
#
# The Debian mirror is taken from DEBIAN_MIRROR, else from this machine's own apt sources, so no host
# name is written here. An existing TAG is reused (delete it to rebuild). Needs root and debootstrap.
set -euo pipefail
tag=${1:-ddtree-vllm-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag exists"; exit 0
fi
command -v debootstrap >/dev/null || { echo "make_debian_base: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }
mirror=${DEBIAN_MIRROR:-}
if [[ -z "$mirror" ]]; then
  # deb822 sources first ("URIs: ..." in a stanza whose Suites has $suite), then one-line sources.
  mirror=$(awk -v s="$suite" '
    /^URIs:/ {u=$2} /^Suites:/ {for (i=2;i<=NF;i++) if ($i==s && u!="") {print u; exit}}
    /^$/ {u=""}' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
fi
if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
  mirror=$(awk -v s="$suite" '$1=="deb" && $3==s {print $2; exit}' /etc/apt/sources.list)
fi
[[ -n "$mirror" ]] || { echo "make_debian_base: no Debian mirror found for $suite; set DEBIAN_MIRROR" >&2; exit 2; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
start=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates,libnuma1,g++ "$suite" "$root" "$mirror" \
  > "${BASE_LOG:-/dev/null}" 2>&1 || { echo "make_debian_base: debootstrap failed (log: ${BASE_LOG:-set BASE_LOG})" >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "base image $tag made in $(( $(date +%s) - start )) s"
