#!/usr/bin/env bash
# The device side built with sanitizers (EDGESMITH_SANITIZE), and the agent test files run against
# that edgesmith-agent (tests/test_agent.py reads EDGESMITH_TEST_AGENT). Not part of `make test`:
# a sanitized build takes long on 2 cores and its agents run a few times slower.
# Usage: scripts/sanitize-agent.sh [address|thread] [pytest args...]
#   address (default): AddressSanitizer + UndefinedBehaviorSanitizer, build/sanitize-address
#   thread:            ThreadSanitizer, build/sanitize-thread (default tests: capture and shadow)
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-address}
[[ $# -gt 0 ]] && shift
case "$kind" in
  address) flags=address,undefined ;;
  thread) flags=thread ;;
  *) echo "usage: $0 [address|thread] [pytest args...]" >&2; exit 2 ;;
esac
dir=build/sanitize-$kind
python=${PYTHON:-$(command -v python)}
cmake -S . -B "$dir" -DEDGESMITH_SANITIZE="$flags" -DEDGESMITH_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DEDGESMITH_WITH_TVM=OFF -DEDGESMITH_WITH_OPENVINO=OFF -DEDGESMITH_WITH_ORT=OFF -DEDGESMITH_WITH_TFLITE=OFF >/dev/null
cmake --build "$dir" -j"${JOBS:-2}" --target edgesmith-agent >/dev/null
# The agent finds the engine plugins at ../lib/edgesmith/backends from its own directory: a prefix
# whose lib/ points at the Python package's plugins (built without sanitizers; they run inside the
# sanitized process, their engines' own code uninstrumented).
prefix=$dir/prefix
mkdir -p "$prefix/bin" "$prefix/lib/edgesmith"
cp -f "$dir/csrc/agent/edgesmith-agent" "$prefix/bin/edgesmith-agent"
# (an editable install keeps them in site-packages, not beside the sources edgesmith.runtime comes from)
backends=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')/edgesmith/runtime/backends
ln -sfn "$backends" "$prefix/lib/edgesmith/backends"
export EDGESMITH_TEST_AGENT=$PWD/$prefix/bin/edgesmith-agent
# A report ends the agent with a non-zero status (the tests check each agent's exit status) and the
# report is in the agent's log, which the failing assertion prints.
# detect_leaks=0: the engines (OpenVINO, ONNX Runtime) keep allocations for the process's life by
# design, and Paho's library state is freed only when its last client goes; leak reports there are
# not the agent's.
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:halt_on_error=1:detect_leaks=0:detect_stack_use_after_return=1:strict_init_order=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}
# By default the agent tests that serve the testecho plugin's artifacts. Those serving an OpenVINO
# artifact (most of test_agent.py, test_deploy_agent.py, test_agent_guard.py) cannot run under
# AddressSanitizer: OpenVINO's TBB dlopens libtbbbind with RTLD_DEEPBIND, which the sanitizer
# runtime refuses (the agent aborts at load); pass those files explicitly to see it. The aarch64
# tests need the bundle (`edgesmith tools install aarch64-runtime`) and run the unsanitized one.
if [[ $# -eq 0 ]]; then
  set -- tests/test_capture_agent.py tests/test_shadow_agent.py -k "not real_engines and not aarch64"
fi
exec "$python" -m pytest -q -p no:cacheprovider -n 0 "$@"
