"""Can the answer of stage 01's multiple-choice records be picked from the options alone?

Synthesizes validation records (built-in captions by default) and runs the options-only solvers of
tests/shortcuts.py on them: each sees the four options and nothing else. Prints, per family and
solver, accuracy in % (chance is 25) with n and the largest deviation from chance.

Usage: python bench/bench_shortcuts.py [--num-val 6500] [--seed 0] [--captions FILE ...]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from stages import REPO, machine

sys.path.insert(0, os.path.join(REPO, "tests"))
from shortcuts import SOLVERS, accuracy_by_family  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-val", type=int, default=6500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--captions", nargs="+", default=[])
    args = p.parse_args()
    out = tempfile.mkdtemp(prefix="bench-shortcuts-")
    command = [sys.executable, os.path.join(REPO, "01_synthesize.py"), "--out", out, "--num-train", "0",
               "--num-val", str(args.num_val), "--seed", str(args.seed)]
    if args.captions:
        command += ["--captions", *args.captions]
    subprocess.run(command, check=True, capture_output=True)
    records = [json.loads(line) for line in open(os.path.join(out, "t3_val.jsonl"), encoding="utf-8")]
    table = accuracy_by_family(records, args.seed)
    print(f"{machine()}; {len(records)} validation records; options-only accuracy in % (chance 25)")
    print("| family | n | " + " | ".join(SOLVERS) + " | worst deviation |")
    print("|---|---|" + "---|" * len(SOLVERS) + "---|")
    for family, row in sorted(table.items()):
        n = next(iter(row.values()))[1]
        cells = [100 * c / t for c, t in row.values()]
        print(f"| {family} | {n} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {max(abs(c - 25) for c in cells):.1f} |")


if __name__ == "__main__":
    main()
