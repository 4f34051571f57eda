#!/usr/bin/env bash
# Issue 13, second try at the fine-tuned comparison (written and committed before any of its results existed).
# Usage: bash results/mnist-finetune/run.sh [RUN_DIR]   (RUN_DIR: the mnist supernet; default runs/mnist)
#
# The first try (results/mnist/, fine-tune recipe v1 = the tool's defaults: lr 3e-3, 500 steps, no teacher) left
# searched and uniform within the seed spread at 0.3x after fine-tuning, and made the searched subnet *worse*
# (FD 92.9 -> 99.6): lr 3e-3 is above the supernet's own peak (2e-3). Recipe v2 is chosen from that, not from any
# result of this script: a tenth-ish of the supernet's peak lr (3e-4, cosine), twice the steps (1,000), and
# distillation from the supernet's full model (--teacher, weight 0.5), as DyDiT fine-tunes its pruned models.
# The inherited subnets and recipe v2 are measured here on one supernet, all sampled with 4 seeds (1,000 samples
# each) instead of 2, because two seeds spread by up to 10 FD. (Recipe v1 is not rerun: the session had no time.)
#
# Decision rule (fixed in advance): at 0.3x the search wins under a recipe when the searched subnet's mean FD over
# the 4 seeds is lower than the uniform subnet's by more than the larger of their seed spreads (max - min).
set -euo pipefail
RUN=${1:-runs/mnist}
OUT=results/mnist-finetune
FT=$RUN-finetuned-v2

# 1. the supernet, exactly as results/mnist/run.sh step 1 (DiT-T/4, mnist 32x32, 3,000 steps resumed to 7,000)
[ -f "$RUN/supernet.safetensors" ] || dynasearch train-supernet --data mnist --model DiT-T/4 --steps 3000 --lr 2e-3 \
    --warmup-steps 100 --ema-decay 0.9995 --batch-size 64 --out "$RUN"
dynasearch train-supernet --out "$RUN" --resume --steps 7000

# 2. the static search at 0.3x, as results/mnist/run.sh step 3 (120 TPE trials, the default teacher proxy)
dynasearch search --supernet "$RUN" --flops 0.3x --trials 120 --proxy teacher --out "$OUT/static-30"

# 3. the best uniform subnet within the budget and the best searched one, each fine-tuned with recipe v2
for M in uniform best; do
    D=$FT/$M
    [ -f "$D-v2/model.safetensors" ] || dynasearch finetune --checkpoint "$OUT/static-30/subnets/$M" --steps 1000 \
        --lr 3e-4 --lr-schedule cosine --teacher "$RUN" --out "$D-v2"
done

# 4. one table, measured side by side: FLOPs, FD and class accuracy, 4 sampling seeds, 1,000 samples each
dynasearch compare --seeds 0,1,2,3 --num 1000 --out "$OUT" \
    --model "uniform-0.3x=$OUT/static-30/subnets/uniform" --model "searched-0.3x=$OUT/static-30/subnets/best" \
    --model "uniform-0.3x+v2=$FT/uniform-v2" --model "searched-0.3x+v2=$FT/best-v2"

# 5. the decision rule above, applied to compare.csv
python - "$OUT/compare.csv" <<'PY'
import sys
import pandas as pd
runs = pd.read_csv(sys.argv[1])
fd = runs.groupby("model")["FD"].agg(["mean", "min", "max", "count"])
fd["spread"] = fd["max"] - fd["min"]
print(fd.round(2).to_string())
for recipe in ("", "+v2"):
    s, u = fd.loc[f"searched-0.3x{recipe}"], fd.loc[f"uniform-0.3x{recipe}"]
    margin, spread = u["mean"] - s["mean"], max(s["spread"], u["spread"])
    verdict = "search wins" if margin > spread else "no winner" if margin > -spread else "uniform wins"
    print(f"{recipe or 'inherited'}: uniform - searched = {margin:.2f} FD, larger spread {spread:.2f}: {verdict}")
PY
