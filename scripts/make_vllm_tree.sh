#!/usr/bin/env bash
# Produce a pristine Python tree of the pinned vLLM (v0.26.0) in build/vllm-tree/vllm.
#
# Source, in order: the `vllm` git submodule when it is checked out (verified to sit at the pinned
# commit), else the pinned `vllm==0.26.0` wheel from the package registry (its Python sources are the
# tag's). Compiled extensions are left out: the tree is for reading, diffing and overlay tests.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/build/vllm-tree}
PIN_COMMIT=ffd46bfab2128bb84146050e98b51a617c6575ab
PIN_VERSION=0.26.0
python=${PYTHON:-python3}

verify() {
  local v
  v=$(sed -n "s/^__version__ = version = '\(.*\)'$/\1/p" "$out/vllm/_version.py")
  [[ "$v" == "$PIN_VERSION" ]] || { echo "make_vllm_tree: $out has vLLM '$v', expected $PIN_VERSION" >&2; exit 1; }
  grep -q "commit_id = 'g${PIN_COMMIT:0:9}'" "$out/vllm/_version.py" \
    || { echo "make_vllm_tree: $out/vllm/_version.py does not record commit ${PIN_COMMIT:0:9}" >&2; exit 1; }
  echo "vllm-tree: $out/vllm is vLLM $v (commit ${PIN_COMMIT:0:9}, from $1)"
}

if [[ -f "$out/.pristine-from" ]]; then verify "$(cat "$out/.pristine-from")"; exit 0; fi
rm -rf "$out" && mkdir -p "$out"
if [[ -f "$here/vllm/vllm/__init__.py" ]]; then
  head=$(git -C "$here/vllm" rev-parse HEAD)
  [[ "$head" == "$PIN_COMMIT" ]] || { echo "make_vllm_tree: submodule vllm is at $head, expected $PIN_COMMIT" >&2; exit 1; }
  [[ -z "$(git -C "$here/vllm" status --porcelain -- vllm)" ]] || { echo "make_vllm_tree: submodule has local changes" >&2; exit 1; }
  git -C "$here/vllm" archive "$PIN_COMMIT" vllm | tar -x -C "$out"
  # A git checkout has no generated _version.py; write the one the release wheel carries.
  printf "__version__ = version = '%s'\n__version_tuple__ = version_tuple = (0, 26, 0)\n__commit_id__ = commit_id = 'g%s'\n" \
    "$PIN_VERSION" "${PIN_COMMIT:0:9}" > "$out/vllm/_version.py"
  src="submodule"
else
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  "$python" -m pip download --quiet --no-deps --only-binary :all: -d "$tmp" "vllm==$PIN_VERSION"
  "$python" - "$tmp"/vllm-"$PIN_VERSION"-*.whl "$out" <<'PY'
import sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("vllm/") and not (n.endswith(".so") or ".so." in n):
            z.extract(n, out)
PY
  src="wheel vllm==$PIN_VERSION"
fi
echo "$src" > "$out/.pristine-from"
verify "$src"
