#!/usr/bin/env bash
# Build serving/cpp/avp_consumer against the LibTorch inside the project's torch wheel.
#
#   serving/cpp/build.sh                # -> serving/cpp/build/avp_consumer (incremental: re-runs are quick)
#   PYTHON=/path/to/python BUILD_DIR=/tmp/b JOBS=4 serving/cpp/build.sh
#
# Prints the path of the executable on its last line. Needs only g++ (C++20) and cmake >= 3.18.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$here/../../.venv/bin/python}"
build="${BUILD_DIR:-$here/build}"
prefix="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
abi="$("$python" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
cmake -S "$here" -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release -DAVP_CXX11_ABI="$abi" >&2
cmake --build "$build" -j"${JOBS:-2}" >&2
echo "$build/avp_consumer"
