#!/usr/bin/env bash
# Cross-compile the device runtime for 64-bit Arm Linux and install a self-contained bundle:
#
#   ${EDGESMITH_HOME:-~/.edgesmith}/runners/aarch64-linux/
#     bin/edgesmith-run                       the runtime as a command (RUNPATH $ORIGIN/../lib)
#     bin/edgesmith-agent                     the telemetry agent (Paho, SQLite, OpenSSL linked in)
#     lib/libcpp-httplib.so.0.11, libbrotli*  the agent's HTTP library (Debian builds it shared)
#     lib/edgesmith/backends/*.so             backend plugins (RUNPATH $ORIGIN/../..)
#     lib/libtvm_runtime.so, libtvm_ffi.so    from the aarch64 apache-tvm / apache-tvm-ffi wheels
#     lib/libopenvino.so.*, libopenvino_arm_cpu_plugin.so, libopenvino_ir_frontend.so.*, libtbb*, ...
#                                             from the aarch64 openvino wheel
#     lib/libonnxruntime.so.<version>         from the aarch64 onnxruntime wheel
#     lib/libLiteRt.so                        from the aarch64 ai-edge-litert wheel (LiteRt C API)
#
# The bundle needs no LD_LIBRARY_PATH and no libsodium on the device (linked statically); it needs
# a glibc >= 2.35 device (the openvino wheel's manylinux_2_35 tag) with libstdc++ from GCC >= 12.
# Run it here with Debian's multiarch arm64 libc/libstdc++ (libc6:arm64, libstdc++6:arm64) and no -L:
#   qemu-aarch64-static -cpu cortex-a72 <bundle>/bin/edgesmith-run ARTIFACT
# (`edgesmith prove` does this, plus a -L prefix holding only an aarch64 /proc/cpuinfo). Never with
# -L /usr/aarch64-linux-gnu: under qemu-user the cross sysroot's libc spins forever at the first
# pthread_create of any dynamically linked program.
#
# Needs: g++-aarch64-linux-gnu, cmake, ninja (or make), pip (to download wheels), and
# libsodium-dev:arm64, libc6:arm64, libstdc++6:arm64 + nlohmann-json3-dev (the arm64 ones are
# installed with apt when missing, as root).
# Idempotent: downloads, unpacking and the CMake build are skipped when up to date.
#
# Environment: EDGESMITH_HOME, PYTHON (interpreter whose pip downloads the wheels; default the
# repo's .venv, else python3), EDGESMITH_AARCH64_JOBS (build parallelism).
set -euo pipefail

TVM_VERSION="0.27.0.post1"
TVM_FFI_VERSION="0.1.14.post1"
OPENVINO_VERSION="2026.4.1"
ORT_VERSION="1.32.0"
LITERT_VERSION="2.3.0"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
home="${EDGESMITH_HOME:-$HOME/.edgesmith}"
cache="$home/cache/aarch64"
bundle="$home/runners/aarch64-linux"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi

log() { printf '[aarch64] %s\n' "$*" >&2; }
die() { printf '[aarch64] error: %s\n' "$*" >&2; exit 1; }

command -v aarch64-linux-gnu-g++ >/dev/null || die "aarch64-linux-gnu-g++ is missing; install it with: apt-get install g++-aarch64-linux-gnu"
command -v cmake >/dev/null || die "cmake is missing; install it with: apt-get install cmake"

# --- target libraries (multiarch) -----------------------------------------------------------------
# libsodium-dev:arm64 to link against; libc6:arm64 and libstdc++6:arm64 to run the bundle under qemu.
# The agent: libpaho-mqtt-dev, libsqlite3-dev, libssl-dev (static), libcpp-httplib-dev (shared).
arm64_packages=(libsodium-dev:arm64 libc6:arm64 libstdc++6:arm64
                libpaho-mqtt-dev:arm64 libsqlite3-dev:arm64 libssl-dev:arm64 libcpp-httplib-dev:arm64)
arm64_missing=()
for pkg in "${arm64_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || arm64_missing+=("$pkg")
done
if [[ ${#arm64_missing[@]} -gt 0 ]]; then
  [[ "$(id -u)" == 0 ]] || die "arm64 packages missing (${arm64_missing[*]}); as root run: dpkg --add-architecture arm64 && apt-get update && apt-get install -y ${arm64_missing[*]}"
  log "installing ${arm64_missing[*]}"
  dpkg --add-architecture arm64
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${arm64_missing[@]}"
fi

# --- wheels -------------------------------------------------------------------------------------
mkdir -p "$cache/wheels"
have_wheel() { compgen -G "$cache/wheels/$1" >/dev/null; }
download() {  # download <platform tags...> -- <requirements...>
  local platforms=() requirements=()
  while [[ "$1" != "--" ]]; do platforms+=(--platform "$1"); shift; done
  shift
  requirements=("$@")
  log "downloading ${requirements[*]}"
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --implementation cp "${platforms[@]}" -d "$cache/wheels" "${requirements[@]}"
}
if ! have_wheel "apache_tvm-${TVM_VERSION}-*aarch64*.whl" || ! have_wheel "apache_tvm_ffi-${TVM_FFI_VERSION}-*aarch64*.whl"; then
  download manylinux_2_28_aarch64 manylinux_2_17_aarch64 -- "apache-tvm==${TVM_VERSION}" "apache-tvm-ffi==${TVM_FFI_VERSION}"
fi
if ! have_wheel "openvino-${OPENVINO_VERSION}-*aarch64*.whl"; then
  download manylinux_2_35_aarch64 -- "openvino==${OPENVINO_VERSION}"
fi
if ! have_wheel "onnxruntime-${ORT_VERSION}-*aarch64*.whl"; then
  download manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux_2_17_aarch64 -- "onnxruntime==${ORT_VERSION}"
fi
# ai-edge-litert's aarch64 wheel is tagged manylinux_2_27 only (the 2_28 tag alone finds nothing).
if ! have_wheel "ai_edge_litert-${LITERT_VERSION}-*aarch64*.whl"; then
  download manylinux_2_27_aarch64 -- "ai-edge-litert==${LITERT_VERSION}"
fi

# Unpack only what the runtime needs: TVM/tvm-ffi libraries + tvm-ffi headers; OpenVINO's
# libs, headers and CMake config (the wheels are zip files; python's zipfile needs no unzip).
unpack() {  # unpack <wheel glob> <dest> <member prefixes...>
  local wheel dest="$2"
  wheel="$(compgen -G "$cache/wheels/$1" | head -n1)"
  shift 2
  if [[ -f "$dest/.unpacked" && "$(cat "$dest/.unpacked")" == "$(basename "$wheel")" ]]; then return; fi
  log "unpacking $(basename "$wheel")"
  mkdir -p "$dest"
  "$python" - "$wheel" "$dest" "$@" <<'EOF'
import os, sys, zipfile
wheel, dest, prefixes = sys.argv[1], sys.argv[2], tuple(sys.argv[3:])
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.filename.startswith(prefixes) and not info.is_dir():
            z.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(os.path.join(dest, info.filename), mode)
EOF
  basename "$wheel" >"$dest/.unpacked"
}
unpack "apache_tvm-${TVM_VERSION}-*aarch64*.whl" "$cache/tvm" tvm/lib/libtvm_runtime.so apache_tvm-
unpack "apache_tvm_ffi-${TVM_FFI_VERSION}-*aarch64*.whl" "$cache/tvm-ffi" tvm_ffi/include/ tvm_ffi/lib/libtvm_ffi.so apache_tvm_ffi-
unpack "openvino-${OPENVINO_VERSION}-*aarch64*.whl" "$cache/openvino" openvino/libs/ openvino/include/ openvino/cmake/
# ONNX Runtime: the C API library only (the ort plugin's headers are kept in
# third_party/onnxruntime/include).
unpack "onnxruntime-${ORT_VERSION}-*aarch64*.whl" "$cache/onnxruntime" "onnxruntime/capi/libonnxruntime.so."
# LiteRT: the C API library and the dist-info that names its version (the tflite plugin's headers
# are kept in third_party/litert/include).
unpack "ai_edge_litert-${LITERT_VERSION}-*aarch64*.whl" "$cache/litert" ai_edge_litert/libLiteRt.so ai_edge_litert-
# EdgesmithTvm.cmake expects one directory holding tvm/ and tvm_ffi/ (like site-packages).
mkdir -p "$cache/tvm-root"
ln -sfn "$cache/tvm/tvm" "$cache/tvm-root/tvm"
ln -sfn "$cache/tvm-ffi/tvm_ffi" "$cache/tvm-root/tvm_ffi"
for dist in "$cache"/tvm/apache_tvm-*.dist-info "$cache"/tvm-ffi/apache_tvm_ffi-*.dist-info; do
  ln -sfn "$dist" "$cache/tvm-root/$(basename "$dist")"
done

# --- build --------------------------------------------------------------------------------------
build="$cache/build"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# A build tree configured before the ort or tflite backend existed is configured again with its engine.
if [[ ! -f "$build/CMakeCache.txt" ]] || ! grep -qx "EDGESMITH_ORT_ROOT:PATH=$cache/onnxruntime" "$build/CMakeCache.txt" \
    || ! grep -qx "EDGESMITH_LITERT_ROOT:PATH=$cache/litert" "$build/CMakeCache.txt"; then
  log "configuring $build"
  # CMakeGenericSystem prefers .so; this project include (after project()) makes find_library pick
  # libsodium.a, so the bundle needs no libsodium on the device.
  mkdir -p "$build"
  printf 'set(CMAKE_FIND_LIBRARY_SUFFIXES .a .so)\n' >"$cache/prefer-static.cmake"
  cmake -S "$repo" -B "$build" "${generator[@]}" \
    -DCMAKE_TOOLCHAIN_FILE="$repo/cmake/toolchain-aarch64-linux-gnu.cmake" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PROJECT_INCLUDE="$cache/prefer-static.cmake" \
    -DCMAKE_INSTALL_PREFIX="$bundle" \
    -DCMAKE_INSTALL_RPATH='$ORIGIN/../lib' \
    -DEDGESMITH_BUILD_PYTHON=OFF -DEDGESMITH_BUILD_TESTS=OFF \
    -DEDGESMITH_WITH_TVM=ON -DEDGESMITH_TVM_ROOT="$cache/tvm-root" \
    -DEDGESMITH_WITH_OPENVINO=ON -DEDGESMITH_OPENVINO_ROOT="$cache/openvino" \
    -DEDGESMITH_WITH_ORT=ON -DEDGESMITH_ORT_ROOT="$cache/onnxruntime" \
    -DEDGESMITH_WITH_TFLITE=ON -DEDGESMITH_LITERT_ROOT="$cache/litert" >"$cache/configure.log" \
    || { cat "$cache/configure.log" >&2; die "CMake configure failed (log above)"; }
fi
log "building (targets: every one the tree defines)"
cmake --build "$build" --parallel "${EDGESMITH_AARCH64_JOBS:-$(nproc)}"
cmake --install "$build" >/dev/null

# --- bundle: the engines' libraries next to the runtime -------------------------------------------
mkdir -p "$bundle/lib"
copy_lib() {  # copy_lib <file>: copy when changed (keeps the bundle's mtimes stable)
  local target="$bundle/lib/$(basename "$1")"
  if [[ ! -f "$target" ]] || ! cmp -s "$1" "$target"; then cp -f "$1" "$target"; fi
}
copy_lib "$cache/tvm/tvm/lib/libtvm_runtime.so"
copy_lib "$cache/tvm-ffi/tvm_ffi/lib/libtvm_ffi.so"
copy_lib "$cache/onnxruntime/onnxruntime/capi/libonnxruntime.so.${ORT_VERSION}"
copy_lib "$cache/litert/ai_edge_litert/libLiteRt.so"
# OpenVINO: the core, the IR reader, the Arm CPU plugin and its TBB/hwloc deps; not the
# ONNX/TF/PyTorch/Paddle/JAX/GGUF frontends (artifacts carry IR) nor the C API.
for lib in "$cache"/openvino/openvino/libs/*.so*; do
  case "$(basename "$lib")" in
    libopenvino_*_frontend.so.*) [[ "$(basename "$lib")" == libopenvino_ir_frontend.so.* ]] || continue ;;
    libopenvino_c.so.*) continue ;;
  esac
  copy_lib "$lib"
done

# The agent's HTTP library and its brotli dependencies, under their sonames (libssl3 and zlib,
# which it also needs, are on every device).
needed() { aarch64-linux-gnu-readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
if [[ -x "$bundle/bin/edgesmith-agent" ]]; then
  httplib="$(needed "$bundle/bin/edgesmith-agent" | grep '^libcpp-httplib' || true)"
  [[ -n "$httplib" ]] || die "edgesmith-agent does not link libcpp-httplib; the build changed, update this script"
  brotli="$(needed "/usr/lib/aarch64-linux-gnu/$httplib" | grep '^libbrotli' || true)"
  for lib in $brotli; do brotli+=" $(needed "/usr/lib/aarch64-linux-gnu/$lib" | grep '^libbrotli' || true)"; done
  for soname in "$httplib" $(printf '%s\n' $brotli | sort -u); do
    target="$bundle/lib/$soname"
    if [[ ! -f "$target" ]] || ! cmp -s "/usr/lib/aarch64-linux-gnu/$soname" "$target"; then
      cp -fL "/usr/lib/aarch64-linux-gnu/$soname" "$target"
    fi
  done
fi

# edgesmith-run may not exist in every tree (e.g. a core-only checkout); report what was built.
if [[ -x "$bundle/bin/edgesmith-run" ]]; then
  log "bundle ready: $bundle ($(du -sh "$bundle" | cut -f1))"
else
  log "bundle ready without bin/edgesmith-run (no such target in this tree): $bundle"
fi
printf '%s\n' "$bundle"
