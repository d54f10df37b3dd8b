"""Stage 01 throughput: 100k training records, one worker (baseline) vs all workers, same run.

Usage: python bench/bench_synthesize.py [--num-train 100000] [--workers 2]
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(out, num_train, workers):
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(REPO, "01_synthesize.py"), "--out", out, "--num-train", str(num_train),
                    "--num-val", "1000", "--workers", str(workers)], check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-train", type=int, default=100000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = timed_run(os.path.join(tmp, "a"), args.num_train, 1)
        fast = timed_run(os.path.join(tmp, "b"), args.num_train, args.workers)
        same = open(os.path.join(tmp, "a", "t3_train.jsonl"), "rb").read() == open(os.path.join(tmp, "b", "t3_train.jsonl"), "rb").read()
        size = os.path.getsize(os.path.join(tmp, "b", "t3_train.jsonl")) / 2**20
    print(f"python {platform.python_version()}, {os.cpu_count()} cores, {args.num_train} training + 1000 validation records, {size:.0f} MiB")
    print("| workers | seconds | records/s | ratio to 1 worker |")
    print("|---|---|---|---|")
    for workers, seconds in ((1, base), (args.workers, fast)):
        print(f"| {workers} | {seconds:.1f} | {args.num_train / seconds:,.0f} | {base / seconds:.2f}x |")
    print(f"identical output: {same}")


if __name__ == "__main__":
    main()
