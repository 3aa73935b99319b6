#!/bin/sh
# Build a Debian bookworm base image (python3 3.11 + venv + CA certificates) without any registry:
# debootstrap it into a folder and import that as an image. For machines that cannot pull python:3.11-slim.
#   docker/base-image.sh podman localhost/cadence-base:bookworm
# Needs root and debootstrap (apt-get install -y debootstrap); the mirror is the host's Debian mirror.
set -eu
engine=${1:?usage: base-image.sh ENGINE IMAGE}
image=${2:?usage: base-image.sh ENGINE IMAGE}
mirror=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *//p; s/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) bookworm .*/\2/p' \
    /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1)}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >/dev/null
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | "$engine" import - "$image"
