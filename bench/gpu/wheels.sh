#!/usr/bin/env bash
# Fetch the wheels the lent GPU machine lacks into bench/gpu/wheels/ (git-ignored; carried to the device).
#
#     bash bench/gpu/wheels.sh            # here, where PyPI is reachable; then run bench/gpu/run_on_device.sh there
#
# The target has torch 2.11+cu130, triton 3.6, transformers 5.17, peft, accelerate, numpy, pyarrow, safetensors,
# tokenizers, tqdm, packaging and pytest, and no network. It lacks the peers below and TRL's own requirements
# (datasets and what datasets needs beyond the device's packages); --no-deps, every version pinned, about 15 MB
# in all (pandas is 12 MB of it). A device call carries at most 64 MiB with the working tree: carry the wheels
# with at most ~40 MB of anything else (a weights part of bench/gpu/weights.sh with PARTS=3, not 2).
# ragkern itself needs none of the missing packages for the
# benchmark: `datasets` and `rank_bm25` are imported lazily (data loading from files / BM25 negatives only), and
# ragkern.kernels is found in the checkout by bench/gpu/bootstrap.py, so no install of ragkern is needed there.
set -euo pipefail
cd "$(dirname "$0")/../.."

DEST=bench/gpu/wheels
PY=${PYTHON:-python3}
PEERS=(
    "liger-kernel==0.8.5"       # Liger-Kernel's fused linear cross-entropy (LigerFusedLinearCrossEntropyLoss)
    "cut-cross-entropy==25.1.1" # Apple's Cut Cross-Entropy (linear_cross_entropy)
    "trl==1.16.0"               # TRL's SFTTrainer (the e2e arm trl_sft_liger); needs accelerate, transformers>=4.56
    # TRL imports datasets; datasets 4.7 takes huggingface-hub < 2 (5.x wants >= 1.31, newer than the device may have)
    "datasets==4.7.0"
    "dill==0.4.0"
    "multiprocess==0.70.18"
    "xxhash==3.6.0"
    "fsspec==2026.2.0"
    "pandas==3.0.1"             # datasets imports it at the top; needs numpy, python-dateutil
    "python-dateutil==2.9.0.post0"
    "six==1.17.0"
    "jinja2==3.1.6"             # TRL imports it (chat templates)
    "markupsafe==3.0.3"
    "requests==2.32.5"          # datasets needs it; transformers 5 no longer does, so the device may lack it
    "charset-normalizer==3.4.3"
    "idna==3.10"
    "urllib3==2.5.0"
    "certifi==2025.8.3"
)
LIMIT_BYTES=$((50 * 1024 * 1024))

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${PEERS[@]}"

# The commit the wheels were fetched for (the device has no git: the benchmark JSON quotes this one).
sha=$(git rev-parse HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -c . || true)
"$PY" - "$DEST" "$sha" "$dirty" "${PEERS[@]}" <<'PY'
import hashlib, json, sys, time
from pathlib import Path

dest, sha, dirty, peers = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
wheels = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
          for p in sorted(dest.glob("*.whl"))}
(dest / "manifest.json").write_text(json.dumps({
    "requested": peers, "wheels": wheels, "git_sha": sha, "tracked_files_modified": dirty,
    "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
}, indent=1) + "\n")
PY

total=$(du -sb "$DEST" | cut -f1)
ls -l "$DEST"
echo "bench/gpu/wheels: $total bytes"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
    echo "bench/gpu/wheels is over 50 MB: the device call carries at most 64 MiB with the working tree" >&2
    exit 1
fi
