#!/usr/bin/env bash
# make setup: create .venv (Python 3.11) with the pinned stack. Idempotent: a second run with nothing
# changed returns in about a second (a stamp holds the hash of everything that decides the install).
#
# Order matters (see ../shared/notes/stack.md): torch 2.13.0 first, then everything else under the full
# constraints file (which pins torch, so nothing can upgrade it), then Horovod 0.28.1 built from its sdist
# with the C++17 fix, cached outside the repo keyed by horovod/torch/python versions.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${AVP_VENV:-.venv}
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
CACHE_DIR=${AVP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/avp}
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf 'setup: %s\n' "$*"; }

# ---- prerequisites: say exactly what is missing ---------------------------------------------------
missing=()
PYTHON=""
for candidate in python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    PYTHON=$(command -v "$candidate"); break
  fi
done
[ -n "$PYTHON" ] || missing+=("Python 3.11 (python3.11 on PATH) - e.g. apt-get install python3.11 python3.11-venv, or pyenv install 3.11")
if command -v java >/dev/null 2>&1; then
  java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  if [ -z "$java_major" ] || [ "$java_major" -lt 17 ]; then
    missing+=("Java 17 or newer for Spark (found java version '${java_major:-unknown}') - e.g. apt-get install openjdk-17-jre-headless")
  fi
else
  missing+=("Java 17 for Spark (no 'java' on PATH) - e.g. apt-get install openjdk-17-jre-headless")
fi
command -v g++ >/dev/null 2>&1 || missing+=("a C++ compiler (g++) for Horovod and the LibTorch consumer - e.g. apt-get install g++")
command -v cmake >/dev/null 2>&1 || missing+=("cmake for Horovod and the LibTorch consumer - e.g. apt-get install cmake")
command -v make >/dev/null 2>&1 || missing+=("make")
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: cannot set up, missing:" >&2
  for m in "${missing[@]}"; do echo "  - $m" >&2; done
  exit 2
fi

# ---- fast path: nothing changed since the last successful setup -----------------------------------
stamp_inputs=(requirements.txt constraints.txt pyproject.toml scripts/setup.sh)
want=$(cat "${stamp_inputs[@]}" | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.avp-setup-stamp" ] && [ "$(cat "$VENV/.avp-setup-stamp")" = "$want" ] &&
   "$VENV/bin/python" -c 'import torch, horovod.torch, pyspark, petastorm' 2>/dev/null &&
   { [ -n "${AVP_SETUP_DEPS_ONLY:-}" ] || "$VENV/bin/python" -c 'import pipeline' 2>/dev/null; }; then
  say "up to date ($VENV)"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade 'pip>=24' 'setuptools>=77.0.3' wheel 2>&1 | grep -v "^WARNING: Location" || true

say "installing torch==$TORCH_VERSION first"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" -c constraints.txt

say "installing the pinned stack (first time: pyspark builds from its sdist, a few minutes)"
"${PIP[@]}" install -q -r requirements.txt -c constraints.txt

# ---- Horovod: build once per (horovod, torch, python), reuse the wheel afterwards --------------------
py_tag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
torch_installed=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
wheel_dir="$CACHE_DIR/wheels/horovod-$HOROVOD_VERSION-torch-$torch_installed-$py_tag"
if ! ls "$wheel_dir"/horovod-"$HOROVOD_VERSION"-*.whl >/dev/null 2>&1; then
  say "building Horovod $HOROVOD_VERSION against torch $torch_installed (2-5 minutes, once; cached in $wheel_dir)"
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  "${PIP[@]}" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
  tar xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
  # torch >= 2.1 headers need C++17; horovod 0.28.1 hard-codes C++14 (upstream #3996, fixed but unreleased)
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$build/horovod-$HOROVOD_VERSION/CMakeLists.txt" "$build/horovod-$HOROVOD_VERSION/horovod/torch/CMakeLists.txt"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 \
  HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO MAKEFLAGS="-j$(nproc)" \
    "${PIP[@]}" wheel -q --no-build-isolation --no-deps -w "$build/wheel" "$build/horovod-$HOROVOD_VERSION"
  mkdir -p "$wheel_dir"
  cp "$build"/wheel/horovod-*.whl "$wheel_dir/.tmp-wheel" && mv "$wheel_dir/.tmp-wheel" "$wheel_dir/$(basename "$build"/wheel/horovod-*.whl)"
else
  say "using cached Horovod wheel from $wheel_dir"
fi
"${PIP[@]}" install -q --no-deps "$wheel_dir"/horovod-"$HOROVOD_VERSION"-*.whl

if [ -z "${AVP_SETUP_DEPS_ONLY:-}" ]; then  # Docker images install the project in a later layer
  say "installing the project (editable)"
  # compat mode: a .pth with the repo root, so packages added later need no reinstall
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat 2>/dev/null
fi
"${PIP[@]}" check
echo "$want" > "$VENV/.avp-setup-stamp"
say "done in $(( $(date +%s) - start )) s; venv size $(du -sh "$VENV" | cut -f1)"
