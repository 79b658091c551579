#!/usr/bin/env bash
# The plain CMake build of the C++ core without Python (as it is cross-compiled for devices), with its
# GoogleTest suite and test plugins, in build/cpp-tests: what `make cpp-test` runs, and what the Python
# tests that need the core built on its own reuse (tests/test_session_core.py's test plugin,
# tests/test_cmake_package.py's installed package) instead of compiling it again.
# The engine plugins are built by the Python package (bootstrap, `make rebuild`), not here: no C++
# test loads one. Usage: scripts/cpp-build.sh [--install PREFIX] [cmake target...] (default: everything;
# --install then installs the build into PREFIX, under the same lock).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build/cpp-tests
mkdir -p build
exec 9>build/cpp-tests.lock
flock 9  # one configure/build at a time: two test workers may ask at once
cmake -S . -B "$dir" -DEDGESMITH_BUILD_TESTS=ON -DEDGESMITH_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=Release \
  -DEDGESMITH_WITH_TVM=OFF -DEDGESMITH_WITH_OPENVINO=OFF -DEDGESMITH_WITH_ORT=OFF -DEDGESMITH_WITH_TFLITE=OFF >/dev/null
prefix=""
if [[ "${1:-}" == --install ]]; then prefix=$2; shift 2; fi
targets=()
for t in "$@"; do targets+=(--target "$t"); done
cmake --build "$dir" -j2 "${targets[@]}" >/dev/null
if [[ -n "$prefix" ]]; then cmake --install "$dir" --prefix "$prefix" >/dev/null; fi
