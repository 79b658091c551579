#!/usr/bin/env bash
# Fetch the ONNX Runtime C/C++ API headers for the ort backend plugin into DEST/include/onnxruntime.
#
#   fetch_headers.sh DEST
#
# How the copy in third_party/onnxruntime/include was made (README.md there): to move to another
# version, change VERSION and SHA256, run it into a scratch directory and copy include/ and
# LICENSE.onnxruntime over the vendored ones. Builds do not run it.
#
# PyPI's onnxruntime wheels ship libonnxruntime.so but no headers. The plugin compiles against the
# headers of Debian trixie's libonnxruntime-dev (ORT 1.21, ORT_API_VERSION 21) and runs against the
# newer library of the wheel: ORT's C API is backward compatible (OrtGetApiBase()->GetApi(21) is
# served by every later release). The package is taken with apt by name and version, from the same
# Debian mirror as this machine's own sources, with a private apt state (the system's sources and
# lists are not touched), and checked against a pinned SHA-256. The headers are MIT-licensed; the
# package's copyright file is kept beside them (DEST/LICENSE.onnxruntime).
#
# Offline builds: point CMake at installed headers instead (-DEDGESMITH_ORT_INCLUDE_DIR=...).
# Prints DEST/include on success. Idempotent.
set -euo pipefail

VERSION="1.21.0+dfsg-1"
SUITE="trixie"
SHA256="14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"  # the amd64 .deb (headers are arch-independent)

dest="${1:?usage: fetch_headers.sh DEST}"
die() { printf 'fetch_headers.sh: error: %s\n' "$*" >&2; exit 1; }
stamp="$dest/.fetched"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$VERSION" && -f "$dest/include/onnxruntime/onnxruntime_c_api.h" ]]; then
  printf '%s\n' "$dest/include"
  exit 0
fi
command -v apt-get >/dev/null || die "apt-get is missing; install libonnxruntime-dev headers by hand and configure with -DEDGESMITH_ORT_INCLUDE_DIR=<dir holding onnxruntime_c_api.h>"
command -v dpkg >/dev/null || die "dpkg is missing; configure with -DEDGESMITH_ORT_INCLUDE_DIR=<dir holding onnxruntime_c_api.h>"

uri=""
for sources in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
  [[ -f "$sources" ]] || continue
  uri="$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' "$sources")"
  [[ -n "$uri" ]] && break
done
if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
  uri="$(awk '$1 == "deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list)"
fi
[[ -n "$uri" ]] || die "no Debian mirror in this machine's apt sources; configure with -DEDGESMITH_ORT_INCLUDE_DIR=<dir holding onnxruntime_c_api.h>"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $SUITE main" >"$work/sources.list"
apt_opts=(-q -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Architecture=amd64
          -o APT::Sandbox::User=root -o Debug::NoLocking=1)
apt-get "${apt_opts[@]}" update >"$work/update.log" 2>&1 || { cat "$work/update.log" >&2; die "apt-get update for $SUITE failed (log above)"; }
(cd "$work" && apt-get "${apt_opts[@]}" download "libonnxruntime-dev=$VERSION") >"$work/download.log" 2>&1 \
  || { cat "$work/download.log" >&2; die "apt-get download libonnxruntime-dev=$VERSION failed (log above)"; }
deb="$(ls "$work"/libonnxruntime-dev_*.deb)"
echo "$SHA256  $deb" | sha256sum -c --quiet - || die "$(basename "$deb") does not have the pinned SHA-256; the archive changed, review and update fetch_headers.sh"
dpkg -x "$deb" "$work/x"
rm -rf "$dest"
mkdir -p "$dest/include"
cp -r "$work/x/usr/include/onnxruntime" "$dest/include/onnxruntime"
cp "$work/x/usr/share/doc/libonnxruntime-dev/copyright" "$dest/LICENSE.onnxruntime"
printf '%s' "$VERSION" >"$stamp"
printf '%s\n' "$dest/include"
