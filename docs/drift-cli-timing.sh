#!/usr/bin/env bash
# `refit drift` as a whole process, before and after, side by side: 3 alternating runs of each under /usr/bin/time -v.
# Usage: docs/drift-cli-timing.sh BEFORE_CHECKOUT [WORKDIR]
#   BEFORE_CHECKOUT: e.g. a worktree of the older commit (git worktree add --detach /tmp/wt-before <commit>).
# Files: a 1,000-row reference (predictions, confidences, labels, scored_on) and a 500-row window of CLINC150 texts
# (REFIT_DATA_DIR), drawn as refit.bench.drift draws a quiet pair. Each checkout runs once first, untimed in the
# table's comparison ("before, first", "after, first"): it writes the reference's embeddings and, after the ONNX
# change, builds the encoder graph in a fresh REFIT_HOME ($WORKDIR/home); the 3 timed runs of each read them.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"; before="$1"; work="${2:-$(mktemp -d)}"
py="$here/.venv/bin/python"
export HF_HUB_OFFLINE=1 DO_NOT_TRACK=1
"$py" - "$work" <<'PY'
import os, sys
from pathlib import Path
import numpy as np, pandas as pd
from refit.bench import drift as bench_drift
out = Path(sys.argv[1])
pools = bench_drift.load_pools(Path(os.environ["REFIT_DATA_DIR"]), "within")
reference, current = bench_drift.pair_rows(pools, 500, index=0, kind=bench_drift.QUIET)
def served(rows, seed):
    return pd.DataFrame({"text": rows["text"].to_numpy(), "predicted_label": rows["label"].to_numpy(),
                         "confidence": np.random.default_rng(seed).uniform(0.6, 1.0, len(rows))})
served(reference, 0).assign(label=reference["label"].to_numpy(), scored_on="held_out").to_parquet(out / "ref.parquet")
served(current, 1).to_parquet(out / "cur.parquet")
PY
export REFIT_HOME="$work/home"
rm -rf "$REFIT_HOME"
for side in before after; do
  mkdir -p "$work/$side"; cp "$work/ref.parquet" "$work/cur.parquet" "$work/$side/"
  rm -f "$work/$side/ref.parquet.embeddings.npz"
done
run() {  # label checkout side
  (cd "$2" && PYTHONPATH="$2" /usr/bin/time -v "$py" -m refit.cli drift "$work/$3/ref.parquet" "$work/$3/cur.parquet" \
     --json >"$work/$3/out.json" 2>"$work/time.txt")
  awk -v l="$1" -F': ' '/Elapsed/{w=$2} /User time/{u=$2} /System time/{s=$2} /Maximum resident/{m=$2}
       END{printf "%-14s wall %s  user %s s  sys %s s  max RSS %d MB\n", l, w, u, s, m/1024}' "$work/time.txt"
}
uptime
run "before, first" "$before" before
run "after, first" "$here" after
for i in 1 2 3; do run before "$before" before; run after "$here" after; done
uptime
"$py" - "$work" <<'PY'
import json, sys
before, after = (json.load(open(f"{sys.argv[1]}/{side}/out.json")) for side in ("before", "after"))
same = all(before[k] == after[k] for k in ("drift_detected", "severity", "rows_reference", "rows_current"))
same &= all(s["drifted"] == after["signals"][n]["drifted"] for n, s in before["signals"].items())
gap = max(abs(s["value"] - after["signals"][n]["value"]) for n, s in before["signals"].items())
print(f"verdicts identical: {same}; largest signal value difference {gap:.1e}")
PY
