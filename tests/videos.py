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


def write_video(path, frames, fps=8):
    """Write uint8 frames [T, H, W, 3] as an H.264 (or MPEG-4) mp4."""
    with av.open(str(path), "w") as container:
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
