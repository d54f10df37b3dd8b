"""Tiny test videos written with PyAV: each frame a solid colour with a moving square, so frames differ."""
import av
import numpy as np


def frames_for(num_frames, height=64, width=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3, dtype=np.uint8)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frames[t] = base
        x = int(t * (width - 16) / max(1, num_frames - 1))
        frames[t, 24:40, x:x + 16] = 255 - base
    return frames


def write_video(path, frames, fps=8, faststart=False):
    """Write uint8 frames [T, H, W, 3] as an H.264 (or MPEG-4) mp4; `faststart` puts the index first,
    as streamed files have it (so a cut file still opens)."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        try:
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": "18", "preset": "ultrafast"}
        except Exception:
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_broken_videos(folder, num_frames=48):
    """The damaged and odd files users have, as {name: path}: an mp4 cut off at 60% of its bytes, one
    whose stream turns to random bytes from 60% on, a one-frame video, an empty file, and a 2x512
    strip that decodes but that Qwen-VL's processor refuses (aspect ratio over 200)."""
    import os
    good = write_video(os.path.join(folder, "whole.mp4"), noisy_frames(num_frames), faststart=True)
    data = open(good, "rb").read()
    cut = len(data) * 6 // 10
    paths = {name: os.path.join(folder, f"{name}.mp4") for name in ("truncated", "garbage_tail", "one_frame", "empty")}
    open(paths["truncated"], "wb").write(data[:cut])
    noise = np.random.default_rng(1).integers(0, 256, len(data) - cut, dtype=np.uint8).tobytes()
    open(paths["garbage_tail"], "wb").write(data[:cut] + noise)
    write_video(paths["one_frame"], frames_for(1))
    open(paths["empty"], "wb").close()
    paths["strip"] = write_video(os.path.join(folder, "strip.mp4"), frames_for(24, height=512, width=2))
    os.remove(good)
    return paths


def noisy_frames(num_frames, size=64, seed=0):
    """frames_for's moving square over random texture: every frame costs many bytes, so a cut or a
    corruption at a given share of the file lands inside the stream, not in its last few frames."""
    frames = frames_for(num_frames, size, size, seed)
    texture = np.random.default_rng(seed).integers(0, 64, (num_frames, size, size, 1), dtype=np.uint8)
    return frames // 2 + texture


def main():
    """python tests/videos.py OUT_DIR [--count 6] [--frames 48]: sample videos for an offline run."""
    import argparse
    import os
    p = argparse.ArgumentParser(description="Write small test videos (a square moving over a coloured background).")
    p.add_argument("out_dir")
    p.add_argument("--count", type=int, default=6)
    p.add_argument("--frames", type=int, default=48)
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    for i in range(args.count):
        write_video(os.path.join(args.out_dir, f"sample{i:02d}.mp4"), frames_for(args.frames, seed=i))
    print(f"wrote {args.count} videos to {args.out_dir}")


if __name__ == "__main__":
    main()
