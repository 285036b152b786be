#!/usr/bin/env bash
# The overlay series digest: sha256 over "<sha256>  <path>" lines of every file under patches/,
# sorted by path (byte order). Same value on the host (Makefile, tests) and in the image build.
#
#   container/series_digest.sh [REPO_DIR]
set -euo pipefail
cd "${1:-.}"
[[ -d patches ]] || { echo "series_digest: no patches/ under $PWD" >&2; exit 1; }
find patches -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
