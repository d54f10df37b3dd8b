"""Does training on text reach the toy model's answers about videos? Stage 03 on words, stage 06 on videos.

The toy world's check of the T3 finding, run with the stages as they ship:

  1. 02_probe.py renders its videos, writes its test videos as probe_bench.jsonl (temporal
     questions) and probe_control_bench.jsonl (the order-free control), and describes every
     video's frames in words, as it does for its text-only LLM;
  2. text training sets, written as stage 01 writes records (conversation, options, answer):
       words    02's temporal questions about its *training* videos, the frames given in words
                exactly as 02 gives them to the text-only LLM. They are the benchmark's own
                questions, so no text training could transfer more: an upper bound;
       caption_words  the same questions about the same videos, each frame in the toy world's own caption
                words ("Frame 2: a large red circle on the left"), which it was pretrained on and
                stage 01 writes, not 02's coordinates;
       stamped  the same, each line starting with the frame's time as Qwen3-VL writes it before the
                frame's visual tokens ("<0.8 seconds> a large red circle on the left"): the markers
                the toy model meets in a video;
       control  02's order-free control question about the same videos, in words;
       t3       stage 01's records from the world's captions, as run_all.sh makes them;
     with --told-scenes N, stamped is told about N new scenes per aspect instead, never rendered and
     never 02's, keeping those the toy's words can tell (run_all.sh's t3_world at N=500), and control
     about as many new control scenes;
  3. 03_train_t3.py trains one adapter on each, with the same settings (4-bit QLoRA by default).
     A fifth of each adapter's records are order-free questions about --mix-videos fresh
     toy videos (which objects appear, what shape), as T3 mixes in the model's own video instruction
     data so that training on text does not cost it sight;
  4. 06_eval.py scores the base model and every adapter on the two video benchmarks and on the
     words questions about 02's *test* videos (which shows whether the text skill was learned),
     each adapter against the base model on the same items, with 95% intervals. It also scores
     them on those questions with the frames in the toy world's caption words ("Frame 2: a large
     red circle on the left", the words it was pretrained on, not 02's coordinates) and stamped: a
     skill that does not survive other words cannot be expected to survive pictures.

With --tpo SET, TPO follows from SET's adapter, as run_all.sh runs it on the toy: 04_build_pairs.py asks 02's
questions about its training videos and keeps the pairs whose answers from 8 frames (chosen) and from 2
(rejected) pick different options; 05_train_tpo.py trains on them from the adapter; 06 scores `SET+tpo`
too. The bench prints how often the chosen and the rejected answers are right (02's answers, given to 04
only for this audit) and SET+tpo against SET on the same items.

Transfer shows as a gain on probe_bench for `words`, `caption_words`, `stamped` (and `t3`) whose interval
excludes 0, with none for `control`. Every stage's output stays in --work-dir when one is given.

Usage: python bench/bench_toy_transfer.py [--sets words,caption_words,stamped,control,t3] [--aspects order_of_two,...]
           [--steps 400] [--lr 2e-3] [--num-videos 150] [--told-scenes 500] [--tpo stamped] [--tpo-pairs 400] [--tpo-steps 200]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from stages import REPO, load_stage, machine

SETS = ("words", "caption_words", "stamped", "control", "t3")
NUM_FRAMES = 8  # frames per video, as run_all.sh's stages take them


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=os.path.join(REPO, "toy_world", "model"))
    p.add_argument("--sets", default=",".join(SETS), help=f"training sets, comma-separated, of: {', '.join(SETS)}")
    p.add_argument("--aspects", help="02's temporal aspects to render, train on and score, comma-separated (default: all; "
                   "the order-free control is always added)")
    p.add_argument("--num-videos", type=int, default=150, help="02's videos per aspect (a third are test videos)")
    p.add_argument("--steps", type=int, default=400, help="03's optimizer steps for each adapter")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--mix-videos", type=int, default=300, help="mix order-free questions about this many toy videos into "
                   "every adapter's training, a fifth of its records (0: text only)")
    p.add_argument("--told-scenes", type=int, default=0, help="train `stamped` on this many new scenes per aspect, told "
                   "in text and never rendered (toy_world/pretrain.py's told_scenes), instead of on 02's training videos")
    p.add_argument("--no-4bit", action="store_true", help="train and score the model unquantized")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="keep every stage's output here (default: a temporary folder)")
    p.add_argument("--tpo", metavar="SET", help="then TPO (stages 04 and 05) from this set's adapter")
    p.add_argument("--tpo-pairs", type=int, default=400, help="TPO pairs stage 04 keeps")
    p.add_argument("--tpo-steps", type=int, default=200, help="05's optimizer steps, 2 pairs each (as run_all.sh)")
    args = p.parse_args(argv)
    args.sets = [s for s in args.sets.split(",") if s]
    unknown = [s for s in args.sets if s not in SETS]
    if args.mix_videos < 0:
        p.error(f"--mix-videos must be 0 (text only) or more, not {args.mix_videos}")
    if unknown or not args.sets:
        p.error(f"--sets takes some of {', '.join(SETS)}, not {','.join(unknown) or 'nothing'}")
    probe = load_stage("02_probe.py")
    temporal = [a for a in probe.ASPECTS if a not in probe.CONTROLS]
    args.aspects = list(dict.fromkeys(a for a in (args.aspects or ",".join(temporal)).split(",") if a))
    args.controls = list(probe.CONTROLS)  # always rendered: probe_control_bench is scored with every set
    unknown = [a for a in args.aspects if a not in temporal]
    if unknown or not args.aspects:
        p.error(f"--aspects takes some of {', '.join(temporal)} (the order-free control, {', '.join(args.controls)}, "
                f"is always added), not {','.join(unknown) or 'nothing'}")
    if args.tpo and args.tpo not in args.sets:
        p.error(f"--tpo takes one of the sets trained (--sets {','.join(args.sets)}), not {args.tpo}")
    return args


def scenes_told(pretrain, aspects, per_aspect, seed):
    """`stamped` told about `per_aspect` new scenes of each of `aspects`, and `control` about as many new scenes
    of the order-free control: training sets of text that no rendered video gave."""
    stamped = pretrain.told_scenes(aspects, per_aspect, seed, NUM_FRAMES)
    controls = pretrain.PROBE.CONTROLS
    return {"stamped": stamped, "control": pretrain.told_scenes(controls, len(stamped) // len(controls), seed, NUM_FRAMES)}


def stage(log_dir, name, *argv):
    """Run a stage script; its output goes to LOG_DIR/NAME.log, and its tail is shown if it fails."""
    log = os.path.join(log_dir, f"{name}.log")
    began = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *map(str, argv[1:])], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{name} failed (exit {done.returncode}); the end of {log}:\n" + "".join(open(log).readlines()[-15:]))
    return time.perf_counter() - began


def tpo_summary(work, name):
    """The pairs' audit (04's stats) and SET+tpo against SET on probe_bench, scored and written as 06 does."""
    evaluation = load_stage("06_eval.py")
    audit = json.load(open(f"{work}/04/stats.json"))["audit_against_given_answers"]
    lines = [f"TPO from {name}: {audit['pairs']} pairs; % right against 02's answers: the chosen answer (8 frames) "
             f"{evaluation.format_cell(audit['chosen'])}, the rejected one (2 frames) {evaluation.format_cell(audit['rejected'])}",
             "",
             f"| probe_bench task | n | {name} | {name}+tpo, against {name} |", "|---|---|---|---|"]
    by_model = {}
    for line in open(f"{work}/06/predictions.jsonl"):
        p = json.loads(line)
        if p["bench"] == "probe_bench":
            by_model.setdefault(p["model"], {})[p["id"]] = p
    before, after = by_model[name], by_model[f"{name}+tpo"]
    tasks = sorted({p["groups"]["task_type"] for p in before.values()})
    for task in ["all", *tasks]:
        ids = [i for i, p in before.items() if task == "all" or p["groups"]["task_type"] == task]
        cells = (evaluation.score_cell([before[i] for i in ids]), evaluation.score_cell([after[i] for i in ids], base=before))
        lines.append(f"| {task} | {len(ids)} | " + " | ".join(map(evaluation.format_cell, cells)) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        os.makedirs(work, exist_ok=True)
        quantized = ["--no-4bit"] if args.no_4bit else []
        pretrain = load_stage(os.path.join("toy_world", "pretrain.py"))
        if args.told_scenes:
            new_scenes = scenes_told(pretrain, args.aspects, args.told_scenes, args.seed)
            if not new_scenes["stamped"]:
                sys.exit(f"--told-scenes: the toy's words tell none of the scenes of {','.join(args.aspects)} "
                         "(they have no light, no up or down)")
        seconds = {"02": stage(work, "02", "02_probe.py", "--model", args.model, "--out", f"{work}/02", "--num-videos",
                               args.num_videos, "--num-frames", NUM_FRAMES, "--seeds", 1, "--seed", args.seed,
                               "--aspects", ",".join([*args.aspects, *args.controls]), *quantized)}
        probe_videos = [json.loads(line) for line in open(f"{work}/02/videos.jsonl")]
        train = {"words": pretrain.told_records(probe_videos, "train"),
                 "control": pretrain.told_records(probe_videos, "train", control=True)}
        pretrain.write_jsonl(f"{work}/words_test.jsonl", pretrain.told_records(probe_videos, "test"))
        for name, lines in (("caption_words", pretrain.frame_lines), ("stamped", pretrain.stamped_lines)):
            told = pretrain.retold(probe_videos, lines, args.num_videos, args.seed, NUM_FRAMES)
            train[name] = pretrain.told_records(told, "train")
            pretrain.write_jsonl(f"{work}/{name}_test.jsonl", pretrain.told_records(told, "test"))
        if args.told_scenes:  # instead of 02's training videos: new scenes, never rendered
            train.update(new_scenes)
        if "t3" in args.sets:
            seconds["01"] = stage(work, "01", "01_synthesize.py", "--out", f"{work}/01", "--captions",
                                  os.path.join(args.model, "captions.jsonl"), "--num-train", args.steps * args.batch_size,
                                  "--num-val", 200, "--scales", "1x", "2x", "--seed", args.seed)
        mix = []
        if args.mix_videos:
            mix = ["--mix", pretrain.write_video_instructions(f"{work}/mix", args.mix_videos, args.seed),
                   "--mix-ratio", 0.2, "--num-frames", NUM_FRAMES]
        adapters = []
        for name in args.sets:
            path = f"{work}/01/t3_train.jsonl" if name == "t3" else f"{work}/{name}_train.jsonl"
            if name != "t3":
                pretrain.write_jsonl(path, train[name])
            seconds[f"03 {name}"] = stage(work, f"03_{name}", "03_train_t3.py", "--model", args.model, "--train", path,
                                          "--out", f"{work}/03_{name}", "--max-steps", args.steps, "--batch-size",
                                          args.batch_size, "--grad-accum", 1, "--lr", args.lr, "--save-every", args.steps,
                                          "--seed", args.seed, *mix, *quantized)
            adapters += ["--adapter", f"{name}={work}/03_{name}"]
        if args.tpo:
            pretrain.write_jsonl(f"{work}/tpo_videos.jsonl", pretrain.given_questions(probe_videos, "02"))
            seconds["04"] = stage(work, "04", "04_build_pairs.py", "--model", args.model, "--adapter", f"{work}/03_{args.tpo}",
                                  "--videos", f"{work}/tpo_videos.jsonl", "--out", f"{work}/04", "--num-pairs", args.tpo_pairs,
                                  "--ratio", "0:1", "--num-frames", NUM_FRAMES, "--sparse-frames", 2, "--max-new-tokens", 8,
                                  "--max-attempts", 8, "--no-judge", "--seed", args.seed, *quantized)
            seconds["05"] = stage(work, "05", "05_train_tpo.py", "--model", args.model, "--adapter", f"{work}/03_{args.tpo}",
                                  "--pairs", f"{work}/04/pairs.jsonl", "--out", f"{work}/05", "--max-steps", args.tpo_steps,
                                  "--grad-accum", 2, "--lr", 1e-3, "--num-frames", NUM_FRAMES, "--seed", args.seed, *quantized)
            adapters += ["--adapter", f"{args.tpo}+tpo={work}/05"]
        seconds["06"] = stage(work, "06", "06_eval.py", "--model", args.model, *adapters,
                              "--bench", f"{work}/02/probe_bench.jsonl", "--bench", f"{work}/02/probe_control_bench.jsonl",
                              "--bench", f"words_test={work}/words_test.jsonl",
                              "--bench", f"caption_words_test={work}/caption_words_test.jsonl",
                              "--bench", f"stamped_test={work}/stamped_test.jsonl",
                              "--num-frames", NUM_FRAMES, "--out", f"{work}/06", *quantized)
        print(f"{machine()}; model {args.model}; {len(train['words'])} words, {len(train['stamped'])} stamped and "
              f"{len(train['control'])} control training records; {args.steps} steps x {args.batch_size}, lr {args.lr}, {'unquantized' if args.no_4bit else '4-bit QLoRA'}"
              + (f", a fifth of them order-free questions about {args.mix_videos} toy videos" if args.mix_videos else ""))
        print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "\n")
        results = open(f"{work}/06/results.md").read()
        print(results[:results.find("The prompt of")].strip())  # the tables; the prompts shown are 06's own checks
        if args.tpo:
            print("\n" + tpo_summary(work, args.tpo))


if __name__ == "__main__":
    main()
