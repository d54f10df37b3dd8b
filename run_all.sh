#!/usr/bin/env bash
# Run the pipeline stage by stage into $OUT (default runs/), one subfolder per stage.
# With MODEL unset, a tiny random Qwen2-VL is built first so the whole run works offline on a CPU.
#
# Knobs (environment variables):
#   MODEL       model folder or hub id (default: a tiny model built into $OUT/tiny-model)
#   OUT         output root (default: runs)
#   SEED        random seed (default: 0)
#   NUM_TRAIN   T3 training records (default: 2000)
#   NUM_VAL     T3 validation records (default: 200)
#   SCALES      T3 event-count scales (default: "1x 2x")
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-runs}
SEED=${SEED:-0}
NUM_TRAIN=${NUM_TRAIN:-2000}
NUM_VAL=${NUM_VAL:-200}
SCALES=${SCALES:-"1x 2x"}
mkdir -p "$OUT"

if [ -z "${MODEL:-}" ]; then
  MODEL="$OUT/tiny-model"
  [ -f "$MODEL/config.json" ] || python tests/tiny_model.py "$MODEL" --arch qwen2_vl
fi
echo "== model: $MODEL"

echo "== 01 synthesize T3 text tasks -> $OUT/01"
# shellcheck disable=SC2086
python 01_synthesize.py --out "$OUT/01" --num-train "$NUM_TRAIN" --num-val "$NUM_VAL" --seed "$SEED" --scales $SCALES
python - "$OUT/01/stats.json" <<'PY'
import json, sys
stats = json.load(open(sys.argv[1]))
for split in ("train", "val"):
    print(f"   {split}: {sum(s['count'] for t in stats[split].values() for s in t.values())} records, "
          f"{len(stats[split])} task families")
PY

echo "== done; outputs under $OUT/"
