"""Response log-probs from hidden states, forward + backward: fused_token_logprobs (05_train_tpo.py)
against hidden @ weight.T then log_softmax(float).gather, and against TRL's chunked implementation.

The LM head is frozen (as under QLoRA), so each method returns the gradient for the hidden
states only. Each method runs in a fresh process so that its peak is its own: on CUDA the
growth of torch.cuda.max_memory_allocated, on the CPU the growth of the peak resident memory,
minus the gradient every method returns. On CUDA the fused Triton kernel runs; on the CPU its
chunked PyTorch path. TRL is optional (`pip install trl==1.16.0` in the bench environment, or
`--trl-path` to an unpacked wheel); it is never a dependency of the stages.

Usage: python bench/bench_fused_logprobs.py [--tokens 512 2048] [--hidden 896] [--vocab 152064] [--dtype fp32]
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from stages import load_stage

METHODS = ("plain", "trl", "fused")


def method_fn(method):
    if method == "fused":
        return load_stage("05_train_tpo.py").fused_token_logprobs
    if method == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        # TRL's own default tiling: 4,096 tokens x 32,768 vocabulary; no optional outputs
        return lambda hidden, weight, labels: ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32768,
                                                                           None, 1.0, ())[0]

    def plain(hidden, weight, labels):
        logits = hidden @ weight.T
        return torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return plain


def run_case(method, tokens, hidden_size, vocab, dtype, repeats):
    """(median seconds, peak extra bytes, forward seconds) for one method in this process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = method_fn(method)
    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(vocab, hidden_size, device=device, generator=generator, dtype=dtype)
    weight.mul_(hidden_size ** -0.5)  # in place: a temporary copy would raise the peak that the CPU reading starts from
    hidden = torch.randn(tokens, hidden_size, device=device, generator=generator).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=generator)
    upstream = torch.randn(tokens, device=device, generator=generator)
    grad_bytes = hidden.numel() * hidden.element_size()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # a peak never falls: read it first
    if device == "cuda":
        fn(hidden, weight, labels).backward(upstream)  # warm-up: compiles the kernel
        hidden.grad = None
        sync()
        start_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, forward_times = [], []
    for _ in range(repeats):
        hidden.grad = None
        began = time.perf_counter()
        out = fn(hidden, weight, labels)
        sync()
        forward_times.append(time.perf_counter() - began)
        out.backward(upstream)
        sync()
        times.append(time.perf_counter() - began)
    if device == "cuda":
        grown = torch.cuda.max_memory_allocated() - start_bytes
    else:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return statistics.median(times), max(0, grown - grad_bytes), statistics.median(forward_times)


def matmul_rate(dtype):
    """Measured FLOP/s of a large matmul in `dtype` on this device: the ceiling for the forward pass."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 8192 if device == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(5):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 5 * 2 * size ** 3 / (time.perf_counter() - began)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", help="response tokens (default 2048 8192 32768 on CUDA, 512 on CPU)")
    p.add_argument("--hidden", type=int, help="hidden size (default 3584 on CUDA as in Qwen2-7B, 896 on CPU)")
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trl-path", help="folders (joined by ':') holding trl and what it imports, if not installed; "
                                      "searched after the installed packages")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    hidden = args.hidden or (3584 if cuda else 896)
    if args.trl_path:
        sys.path += args.trl_path.split(os.pathsep)
    if args.case:
        method, tokens = args.case.split(":")
        print(json.dumps(run_case(method, int(tokens), hidden, args.vocab, dtype, args.repeats)))
        return
    try:
        import trl.kernels.chunked_logprob  # noqa: F401
        methods, trl_version = METHODS, __import__("trl").__version__
    except ImportError:
        methods, trl_version = ("plain", "fused"), None
    rate = matmul_rate(dtype)
    print(f"device: {torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu'}; torch {torch.__version__}; "
          f"trl {trl_version or 'not installed'}; hidden {hidden}, vocabulary {args.vocab}, {str(dtype)[6:]}; "
          f"matmul rate {rate / 1e12:.2f} TFLOP/s")
    print("| tokens | method | median ms (fwd+bwd) | time vs plain | peak extra MiB | memory vs plain | memory vs TRL | forward FLOP/s vs matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens or ([2048, 8192, 32768] if cuda else [512]):
        results = {}
        for method in methods:
            command = [sys.executable, __file__, "--case", f"{method}:{tokens}", "--hidden", str(hidden), "--vocab",
                       str(args.vocab), "--dtype", "bf16" if dtype == torch.bfloat16 else "fp32", "--repeats", str(args.repeats)]
            if args.trl_path:
                command += ["--trl-path", args.trl_path]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {tokens} | {method} | failed: {out.stderr.strip().splitlines()[-1]} | | | | | |")
                continue
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results.get("plain")
        for method, (seconds, extra, forward) in results.items():
            flops = 2 * tokens * hidden * args.vocab / forward
            vs = lambda other, i: f"{(seconds, extra)[i] / max(other[i], 1e-9):.2f}x" if other else "-"
            print(f"| {tokens} | {method} | {1000 * seconds:.1f} | {vs(base, 0) if base else '-'} | {extra / 2**20:.0f} | "
                  f"{vs(base, 1)} | {vs(results.get('trl'), 1)} | {flops / rate:.2f} |")


if __name__ == "__main__":
    main()
