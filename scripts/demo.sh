#!/usr/bin/env bash
# `make demo`'s main job on embedded defaults, in the current directory: trains the digits CNN
# (MLflow store under the home), builds it from the registry for every target x backend into
# dist/demo, signed with the project's key under ./.edgesmith (the home `edgesmith` finds from
# this directory afterwards, so the README's commands work as written), then runs the fleet loop.
set -euo pipefail
VENV=${VENV:-.venv}
export EDGESMITH_HOME=${EDGESMITH_HOME:-$PWD/.edgesmith}
(umask 077 && mkdir -p "$EDGESMITH_HOME")  # keys live here: nobody else may write it (a 002 umask would let the group)
edgesmith=("$VENV/bin/edgesmith")

"${edgesmith[@]}" targets
# Train the digits CNN on real data (scikit-learn's digits), tracked in MLflow under the home and
# registered; then build every target x backend from the registry (golden samples and monitoring
# reference from its held-out test split).
"${edgesmith[@]}" train "$(dirname "$0")/../examples/digits.toml" --alias champion
"${edgesmith[@]}" build models:/digits@champion --name digits-cnn \
  --target all --backend all --precision fp32 --output dist/demo
# INT8 (NNCF post-training quantization) from the same registered version, behind the accuracy
# gate: calibrated and scored on its held-out split, refused past a 1-point drop.
"${edgesmith[@]}" build models:/digits@champion --name digits-cnn \
  -t x86_64-avx2 -t rpi4-aarch64 --backend openvino --precision int8 --output dist/demo
"${edgesmith[@]}" verify dist/demo/digits-cnn-rpi4-aarch64-tvm

# --- the fleet loop: a broker, the monitor, three agents (C++) on the host artifact --------------
# cam-03 gets shifted inputs until the monitor's drift alert fires; everything started here is
# stopped on exit.
fleet=dist/demo/fleet
artifact=dist/demo/digits-cnn-x86_64-avx2-openvino
rm -rf "$fleet"
mkdir -p "$fleet"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  "${edgesmith[@]}" broker down --dir "$fleet/broker" >/dev/null 2>&1 || true
}
trap cleanup EXIT
free_port() { "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=9110
"$VENV/bin/python" -c 'import socket, sys; socket.create_server(("127.0.0.1", 9110)).close()' 2>/dev/null || port=$(free_port)

# Each device trusts what was provisioned into its trust directory, nothing else: the project's
# build key (artifact signatures) and a deploy key (desired states), made once under the home.
[[ -f "$EDGESMITH_HOME/keys/deploy/default.key" ]] || "${edgesmith[@]}" keys generate --deploy
(umask 022 && mkdir -p "$fleet/trust/build" "$fleet/trust/deploy")  # agents refuse trust others can write
cp "$EDGESMITH_HOME/keys/default.pub" "$fleet/trust/build/"
cp "$EDGESMITH_HOME/keys/deploy/default.pub" "$fleet/trust/deploy/"

echo
echo "fleet: broker, monitor and three agents (cam-03 is fed shifted inputs)"
"${edgesmith[@]}" broker up --dir "$fleet/broker"
for device in cam-01 cam-02 cam-03; do
  "${edgesmith[@]}" broker add-device "$device" --fleet plant-a --dir "$fleet/broker"
done
db="sqlite:///$PWD/$fleet/monitor.db"
"${edgesmith[@]}" fleet monitor --broker "$fleet/broker" --db "$db" --http "127.0.0.1:$port" --interval-s 2 \
  >"$fleet/monitor.log" 2>&1 &
pids+=($!)
for device in cam-01 cam-02 cam-03; do
  shift_args=()
  [[ "$device" == cam-03 ]] && shift_args=(--synthetic-shift 4)
  "$VENV/bin/edgesmith-agent" --device "$device" --fleet plant-a --artifact "$artifact" \
    --credentials "$fleet/broker/devices/$device.json" --data-dir "$fleet/$device" --interval 2 \
    --trust-dir "$fleet/trust" --synthetic-load 40 "${shift_args[@]}" >"$fleet/$device.log" 2>&1 &
  pids+=($!)
done

echo "waiting for the monitor's drift alert on cam-03 (up to 120 s; it needs 100 counted outputs) ..."
fired=""
for _ in $(seq 120); do
  sleep 1
  fired=$("$VENV/bin/python" - "$port" <<'PY' 2>/dev/null || true
import json, sys, urllib.request
fleet = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/fleet", timeout=2))
firing = [a for a in fleet["alerts"] if a["active"]]
if any(a["alert"] == "drift" and a["subject"].startswith("cam-03") for a in firing):
    print("\n".join(f'{a["alert"]}: {a["message"]}' for a in firing))
PY
)
  [[ -n "$fired" ]] && break
done
"${edgesmith[@]}" fleet status --db "$db"
if [[ -z "$fired" ]]; then
  echo "error: no drift alert within 120 s; see $fleet/monitor.log" >&2
  exit 1
fi
echo "alerts firing:"
echo "$fired"

# --- a canary rollout: the INT8 build replaces the FP32 one, cam-01 first -------------------------
# Signed desired states over MQTT; each agent downloads the archive into its inactive slot,
# verifies it, self-tests it on its golden samples and switches; a failed canary would abort the
# rollout and roll it back (docs/deployment.md).
echo
echo "canary rollout of the INT8 artifact: wave 1 is cam-01, wave 2 the rest; abort above 34% failed"
"${edgesmith[@]}" deploy dist/demo/digits-cnn-x86_64-avx2-openvino-int8 --fleet plant-a --broker "$fleet/broker" \
  --db "$db" --waves 33%,100% --abort-on-failure 34% --wave-timeout 120 --previous "$artifact" --serve 127.0.0.1:0
"${edgesmith[@]}" fleet status --db "$db"
echo "dashboard: http://127.0.0.1:$port/ (also /metrics and /api/fleet); the demo stops its fleet now,"
echo "           the commands above (scripts/demo.sh) start one that stays up"
echo
echo "Next: \`source $VENV/bin/activate\`, then try the README's \"After make demo\" commands."
