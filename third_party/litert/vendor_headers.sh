#!/usr/bin/env bash
# Copy the LiteRt C API headers the tflite plugin needs from a LiteRT git checkout into DEST.
#
#   vendor_headers.sh LITERT_GIT_DIR COMMIT DEST
#
# How third_party/litert/include was made (README.md there): the plugin's includes and, transitively,
# every litert/ header they include, at COMMIT; build_config.h is upstream's Bazel default
# (config/build_config_gpu_npu.h); plus TFLite's generated flatbuffer schema (the plugin verifies
# model.tflite with it; its FlatBuffers headers are third_party/flatbuffers). Builds do not run it.
set -euo pipefail
git_dir="${1:?usage: vendor_headers.sh LITERT_GIT_DIR COMMIT DEST}"
commit="${2:?usage: vendor_headers.sh LITERT_GIT_DIR COMMIT DEST}"
dest="${3:?usage: vendor_headers.sh LITERT_GIT_DIR COMMIT DEST}"
roots=(litert/c/litert_common.h litert/c/litert_environment.h litert/c/litert_model.h
       litert/c/litert_compiled_model.h litert/c/litert_options.h litert/c/litert_opaque_options.h
       litert/c/litert_tensor_buffer.h litert/c/litert_model_types.h)
show() { git -C "$git_dir" show "$commit:$1"; }
declare -A seen
queue=("${roots[@]}")
while [[ ${#queue[@]} -gt 0 ]]; do
  file="${queue[0]}"; queue=("${queue[@]:1}")
  [[ -n "${seen[$file]:-}" || "$file" == litert/build_common/build_config.h ]] && continue
  seen[$file]=1
  mkdir -p "$dest/include/$(dirname "$file")"
  show "$file" >"$dest/include/$file"
  while read -r inc; do queue+=("$inc"); done < <(sed -n 's/^#include "\(litert\/[^"]*\)".*/\1/p' "$dest/include/$file")
done
mkdir -p "$dest/include/litert/build_common"
show litert/build_common/config/build_config_gpu_npu.h >"$dest/include/litert/build_common/build_config.h"
mkdir -p "$dest/include/tflite/converter/schema"
show tflite/converter/schema/schema_generated.h >"$dest/include/tflite/converter/schema/schema_generated.h"
show LICENSE >"$dest/LICENSE"
printf '%s\n' "$dest/include"
