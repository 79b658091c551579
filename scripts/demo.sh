#!/usr/bin/env bash
# `make demo`'s main job on embedded defaults, in the current directory: builds the digits CNN for
# every target x backend into dist/demo, signed with the project's key under ./.edgesmith (the
# home `edgesmith` finds from this directory afterwards, so the README's commands work as written).
set -euo pipefail
VENV=${VENV:-.venv}
export EDGESMITH_HOME=${EDGESMITH_HOME:-$PWD/.edgesmith}
mkdir -p "$EDGESMITH_HOME"
edgesmith=("$VENV/bin/edgesmith")

"${edgesmith[@]}" targets
"${edgesmith[@]}" build edgesmith.toolchain.models.digits:digits_cnn --input-shape 1,1,8,8 \
  --target all --backend all --output dist/demo
"${edgesmith[@]}" verify dist/demo/digits-cnn-rpi4-aarch64-tvm
echo
echo "Next: \`source $VENV/bin/activate\`, then try the README's \"After make demo\" commands."
