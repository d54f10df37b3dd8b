"""Stage 03 learning curve: does T3 text training teach a tiny random model temporal order?

Builds a tiny random Qwen2-VL (tests/tiny_model.py), synthesizes the `order` family
("Which event happens first/last?") in open form with stage 01, trains a LoRA adapter
with 03_train_t3.py and prints its validation accuracy every --eval-every steps. The
baseline is the same model at step 0 (no adapter), measured in the same run; chance is
one in four options. Accuracy is by option text: the option whose caption the model finds
most likely after the question, the options never shown, so the model has to retrieve
the right frame's caption from the list.

Usage: python bench/bench_t3_learning.py [--steps 1000] [--batch-size 32] [--hidden 128] [--layers 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from stages import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val", type=int, default=200, help="validation records")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    import tiny_model
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model.build(os.path.join(tmp, "model"), hidden=args.hidden, layers=args.layers)
        subprocess.run([sys.executable, os.path.join(REPO, "01_synthesize.py"), "--out", f"{tmp}/t3", "--tasks", "order",
                        "--scales", "1x", "--mc-fraction", "0", "--num-train", str(args.steps * args.batch_size),
                        "--num-val", str(args.val), "--seed", str(args.seed)], check=True, capture_output=True)
        began = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(REPO, "03_train_t3.py"), "--model", model,
                        "--train", f"{tmp}/t3/t3_train.jsonl", "--val", f"{tmp}/t3/t3_val.jsonl", "--out", f"{tmp}/run",
                        "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", "1",
                        "--lr", str(args.lr), "--lora-r", "32", "--lora-alpha", "64", "--no-4bit",
                        "--no-gradient-checkpointing", "--eval-every", str(args.eval_every), "--val-limit", str(args.val),
                        "--save-every", str(args.steps), "--seed", str(args.seed)], check=True, capture_output=True)
        seconds = time.perf_counter() - began
        log = [json.loads(line) for line in open(f"{tmp}/run/train_log.jsonl")]
    train = [e for e in log if e["event"] == "train"]
    print(f"{machine()}; tiny Qwen2-VL hidden {args.hidden}, "
          f"{args.layers} layers; {args.steps} steps x {args.batch_size} order records (1x), lr {args.lr}, LoRA r 32; "
          f"{seconds:.0f} s including evaluations")
    print("| step | records seen | mean train loss (last 50 steps) | val accuracy, option text | vs step 0 |")
    print("|---|---|---|---|---|")
    start = None
    for entry in (e for e in log if e["event"] == "eval"):
        step, accuracy = entry["step"], entry["text"]["order"]
        start = accuracy if start is None else start
        recent = [e["loss"] for e in train if step - 50 < e["step"] <= step]
        loss = f"{sum(recent) / len(recent):.3f}" if recent else "-"
        print(f"| {step} | {step * args.batch_size:,} | {loss} | {accuracy:.3f} | {accuracy - start:+.3f} |")


if __name__ == "__main__":
    main()
