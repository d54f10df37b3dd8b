#!/usr/bin/env bash
# Run the pipeline stage by stage into $OUT (default runs/), one subfolder per stage.
# With MODEL unset it runs on the toy-world model (toy_world/model, a few MB, pretrained by
# toy_world/pretrain.py to see and talk but not to reason about time), offline on a CPU.
#
# Knobs (environment variables):
#   MODEL       model folder or hub id (default: toy_world/model)
#   CAPTIONS    caption files for stage 01 (default: the toy world's captions with the toy model, else built-in)
#   OUT         output root (default: runs)
#   SEED        random seed (default: 0)
#   NUM_TRAIN   T3 training records (default: 2000)
#   NUM_VAL     T3 validation records (default: 200)
#   SCALES      T3 event-count scales (default: "1x 2x")
#   STEPS       optimizer steps for each training stage (default: 200 with the toy model, else 60)
#   BATCH       records per micro-batch (default: 16 with the toy model, else 8)
#   MIX         video instruction records (JSONL) stage 03 mixes into the text, a fifth of each batch
#               (default: 300 order-free questions about new toy videos with the toy model, else none)
#   VIDEOS      videos for TPO pairs: a folder or JSONL (default: stage 02's training videos with the toy model,
#               else sample videos written into $OUT/videos)
#   NUM_PAIRS   TPO preference pairs to keep (default: 200 with the toy model, else 24)
#   PAIR_RATIO  localized:comprehensive TPO pairs (default: 0:1 with the toy model, which cannot write questions of
#               its own and is asked 02's, else 5:5)
#   JUDGE       1: the model judges its pairs; 0: cheap rules only (default: 0 for the toy model, 1 otherwise)
#   WORLD_STEPS with the toy model, optimizer steps for its second T3 adapter, t3_world (default: 400)
#   WORLD_SCENES with the toy model, new scenes per temporal aspect told in text for t3_world, of which those
#               its words can tell are kept (no light, no up or down) (default: 500)
#   NUM_FRAMES  frames per video in every stage (default: 8)
#   TEMPERATURE sampling temperature for pair answers (default: 0 = greedy)
#   PROBE_VIDEOS probe videos per aspect in stage 02, a third of them test videos (default: 150 with the toy model,
#               500 test items on the probe benchmark, else 60)
#   PROBE_SEEDS probe trainings per aspect (default: 2)
#   BENCH       extra benchmarks for stage 06, space-separated [NAME=]FILE (e.g. "videomme=/data/videomme.json")
#   VIDEO_ROOT  folder of those benchmarks' videos
#   EVAL_LIMIT  items per benchmark in stage 06 (default: all)
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-runs}
SEED=${SEED:-0}
NUM_TRAIN=${NUM_TRAIN:-2000}
NUM_VAL=${NUM_VAL:-200}
SCALES=${SCALES:-"1x 2x"}
mkdir -p "$OUT"

if [ -z "${MODEL:-}" ]; then
  MODEL=toy_world/model
  [ -f "$MODEL/model.safetensors" ] || python toy_world/pretrain.py "$MODEL"  # shipped; this rebuilds it (about 8 min)
  CAPTIONS=${CAPTIONS:-$MODEL/captions.jsonl}
  TOY=1
  # it was never taught to write questions or judge answers: its TPO pairs answer 02's multiple-choice questions
  # about its training videos, from 8 frames (chosen) and from 2 (rejected), kept by the cheap rules alone
  PAIR_RATIO=${PAIR_RATIO:-0:1}
  NUM_PAIRS=${NUM_PAIRS:-200}
  JUDGE=${JUDGE:-0}
  # enough text for its adapter to learn from, with its own kind of video questions mixed in (as T3 mixes
  # in video instruction data): without them, training on text alone costs it its sight
  STEPS=${STEPS:-200}
  BATCH=${BATCH:-16}
  # stage 01's tasks do not reach this small a model's videos (README, "The toy world"); a second T3 adapter,
  # t3_world, trains on text only too: 02's temporal questions about new scenes, told in the toy's words
  WORLD_STEPS=${WORLD_STEPS:-400}
  WORLD_SCENES=${WORLD_SCENES:-500}
  PROBE_VIDEOS=${PROBE_VIDEOS:-150}  # enough test videos for that adapter's gain to show with its interval
  if [ -z "${MIX:-}" ]; then
    MIX="$OUT/mix/mix.jsonl"
    [ -f "$MIX" ] || python -c 'import importlib.util as u, sys; s = u.spec_from_file_location("pretrain", "toy_world/pretrain.py")
m = u.module_from_spec(s); s.loader.exec_module(m); m.write_video_instructions(sys.argv[1], 300, int(sys.argv[2]))' "$OUT/mix" "$SEED"
  fi
fi
STEPS=${STEPS:-60}
BATCH=${BATCH:-8}
TEMPERATURE=${TEMPERATURE:-0}
JUDGE=${JUDGE:-1}
NUM_PAIRS=${NUM_PAIRS:-24}
PAIR_RATIO=${PAIR_RATIO:-5:5}
NUM_FRAMES=${NUM_FRAMES:-8}
PROBE_VIDEOS=${PROBE_VIDEOS:-60}
PROBE_SEEDS=${PROBE_SEEDS:-2}
if [ -z "${VIDEOS:-}" ] && [ -z "${TOY:-}" ]; then
  VIDEOS="$OUT/videos"
  [ -d "$VIDEOS" ] || python tests/videos.py "$VIDEOS" --count 6 --frames 48
fi
echo "== model: $MODEL"

echo "== 01 synthesize T3 text tasks -> $OUT/01"
# shellcheck disable=SC2086
python 01_synthesize.py --out "$OUT/01" --num-train "$NUM_TRAIN" --num-val "$NUM_VAL" --seed "$SEED" --scales $SCALES \
  ${CAPTIONS:+--captions $CAPTIONS}
python - "$OUT/01/stats.json" <<'PY'
import json, sys
stats = json.load(open(sys.argv[1]))
for split in ("train", "val"):
    print(f"   {split}: {sum(s['count'] for t in stats[split].values() for s in t.values())} records, "
          f"{len(stats[split])} task families")
PY

echo "== 02 temporal-bottleneck probe -> $OUT/02"
python 02_probe.py --model "$MODEL" --out "$OUT/02" --num-videos "$PROBE_VIDEOS" --num-frames "$NUM_FRAMES" \
  --seeds "$PROBE_SEEDS" --seed "$SEED"
python - "$OUT/02/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
controls = report.get("controls", [])
rows = [row for aspect, row in report["aspects"].items() if aspect not in controls]
chance, means = sum(r["chance"] for r in rows) / len(rows), report["temporal_means"]  # 02's means and 95% intervals
mean = lambda key: (f"{100 * (chance + means[key]['lift']):.1f} [{100 * (chance + means[key]['interval'][0]):.1f}, "
                    f"{100 * (chance + means[key]['interval'][1]):.1f}]")
probe = max(("probe_linear", "probe_temporal"), key=lambda k: means[k]["lift"])
print(f"   mean over {len(rows)} temporal aspects ({sum(r['test_videos'] for r in rows)} test videos): chance "
      f"{100 * chance:.1f}, the better probe ({probe[6:]}) {mean(probe)}, text LLM {mean('text_llm')}, video LLM {mean('video_llm')}, "
      f"video LLM with its letter prior divided out {mean('video_llm_calibrated')}")
for aspect in controls:
    row = report["aspects"][aspect]
    low, high = row["video_llm_interval"]
    print(f"   order-free control ({aspect}, {row['test_videos']} test videos): chance {100 * row['chance']:.1f}, "
          f"video LLM {100 * row['video_llm']:.1f} [{100 * low:.1f}, {100 * high:.1f}]")
PY

if [ -n "${TOY:-}" ]; then  # the toy world's own temporal questions: in text about new scenes (never 02's videos)
  # for t3_world, and about 02's training videos as 04's video list, with 02's answers given only for 04's audit
  python -c 'import importlib.util as u, sys; s = u.spec_from_file_location("pretrain", "toy_world/pretrain.py")
m = u.module_from_spec(s); s.loader.exec_module(m); m.write_world_questions(*sys.argv[1:])' "$OUT/02" "$SEED" "$NUM_FRAMES" "$WORLD_SCENES"
  VIDEOS=${VIDEOS:-"$OUT/02/tpo_videos.jsonl"}
fi

echo "== 03 QLoRA fine-tuning on T3 text tasks -> $OUT/03"
rm -rf "$OUT/03"  # a rerun starts over (the stage itself refuses to overwrite a run without --resume)
python 03_train_t3.py --model "$MODEL" --train "$OUT/01/t3_train.jsonl" --val "$OUT/01/t3_val.jsonl" \
  --out "$OUT/03" --max-steps "$STEPS" --batch-size "$BATCH" --grad-accum 1 --lr 2e-3 --val-limit 100 --seed "$SEED" \
  ${MIX:+--mix "$MIX" --mix-ratio 0.2 --num-frames "$NUM_FRAMES"}
python - "$OUT/03/train_log.jsonl" <<'PY'
import json, sys
log = [json.loads(line) for line in open(sys.argv[1])]
train = [e["loss"] for e in log if e["event"] == "train"]
evals = [e for e in log if e["event"] == "eval"]

def wilson(share, n, z=1.96):  # "0.310 [0.229, 0.405]": a share of n with its 95% Wilson interval
    centre, half = (share + z * z / (2 * n)) / (1 + z * z / n), z * (share * (1 - share) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return f"{share:.3f} [{centre - half:.3f}, {centre + half:.3f}]"

first, last = train[:5], train[-5:]
print(f"   loss {sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f} (mean of the first and last {len(last)} steps); "
      f"T3 validation accuracy on {evals[-1]['items']} records, letter log-likelihood (06's t3_val scoring): "
      f"{wilson(evals[0]['letter']['all'], evals[0]['items'])} -> {wilson(evals[-1]['letter']['all'], evals[-1]['items'])}")
PY

if [ -n "${TOY:-}" ]; then
  echo "== 03 the same on the toy world's own temporal questions in text (t3_world) -> $OUT/03_world"
  rm -rf "$OUT/03_world"
  python 03_train_t3.py --model "$MODEL" --train "$OUT/02/world_text.jsonl" --out "$OUT/03_world" --max-steps "$WORLD_STEPS" \
    --save-every "$WORLD_STEPS" --batch-size "$BATCH" --grad-accum 1 --lr 2e-3 --seed "$SEED" \
    --mix "$MIX" --mix-ratio 0.2 --num-frames "$NUM_FRAMES"
fi

echo "== 04 TPO preference pairs from $VIDEOS -> $OUT/04"
rm -rf "$OUT/04"
python 04_build_pairs.py --model "$MODEL" --adapter "$OUT/03" --videos "$VIDEOS" --out "$OUT/04" \
  --num-pairs "$NUM_PAIRS" --ratio "$PAIR_RATIO" --num-frames "$NUM_FRAMES" --sparse-frames 2 --max-new-tokens 32 \
  --temperature "$TEMPERATURE" --max-attempts 8 --seed "$SEED" $([ "$JUDGE" = 0 ] && echo --no-judge)
python - "$OUT/04/stats.json" <<'PY'
import json, sys
stats = json.load(open(sys.argv[1]))
both = sum(all(counts.values()) for counts in stats["kept_by_video"].values())
questions = {source: count["kept"] for source, count in stats["comprehensive_questions"].items()}
print(f"   {stats['kept']} pairs ({stats['kept_by_kind']['localized']} localized, {stats['kept_by_kind']['comprehensive']} "
      f"comprehensive) from {len(stats['kept_by_video'])} videos, {both} with both kinds; kept comprehensive questions: "
      f"{questions['generated']} written by the model, {questions['template']} templates, {questions['given']} given")
PY

echo "== 05 TPO (DPO + SFT) from the T3 adapter -> $OUT/05"
rm -rf "$OUT/05"
python 05_train_tpo.py --model "$MODEL" --adapter "$OUT/03" --pairs "$OUT/04/pairs.jsonl" --out "$OUT/05" \
  --max-steps "$STEPS" --grad-accum 2 --lr 1e-3 --num-frames "$NUM_FRAMES" --seed "$SEED"
python - "$OUT/05/train_log.jsonl" <<'PY'
import json, sys
log = [json.loads(line) for line in open(sys.argv[1])]
first, last = log[:5], log[-5:]

def wilson(share, n, z=1.96):  # "0.31 [0.23, 0.41]": a share of n with its 95% Wilson interval
    centre, half = (share + z * z / (2 * n)) / (1 + z * z / n), z * (share * (1 - share) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return f"{share:.2f} [{centre - half:.2f}, {centre + half:.2f}]"

def over_pairs(rows, key):  # a metric's mean over the pairs of these steps, and their number
    n = sum(r["pairs"] for r in rows)
    return sum(r[key] * r["pairs"] for r in rows) / n, n

print(f"   step 1: DPO term {log[0]['dpo']:.4f} (ln 2 = 0.6931: the policy starts at the reference), margin {log[0]['margin']:+.1e}")
print(f"   on the training pairs of the first and last {len(last)} steps ({over_pairs(last, 'margin')[1]} pairs): reward accuracy "
      f"{wilson(*over_pairs(first, 'reward_accuracy'))} -> {wilson(*over_pairs(last, 'reward_accuracy'))}; "
      f"reward margin {over_pairs(first, 'margin')[0]:.3f} -> {over_pairs(last, 'margin')[0]:.3f}")
held = [e for e in log if "val_reward_accuracy" in e]
if held:
    print(f"   held-out pairs ({held[-1]['val_pairs']}): reward accuracy {wilson(held[-1]['val_reward_accuracy'], held[-1]['val_pairs'])}, "
          f"margin {held[-1]['val_margin']:.3f}")
PY

echo "== 06 temporal benchmarks: base, +T3, +T3+TPO${TOY:+, +T3 on the toy world questions (t3_world)} -> $OUT/06"
BENCHES=(--bench "$OUT/02/probe_bench.jsonl" --bench "$OUT/02/probe_control_bench.jsonl" --bench "$OUT/01/t3_val.jsonl")
for spec in ${BENCH:-}; do BENCHES+=(--bench "$spec"); done
python 06_eval.py --model "$MODEL" --adapter t3="$OUT/03" --adapter t3+tpo="$OUT/05" \
  ${TOY:+--adapter t3_world="$OUT/03_world"} "${BENCHES[@]}" \
  ${VIDEO_ROOT:+--video-root "$VIDEO_ROOT"} ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} --num-frames "$NUM_FRAMES" \
  --out "$OUT/06" > "$OUT/06.log"
echo
cat "$OUT/06/results.md"
echo
echo "== done. Per stage: $OUT/01 T3 tasks, $OUT/02 probe report, $OUT/03 T3 adapter${TOY:+ (and $OUT/03_world)}, $OUT/04 TPO pairs,"
echo "   $OUT/05 T3+TPO adapter, $OUT/06 results (results.md, results.json, predictions.jsonl)"
