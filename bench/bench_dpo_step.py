"""One DPO step per pair: chosen and rejected packed over one shared prompt, against two sequences.

Runs 05_train_tpo.py's own rows_logps (vision once per pair, fused LM-head log-probs) forward
and backward through the LoRA policy, for pairs whose prompts are about 90% visual tokens and
whose answers are about a tenth of the prompt. Each variant runs in a fresh process. Memory is
what the forward pass keeps for the backward pass (the bytes of the distinct tensors autograd
saves, counted with saved_tensors_hooks, on any device) and, on CUDA, the peak allocated.
Without --model a tiny random Qwen2-VL is built (tests/tiny_model.py).

Usage: python bench/bench_dpo_step.py [--model DIR] [--frames 128] [--steps 10] [--hidden 256] [--layers 4]
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from stages import load_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
ANSWER = "The small square slides from the left edge towards the right edge, then stops near the corner."



def saved_bytes(storages):
    """Hooks that record each tensor autograd saves for backward, by storage, and leave it unchanged."""
    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def run_case(shared, model_dir, video, frames, steps, four_bit):
    """(median seconds per pair, bytes saved for backward, CUDA peak bytes or None, prompt tokens,
    visual tokens, answer tokens) in this process."""
    tpo = load_stage("05_train_tpo.py")
    device = tpo.pick_device()
    args = tpo.parse_args(["--model", model_dir, "--pairs", "-", "--out", "-"] + ([] if four_bit else ["--no-4bit"]))
    model, processor = tpo.load_model(model_dir, four_bit, device)
    model = tpo.prepare_policy(model, args)
    model.train()
    pair = {"video": video, "prompt": "What happens in this video, from beginning to end?", "chosen": ANSWER,
            "rejected": " ".join(reversed(ANSWER.split()))}
    encoded = tpo.encode_pair(processor, pair, frames)
    chosen = encoded[0]
    visual = chosen["input_ids"].count(processor.tokenizer.convert_tokens_to_ids(processor.video_token))
    prompt = tpo.prompt_length(*encoded)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, storages = [], {}
    for step in range(steps + 1):
        began = time.perf_counter()
        with saved_bytes(storages) if step == 0 else contextlib.nullcontext():
            sums, counts = tpo.rows_logps(model, processor, [encoded], device, shared_prompt=shared)
        (-(sums[0] - sums[1])).backward()  # the DPO term's shape; the reference is a constant
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() - start_bytes if device.type == "cuda" else None
    return statistics.median(times), sum(storages.values()), peak, prompt, visual, len(chosen["input_ids"]) - prompt


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: a tiny random Qwen2-VL built here)")
    p.add_argument("--frames", type=int, default=128, help="frames shown per pair (the tiny model: 2 visual tokens per frame)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--no-4bit", dest="four_bit", action="store_false")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--video", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case == "shared", args.model, args.video, args.frames, args.steps, args.four_bit)))
        return
    import tiny_model
    from videos import frames_for, write_video
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or tiny_model.build(os.path.join(tmp, "model"), hidden=args.hidden, layers=args.layers)
        video = write_video(os.path.join(tmp, "clip.mp4"), frames_for(args.frames))
        results = {}
        for variant in ("two-sequences", "shared"):
            command = [sys.executable, __file__, "--case", variant, "--model", model_dir, "--video", video,
                       "--frames", str(args.frames), "--steps", str(args.steps)] + ([] if args.four_bit else ["--no-4bit"])
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{variant} failed: {out.stderr.strip().splitlines()[-1]}")
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    seconds, saved, peak, prompt, visual, answer = results["two-sequences"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"device: {device}; torch {torch.__version__}; model {args.model or f'tiny Qwen2-VL h{args.hidden} x{args.layers}'}; "
          f"{'4-bit' if args.four_bit else 'unquantized'}; prompt {prompt} tokens ({100 * visual / prompt:.0f}% visual), "
          f"answers ~{answer} tokens")
    print("| variant | median ms per pair | time ratio | saved for backward (MiB) | ratio | CUDA peak (MiB) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for variant, (s, kept, top, *_) in results.items():
        cuda = f"{top / 2**20:.0f} | {top / peak:.2f}x" if peak else "- | -"
        print(f"| {variant} | {1000 * s:.1f} | {s / seconds:.2f}x | {kept / 2**20:.1f} | {kept / saved:.2f}x | {cuda} |")


if __name__ == "__main__":
    main()
