#!/usr/bin/env bash
# Start-up on a GPU node (#25): the 8192-row W1 job through `batchrun submit`, first with an empty
# kernel cache (cold: run it first thing on a fresh machine), then again (warm: kernels cached, the
# model's files in the page cache), each into a new output and followed by a no-op resubmit of it.
#
#   scripts/bench_startup.sh [results folder]          GPUS=1,2 for the node-scaling check too
#
# Prints, per run: wall time, time to the first token, the start-up phases and the no-op resubmit's
# wall time; the full JSON is in <results>/cold.json and <results>/warm.json.
set -euo pipefail
results=${1:-bench-startup}
py=${PYTHON:-python}
mkdir -p "$results"
export TRITON_CACHE_DIR="$results/triton-cache"  # empty before the cold run: every kernel compiles
rm -rf "$TRITON_CACHE_DIR"
for run in cold warm; do
  "$py" scripts/bench_gpus.py --workload W1 --rows 8192 --shards 16 --gpus "${GPUS:-1}" --resubmit \
    --work "$results/work" --out "$results/$run.json" > "$results/$run.log"
  "$py" - "$results/$run.json" "$run" <<'PY'
import json, sys
sys.path.insert(0, ".")
from runner.telemetry.phases import describe
doc = json.load(open(sys.argv[1]))
for r in doc["runs"]:
    print(f"{sys.argv[2]} {r['gpus']} GPU: wall {r['wall_s']} s, first token {r['first_token_s']} s, "
          f"end to end {r['end_to_end_tok_s']} tok/s (x{r['speedup_end_to_end']}), generation "
          f"{r['generation_tok_s']} tok/s, graphs {r['graphs_captured']} in {r['graph_capture_s']} s, "
          f"no-op resubmit {r['resubmit_wall_s']} s (did nothing: {r['resubmit_did_nothing']})")
    print("  phases:", describe(r["phases"]))
    for task, phases in r["worker_phases"].items():
        print(f"  {task}:", describe(phases))
PY
done
