#!/usr/bin/env bash
# Assemble local Debian 12 (bookworm) base images with debootstrap, for machines that reach
# Debian's mirror and PyPI but no image registry (so no `FROM python:3.11-slim` pull).
#
#   tests/container/build_base.sh stock   -> localhost/nexlm-debian12-stock
#       a fresh Debian 12 as a user would have it after README's prerequisites:
#       python3 (3.11), python3-venv, python3-pip (Debian's pip 23.0.1), build-essential, cmake
#   tests/container/build_base.sh slim    -> localhost/nexlm-python311-slim
#       a stand-in for python:3.11-slim: Debian's python3 3.11 in a venv at /usr/local/python
#       that is first on PATH (`python`, `pip`), a current pip, no compiler
#
# Usage: build_base.sh stock|slim [IMAGE_NAME]. Needs root, debootstrap and podman.
# MIRROR (default: the Debian mirror apt uses here, else http://deb.debian.org/debian).
set -euo pipefail
flavor=${1:?usage: build_base.sh stock|slim [IMAGE_NAME]}
case "$flavor" in
  stock) image=${2:-localhost/nexlm-debian12-stock}
         include=python3,python3-venv,python3-pip,ca-certificates,build-essential,cmake ;;
  slim)  image=${2:-localhost/nexlm-python311-slim}
         include=python3,python3-venv,ca-certificates ;;
  *) echo "unknown flavor: $flavor (stock or slim)" >&2; exit 2 ;;
esac
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(grep -rhoE '^(deb|URIs:) +(\[[^]]*\] +)?https?://[^ ]+/debian/?( |$)' \
             /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
           | grep -oE 'https?://[^ ]+' | head -n1 || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi
root=$(mktemp -d /var/tmp/nexlm-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm ($flavor: $include) from $MIRROR" >&2
debootstrap --variant=minbase --include="$include" bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
changes=(--change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]')
if [ "$flavor" = slim ]; then
  # The image's pip is a current one from PyPI, fetched here with this machine's pip settings
  # (the image itself carries no machine-specific configuration).
  wheeldir=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$wheeldir" pip
  cp "$wheeldir"/pip-*.whl "$root/tmp/"
  rm -rf "$wheeldir"
  chroot "$root" /usr/bin/python3 -m venv /usr/local/python
  chroot "$root" /bin/sh -c '/usr/local/python/bin/python -m pip install --quiet --no-index --disable-pip-version-check /tmp/pip-*.whl && rm -f /tmp/pip-*.whl'
  changes+=(--change 'ENV PATH=/usr/local/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
            --change 'CMD ["python3"]')
else
  changes+=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
fi
# What a Debian container image leaves out: package lists, caches, docs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
tar --numeric-owner -C "$root" -c . | podman import "${changes[@]}" - "$image" >/dev/null
echo "$image"
