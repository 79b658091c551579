#!/usr/bin/env bash
# Bootstrap a fresh Debian machine for edgesmith: system packages (only when missing), the
# project virtualenv with the C++ core built in, and the isolated LiteRT converter environment.
# Idempotent: re-running it only does what is missing. Used by `make demo` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
APT_PACKAGES=(cmake g++ pkg-config libsodium-dev nlohmann-json3-dev libgtest-dev
              mosquitto mosquitto-clients libpaho-mqtt-dev libsqlite3-dev libtomlplusplus-dev libcpp-httplib-dev openssl
              chromium qemu-user-static g++-aarch64-linux-gnu binutils-aarch64-linux-gnu
              postgresql-15)  # the monitor store's tests start their own PostgreSQL 15 (tests/pg_server.py)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "bootstrap: installing Python packages into $VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# Build requirements and the engines first: the C++ build links the backend plugins against the
# TVM and OpenVINO wheels, which must therefore be installed before edgesmith itself is built.
deps=$("$VENV/bin/python" - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
wanted = project["build-system"]["requires"] + project["project"]["dependencies"]
for extra in ("toolchain", "postgres", "test"):
    wanted += project["project"]["optional-dependencies"][extra]
print("\n".join(wanted))
PY
)
mapfile -t deps <<<"$deps"
"$VENV/bin/python" -m pip install --quiet "${deps[@]}"
# pyproject.toml requires every backend plugin in pip builds (EDGESMITH_REQUIRE_BACKENDS): a
# missing engine fails here.
"$VENV/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e .

export EDGESMITH_HOME=${EDGESMITH_HOME:-$PWD/.edgesmith}
(umask 077 && mkdir -p "$EDGESMITH_HOME")  # keys live here: nobody else may write it (a 002 umask would let the group)
echo "bootstrap: LiteRT converter environment"
"$VENV/bin/edgesmith" tools install litert
echo "bootstrap: aarch64 device runtime (cross-compiled; \`edgesmith prove\` runs it under qemu)"
"$VENV/bin/edgesmith" tools install aarch64-runtime
