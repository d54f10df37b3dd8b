"""Stage 03 training throughput: one QLoRA step (4-bit NF4) against the same step unquantized.

Builds a tiny Qwen2-VL (tests/tiny_model.py), synthesizes T3 records, and times
optimizer steps of 03_train_t3.py's own encode/collate/LoRA path. Reports tokens/s and,
on CUDA, peak memory. Usage: python bench/bench_train_t3.py [--steps 20] [--hidden 128] [--layers 4]
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from stages import load_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))



def time_steps(t3, model_dir, examples, four_bit, steps, batch_size):
    device = t3.pick_device()
    args = t3.parse_args(["--model", model_dir, "--train", "-", "--out", "-"] + ([] if four_bit else ["--no-4bit"]))
    model, processor = t3.load_model(model_dir, four_bit, device)
    model = t3.prepare_lora(model, args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for step in range(steps + 2):
        batch = t3.collate(examples[(step * batch_size) % len(examples):][:batch_size], processor.tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        began = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - began)
            tokens += int(batch["attention_mask"].sum())
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return statistics.median(times), tokens / sum(times), peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    import tiny_model
    t3 = load_stage("03_train_t3.py")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model.build(os.path.join(tmp, "model"), hidden=args.hidden, layers=args.layers)
        os.system(f"{sys.executable} {REPO}/01_synthesize.py --out {tmp}/t3 --num-train 256 --num-val 1 --scales 1x 2x >/dev/null 2>&1")
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(model_dir)
        records = t3.load_records(f"{tmp}/t3/t3_train.jsonl")
        examples = [t3.encode(processor, t3.chat_messages(r["conversations"])) for r in records]
        rows = [(name, *time_steps(t3, model_dir, examples, four_bit, args.steps, args.batch_size))
                for name, four_bit in (("unquantized (baseline)", False), ("4-bit NF4 QLoRA", True))]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"{device}; torch {torch.__version__}; python {platform.python_version()}; tiny Qwen2-VL hidden {args.hidden}, "
          f"{args.layers} layers; batch {args.batch_size} T3 records (1x/2x)")
    print("| model weights | median step (ms) | tokens/s | ratio | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for name, step, speed, peak in rows:
        print(f"| {name} | {step * 1000:.1f} | {speed:,.0f} | {speed / rows[0][2]:.2f}x | {'-' if peak is None else f'{peak:.0f}'} |")


if __name__ == "__main__":
    main()
