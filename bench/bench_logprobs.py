"""token_logprobs (05_train_tpo.py) against log_softmax(logits.float()).gather(...), forward + backward.

Measures peak extra memory over the logits themselves and median time, both in the same
run. On CUDA it runs the compiled Triton kernel and uses torch.cuda.max_memory_allocated;
on the CPU it runs the chunked PyTorch path and reads the growth of the process's peak
resident memory (a fresh subprocess per method, so each peak is its own).

Usage: python bench/bench_logprobs.py [--tokens 2048] [--vocab 152064] [--dtype bf16]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from stages import load_stage


def plain(logits, labels):
    picked = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != -100, picked, 0.0)


def run_case(method, tokens, vocab, dtype, repeats):
    """One method in this process: (median seconds, peak bytes beyond logits + their gradient)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = load_stage("05_train_tpo.py").token_logprobs if method == "kernel" else plain
    logits = torch.randn(tokens, vocab, device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    upstream = torch.randn(tokens, device=device)
    grad_bytes = logits.numel() * logits.element_size()  # the gradient every method must return
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        start_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(repeats):
        logits.grad = None
        began = time.perf_counter()
        fn(logits, labels).backward(upstream)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    if device == "cuda":
        grown = torch.cuda.max_memory_allocated() - start_bytes
    else:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return statistics.median(times), max(0, grown - grad_bytes)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=None, help="response tokens (default 2048 on CUDA, 512 on CPU)")
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tokens = args.tokens or (2048 if torch.cuda.is_available() else 512)
    if args.case:
        print(json.dumps(run_case(args.case, tokens, args.vocab, dtype, args.repeats)))
        return
    results = {}
    for method in ("plain", "kernel"):  # a fresh process per case, so peak memory is its own
        out = subprocess.run([sys.executable, __file__, "--case", method, "--tokens", str(tokens), "--vocab", str(args.vocab),
                              "--dtype", args.dtype, "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores), chunked PyTorch path"
    print(f"{device}; torch {torch.__version__}; {tokens} tokens x vocabulary {args.vocab}, {args.dtype} logits, forward + backward")
    print("| method | median ms | peak extra memory (MiB) | memory ratio |")
    print("|---|---|---|---|")
    for name, label in (("plain", "log_softmax(float).gather (baseline)"), ("kernel", "token_logprobs")):
        seconds, peak = results[name]
        print(f"| {label} | {seconds * 1000:.1f} | {peak / 2**20:.0f} | {peak / max(1, results['plain'][1]):.2f}x |")


if __name__ == "__main__":
    main()
