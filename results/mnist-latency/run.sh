#!/usr/bin/env bash
# How results/mnist-latency/ was made (2-core CPU container, 2026-12-02): a latency table of the mnist supernet's
# architecture on this CPU, then latency-budgeted searches on the trained supernet of results/mnist/run.sh.
# Usage: bash results/mnist-latency/run.sh [RUN_DIR]   (RUN_DIR: the mnist supernet; default runs/mnist)
set -euo pipefail
RUN=${1:-runs/mnist}
OUT=results/mnist-latency
TABLE=$OUT/latency-table-cpu.table.json

# 1. the table: DiT-T/4 at 32x32x1 (64 tokens), batch 64, one thread, 2 interleaved rounds, 4 calibration and 8
#    validation subnets
[ -f "$TABLE" ] || dynasearch bench latency-table --model DiT-T/4 --input-size 32 --in-channels 1 --num-classes 10 \
    --batch 64 --device cpu --threads 1 --repeats 10 --warmup 3 --rounds 2 --validate 8 --out "$OUT"

# 2. the budget: 40% of the full model's predicted latency (fixed before the run, as the 0.3x-0.5x FLOPs budgets)
BUDGET=$(python -c "import json; t = json.load(open('$TABLE')); print(round(0.4 * t['validation']['full_predicted_ms'], 2))")
echo "latency budget: ${BUDGET} ms"

# 3. a static search under the latency budget alone, one under latency and 0.5x FLOPs, and a timestep-aware one
dynasearch search --supernet "$RUN" --latency "${BUDGET}ms" --latency-table "$TABLE" --trials 120 --out "$OUT/static"
dynasearch search --supernet "$RUN" --latency "${BUDGET}ms" --latency-table "$TABLE" --flops 0.5x --trials 120 \
    --out "$OUT/static-and-flops"
dynasearch search --supernet "$RUN" --latency "${BUDGET}ms" --latency-table "$TABLE" --space timestep --trials 120 \
    --out "$OUT/timestep"

# 4. the reports (fronts against predicted latency, exports at measured latency; no samples for time)
for D in static static-and-flops timestep; do
    dynasearch report "$OUT/$D" --eval-num 0
done
