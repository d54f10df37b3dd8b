"""Stage 03's loss at a 7B head: model(**batch).loss's way (logits for every position, then cross
entropy over the supervised ones) against AnswerNLL's (the supervised positions' hidden states
through fused_token_logprobs, no logits held).

Hidden 3,584 and vocabulary 152,064 as in Qwen2-VL-7B; a sequence of --tokens tokens of which
--supervised carry loss (a T3 answer is a few tokens; 64 is generous). Forward + backward to the
hidden states (the head is frozen under QLoRA). Each path runs in a fresh process so its peak is its
own: on CUDA the growth of torch.cuda.max_memory_allocated, on the CPU of the peak resident memory,
minus the hidden-state gradient both return.

Usage: python bench/bench_sft_loss.py [--tokens 2048] [--supervised 64] [--hidden 3584] [--vocab 152064]
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from stages import load_stage, machine

PATHS = ("all-position logits (model(**batch).loss)", "supervised positions, fused head (AnswerNLL)")


def losses(t3):
    def plain(hidden, weight, labels):
        logits = hidden @ weight.T  # what the model's head computes for every position
        return torch.nn.functional.cross_entropy(logits.float()[:-1], labels[1:], ignore_index=-100)

    def fused(hidden, weight, labels):
        targets = labels[1:]
        supervised = targets != -100
        return -t3.fused_token_logprobs(hidden[:-1][supervised], weight, targets[supervised]).mean()
    return plain, fused


def run_case(path, tokens, supervised, hidden_size, vocab, repeats):
    """(median seconds, peak extra bytes, loss) of one path in this process."""
    t3 = load_stage("03_train_t3.py")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as stage 03 loads the model
    generator = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(vocab, hidden_size, device=device, generator=generator, dtype=dtype)
    weight.mul_(hidden_size ** -0.5)
    hidden = torch.randn(tokens, hidden_size, device=device, generator=generator).to(dtype).requires_grad_(True)
    labels = torch.full((tokens,), -100, device=device)
    labels[-supervised:] = torch.randint(0, vocab, (supervised,), device=device, generator=generator)
    fn = losses(t3)[path]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        fn(hidden, weight, labels).backward()  # warm-up: compiles the kernel
        hidden.grad = None
        sync()
        start_bytes = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        hidden.grad = None
        began = time.perf_counter()
        loss = fn(hidden, weight, labels)
        loss.backward()
        sync()
        times.append(time.perf_counter() - began)
    grown = (torch.cuda.max_memory_allocated() - start_bytes if device == "cuda"
             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before)
    return statistics.median(times), max(0, grown - hidden.numel() * hidden.element_size()), float(loss)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--supervised", type=int, default=64)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.tokens, args.supervised, args.hidden, args.vocab, args.repeats)))
        return
    print(f"{machine()}; {args.tokens} tokens, {args.supervised} supervised; hidden {args.hidden}, vocabulary {args.vocab}; "
          f"{'bf16' if torch.cuda.is_available() else 'float32'}; median of {args.repeats}, forward + backward")
    print("| loss path | median ms | peak extra MiB | loss |")
    print("|---|---|---|---|")
    for case, name in enumerate(PATHS):
        out = subprocess.run([sys.executable, __file__, "--case", str(case), "--tokens", str(args.tokens), "--supervised",
                              str(args.supervised), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
                              "--repeats", str(args.repeats)], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
            continue
        seconds, extra, loss = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {seconds * 1000:.0f} | {extra / 2**20:,.0f} | {loss:.4f} |")


if __name__ == "__main__":
    main()
