"""What does the toy model read off a video's frames? It narrates new test videos, checked line by line.

The toy world's model was pretrained to narrate a video ("Describe the video frame by frame.": one
caption per frame after its time). Asked that about new test videos of each of stage 02's temporal aspects, its
narration shows which words it reads off the frames: for each frame, whether its line names as many
objects as the frame's caption, and the same colours, sides and size words (the shape word aside: the
test split's shapes are new to it). A text skill about size cannot carry to videos whose size it does
not read, and one about speed has no such excuse when the sides are read right.

Usage: python bench/bench_toy_narration.py [--model toy_world/model] [--videos-per-aspect 10] [--seed 12345]
           [--adapter DIR] [--out narration.json]
"""
import argparse
import json
import os
import re

from tqdm import tqdm

from stages import REPO, load_stage, machine

PARTS = ("count", "colour", "side", "size", "all")  # what a narrated line must get right, "all": every part


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default=os.path.join(REPO, "toy_world", "model"), help="model folder (default: the shipped toy model)")
    p.add_argument("--adapter", help="a PEFT adapter to narrate with (default: the model alone)")
    p.add_argument("--videos-per-aspect", type=int, default=10, help="new test videos per aspect, as 02 plans its test split (with few, at least one per answer)")
    p.add_argument("--seed", type=int, default=12345, help="plans the videos (02's plan_videos)")
    p.add_argument("--out", help="also write the shares as JSON here")
    return p.parse_args(argv)


def objects(line):
    """[(size word or "", colour, side)] that a caption line names: "a large red circle on the left and ..."."""
    words = re.sub(r"<[^>]*>", "", line).strip()
    if words == "nothing":
        return []
    named = []
    for part in words.split(" and "):
        w = part.split()
        sized = len(w) > 1 and w[1] in ("small", "large")
        named.append((w[1] if sized else "", w[2 if sized else 1] if len(w) > 2 else "", " ".join(w[-2:])))
    return named


def line_parts(said, truth):
    """{part: 1 or 0} for one narrated line against its frame's caption."""
    got, want = objects(said), objects(truth)
    same = len(got) == len(want)
    parts = {"count": same}
    for k, part in enumerate(("size", "colour", "side")):
        parts[part] = same and all(a[k] == b[k] for a, b in zip(got, want))
    parts["all"] = same and got == want
    return {k: int(v) for k, v in parts.items()}


def main(argv=None):
    args = parse_args(argv)
    world = load_stage("toy_world/pretrain.py")
    probe = world.PROBE
    model, processor = probe.load_model(args.model)
    if args.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    aspects = [a for a in probe.ASPECTS if a not in probe.CONTROLS]
    # a third of 02's videos are test videos: plan three times as many, keep the test ones
    plans = [p for p in probe.plan_videos(aspects, 3 * args.videos_per_aspect, args.seed) if p["split"] == "test"]
    shown_at = probe.uniform_indices(probe.RENDERED_FRAMES, world.NUM_FRAMES)
    right = {a: dict.fromkeys(PARTS, 0) | {"frames": 0, "videos": 0} for a in aspects}
    for plan in tqdm(plans, desc="narrate", unit="video", mininterval=2):
        states, shape, background = probe.build_scene(plan)
        frames = [states[t] for t in shown_at]
        video = world.clip(probe.render(frames, shape, background))
        said = probe.choice_generate(model, processor, [(video, world.NARRATE)], model.device, max_new_tokens=200)[0].split("\n")
        tally = right[plan["aspect"]]
        tally["videos"] += 1
        for k, truth in enumerate(world.stamped_lines(frames, shape).split("\n")):
            tally["frames"] += 1
            for part, ok in (line_parts(said[k], truth) if k < len(said) else {}).items():
                tally[part] += ok
    shares = {a: {"videos": t["videos"], "frames": t["frames"], **{p: t[p] / t["frames"] for p in PARTS}}
              for a, t in right.items() if t["frames"]}
    print(f"{machine()}; {args.model}{' + ' + args.adapter if args.adapter else ''}")
    print("| aspect (test videos) | " + " | ".join(PARTS) + " |\n|---|" + "---|" * len(PARTS))
    for aspect, s in shares.items():
        print(f"| {aspect} ({s['videos']}) | " + " | ".join(f"{100 * s[p]:.0f}%" for p in PARTS) + " |")
    print("share of frames whose narrated line has the caption's number of objects, and with it the same colours, "
          "sides, size words, and all of them")
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(shares, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return shares


if __name__ == "__main__":
    main()
