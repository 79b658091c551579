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
# The devices' camera stand-in (`--load-from`) replays digits of the registered model's training
# split; cam-03's camera is turned by 90 degrees until the monitor's drift alert fires. Accuracy is
# measured on the model's held-out test split, which no device ever sees. Everything started here
# is stopped on exit.
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

# The cameras' inputs and the labelling source, from the registered model's data: its training digits
# as they are (cam-01, cam-02) and rotated (cam-03), an oracle labelling the rotated ones by input
# digest (a labeller cannot know the ids the devices' samples get), and its held-out test split.
"$VENV/bin/python" - "$fleet/data" <<'PY'
import hashlib, sys
from pathlib import Path

import mlflow
import numpy as np
from sklearn.datasets import load_digits

from edgesmith.toolchain.train import tracking

out = Path(sys.argv[1])
out.mkdir(parents=True)
client = tracking.connect(tracking.tracking_uri(None))
version = client.get_model_version_by_alias("digits", "champion")
with np.load(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=tracking.TEST_SPLIT,
                                                 dst_path=str(out / "split")), allow_pickle=False) as split:
    test_x, test_y = split["x"].astype(np.float32), split["y"]
digits = load_digits()
held_out = {x.tobytes() for x in test_x}
train = [(x[None], y) for x, y in zip(digits.images.astype(np.float32), digits.target) if x[None].tobytes() not in held_out]
x = np.ascontiguousarray(np.stack([t[0] for t in train]))
rotated = np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3)))
np.save(out / "digits.npy", x)
np.save(out / "rotated.npy", rotated)
with open(out / "oracle.csv", "w") as f:
    f.write("id,class\n" + "".join(f"{hashlib.sha256(r.tobytes()).hexdigest()},{int(t[1])}\n" for r, t in zip(rotated, train)))
np.savez(out / "held-out.npz", x=test_x, y=test_y)
print(f"camera inputs: {len(x)} training digits (cam-03: rotated by 90 degrees); held out: {len(test_y)} test digits")
PY
accuracy() {  # top-1 of the artifact the fleet serves, on held-out digits no device saw, as they are and rotated
  "$VENV/bin/python" - "$1" "$fleet/data/held-out.npz" "$2" <<'PY'
import sys

import numpy as np

from edgesmith.toolchain.loop import top1

with np.load(sys.argv[2]) as data:
    x, y = data["x"], data["y"]
plain, turned = top1(sys.argv[1], x, y), top1(sys.argv[1], np.rot90(x, 1, axes=(2, 3)), y)
print(f"{sys.argv[3]}: top-1 on {len(y)} held-out digits no device saw: unshifted {plain:.1%}, rotated by 90 degrees "
      f"{turned:.1%} ({(plain - turned) * 100:.1f} points apart)")
PY
}

echo
echo "fleet: broker, monitor and three agents (cam-03's camera is turned by 90 degrees)"
"${edgesmith[@]}" broker up --dir "$fleet/broker"
for device in cam-01 cam-02 cam-03; do
  "${edgesmith[@]}" broker add-device "$device" --fleet plant-a --dir "$fleet/broker"
done
db="sqlite:///$PWD/$fleet/monitor.db"
"${edgesmith[@]}" fleet monitor --broker "$fleet/broker" --db "$db" --http "127.0.0.1:$port" --interval-s 2 \
  >"$fleet/monitor.log" 2>&1 &
pids+=($!)
for device in cam-01 cam-02 cam-03; do
  camera="$fleet/data/digits.npy"
  [[ "$device" == cam-03 ]] && camera="$fleet/data/rotated.npy"
  "$VENV/bin/edgesmith-agent" --device "$device" --fleet plant-a --artifact "$artifact" \
    --credentials "$fleet/broker/devices/$device.json" --data-dir "$fleet/$device" --interval 2 \
    --trust-dir "$fleet/trust" --synthetic-load 40 --load-from "$camera" >"$fleet/$device.log" 2>&1 &
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

# --- closing the loop: cam-03's drift -> capture -> label -> retrain -> build -> shadow -> canary -----
# `edgesmith loop` takes the retrain request cam-03's drift alert opened and carries it through;
# each step is recorded on the request (run it again and it resumes), and it stops at a failed gate.
echo
accuracy dist/demo/digits-cnn-x86_64-avx2-openvino-int8 "before the loop (INT8, deployed)"
echo "edgesmith loop: capture cam-03's drifted inputs, label them, retrain, build, shadow, roll out"
"${edgesmith[@]}" loop --fleet plant-a --on-alert drift --labels-from "$fleet/data/oracle.csv" \
  --config "$(dirname "$0")/../examples/digits.toml" --broker "$fleet/broker" --db "$db" --max-samples 1400 \
  --shadow-duration 8 -o dist/loop --previous dist/demo/digits-cnn-x86_64-avx2-openvino-int8 --previous "$artifact" \
  --json >"$fleet/loop.json"
retrained=$("$VENV/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["steps"]["build"]["detail"]["artifact"])' "$fleet/loop.json")
accuracy "$retrained" "after the loop ($(basename "$retrained"), deployed)"
echo "waiting for cam-03's drift alert to clear (up to 60 s: the monitor measures the new model's outputs) ..."
cleared=""
for _ in $(seq 60); do
  cleared=$("$VENV/bin/python" - "$port" <<'PY' 2>/dev/null || true
import json, sys, urllib.request
fleet = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/fleet", timeout=2))
if not any(a["alert"] == "drift" and a["subject"].startswith("cam-03") and a["active"] for a in fleet["alerts"]):
    print("yes")
PY
)
  [[ -n "$cleared" ]] && break
  sleep 1
done
if [[ -n "$cleared" ]]; then
  echo "cam-03's drift alert cleared: the retrained model's outputs on its rotated inputs match its reference"
else
  echo "cam-03's drift alert is still active after 60 s (see \`edgesmith fleet status\`): it clears once the new model's"
  echo "recent windows on cam-03 match the reference shares of its build"
fi
"${edgesmith[@]}" fleet status --db "$db"
echo "dashboard: http://127.0.0.1:$port/ (also /metrics and /api/fleet); the demo stops its fleet now,"
echo "           the commands above (scripts/demo.sh) start one that stays up"
echo
echo "Next: \`source $VENV/bin/activate\`, then try the README's \"After make demo\" commands."
