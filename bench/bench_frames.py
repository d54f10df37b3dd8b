"""Frame sampling: the shared frames block (decoding in a child process, with a time limit) against
decord called in-process (what stages did before), on the same healthy videos in the same run.

Writes `--videos` H.264 videos of `--frames` frames at `--size` pixels, then times `--num-frames`
uniform frames per video, both ways, alternating videos, and checks that both give the same pixels.

Usage: python bench/bench_frames.py [--videos 20] [--frames 300] [--size 448] [--num-frames 16]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from stages import REPO, load_stage, machine

sys.path.insert(0, os.path.join(REPO, "tests"))
from videos import noisy_frames, write_video  # noqa: E402


def in_process(path, num_frames, uniform_indices):
    import decord
    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    return reader.get_batch(uniform_indices(len(reader), num_frames)).asnumpy()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=20)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--num-frames", type=int, default=16)
    args = p.parse_args()
    stage = load_stage("06_eval.py")
    folder = tempfile.mkdtemp(prefix="bench-frames-")
    paths = [write_video(os.path.join(folder, f"v{i}.mp4"), noisy_frames(args.frames, args.size, seed=i), fps=30)
             for i in range(args.videos)]
    stage.sample_frames(paths[0], args.num_frames)  # start the decoding process outside the timings
    times = {"in-process decord": [], "frames block": []}
    for path in paths:
        began = time.perf_counter()
        baseline = in_process(path, args.num_frames, stage.uniform_indices)
        times["in-process decord"].append(time.perf_counter() - began)
        began = time.perf_counter()
        frames = stage.sample_frames(path, args.num_frames)
        times["frames block"].append(time.perf_counter() - began)
        assert np.array_equal(frames, baseline), path
    base = statistics.median(times["in-process decord"])
    print(f"{machine()}; {args.videos} videos of {args.frames} frames at {args.size}x{args.size}, "
          f"{args.num_frames} frames each; identical pixels both ways")
    print("| method | median ms per video | ratio |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {1000 * statistics.median(values):.1f} | {statistics.median(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
