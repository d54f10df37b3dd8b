"""Runs that survive the machines, files and kills users have: every CPU's 4-bit path, broken videos,
interrupted checkpoints, and one clear line for what users mistype."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_stage, run_in_process
from test_train_tpo import make_pairs

t3 = load_stage("03_train_t3.py")
tpo = load_stage("05_train_tpo.py")
pairs = load_stage("04_build_pairs.py")  # the stage that measures video lengths


# ---------------------------------------------------------------- 4-bit on every CPU

@pytest.fixture
def avx512_bf16_cpu(monkeypatch):
    """Every 4-bit layer built from here on takes bitsandbytes' AVX512-BF16 path (its inference repack),
    whatever this CPU is."""
    import bitsandbytes.nn.modules as bnb_modules
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def packed_4bit_layers(model):
    return [n for n, m in model.named_modules()
            if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]


def test_t3_evaluates_then_trains_in_4bit_on_avx512_bf16_cpus(avx512_bf16_cpu, tiny_models, tmp_path):
    """Step-0 validation runs the 4-bit layers in eval mode without gradients, then training backpropagates
    through them: on AVX512-BF16 CPUs bitsandbytes would have repacked them for inference by then."""
    subprocess.run([sys.executable, os.path.join(REPO, "01_synthesize.py"), "--out", str(tmp_path / "data"),
                    "--num-train", "16", "--num-val", "8", "--scales", "1x"], check=True, capture_output=True)
    args = t3.parse_args(["--model", tiny_models["qwen2_vl"], "--train", str(tmp_path / "data" / "t3_train.jsonl"),
                          "--val", str(tmp_path / "data" / "t3_val.jsonl"), "--val-limit", "2", "--out", str(tmp_path / "out"),
                          "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1"])
    model = t3.train(args)
    assert [type(m).__name__ for m in model.modules()].count("Linear4bit") > 0
    assert packed_4bit_layers(model) == []
    log = [json.loads(line) for line in open(tmp_path / "out" / "train_log.jsonl")]
    assert [e["step"] for e in log if e["event"] == "train"] == [1, 2]


def test_tpo_reference_pass_then_training_in_4bit_on_avx512_bf16_cpus(avx512_bf16_cpu, tiny_models, tmp_path):
    """The reference log-probs run without gradients before training: the same trap as step-0 validation."""
    pairs = make_pairs(tmp_path, count=2)
    args = tpo.parse_args(["--model", tiny_models["qwen2_vl"], "--pairs", str(pairs), "--out", str(tmp_path / "out"),
                           "--max-steps", "1", "--grad-accum", "2"])
    model = tpo.train(args)
    assert packed_4bit_layers(model) == []
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- damaged videos

@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    from videos import write_broken_videos
    return write_broken_videos(str(tmp_path_factory.mktemp("broken")))


@pytest.mark.parametrize("name", ["truncated", "garbage_tail"])
def test_a_damaged_video_gives_the_same_decodable_frames_every_time(broken, name, capfd):
    """decord's read-ahead makes a damaged file's failures vary from read to read; what a stage gets
    must not: the frames that decode, spread uniformly, the same on every read, with one warning."""
    t3.decode_warnings.clear()
    reads = [t3.read_frames(broken[name], 8) for _ in range(6)]
    frames, shown = reads[0]
    assert frames.shape == (8, 64, 64, 3) and frames.dtype.name == "uint8"
    assert shown == sorted(shown) and len(set(shown)) == 8 and shown[-1] < 40  # spread over the part that decodes
    for again, again_shown in reads[1:]:
        assert again_shown == shown and (again == frames).all()
    assert frames.metadata["frames_indices"] == shown and frames.metadata["fps"] > 0  # the times the model is told
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {broken[name]}: ") and "frames decode" in warnings[0]
    # asked-for frames that do not decode become the nearest ones that do, in place
    replaced, replaced_shown = t3.read_frames(broken[name], 0, [0, shown[-1], 47])
    assert replaced_shown[:2] == [0, shown[-1]] and replaced_shown[2] <= 40 and (replaced[1] == frames[-1]).all()
    with pytest.raises(pairs.InputError, match="only .* of its 48 frames decode"):
        pairs.video_length(broken[name])


def test_a_healthy_video_reads_exactly_the_asked_frames(tmp_path):
    from videos import frames_for, write_video
    path = write_video(tmp_path / "v.mp4", frames_for(20))
    frames, shown = t3.read_frames(path, 0, [3, 3, 19])
    assert shown == [3, 3, 19] and frames.shape == (3, 64, 64, 3) and (frames[0] == frames[1]).all()
    assert pairs.video_length(path) == 20
    with pytest.raises(t3.InputError, match="frame 20 asked for, but the video has 20 frames"):
        t3.read_frames(path, 0, [20])


def test_one_frame_and_empty_files(broken):
    frames, shown = t3.read_frames(broken["one_frame"], 4)
    assert frames.shape == (4, 64, 64, 3) and shown == [0, 0, 0, 0]
    assert pairs.video_length(broken["one_frame"]) == 1
    with pytest.raises(t3.InputError, match="empty.mp4: cannot open video \\(an empty file\\)"):
        t3.read_frames(broken["empty"], 4)
    with pytest.raises(t3.InputError, match="is a directory"):
        t3.read_frames(os.path.dirname(broken["empty"]), 4)


def test_a_stuck_or_crashing_decoder_costs_one_video(broken, monkeypatch):
    """The decoding process is killed after DECODE_TIMEOUT seconds (or dies on its own): the video is an
    InputError and the next video decodes in a fresh process."""
    import time
    real_decode = t3._decode
    def stuck_on_garbage(path, num_frames, indices):
        if "garbage" in path:
            time.sleep(60)
        if "truncated" in path:
            os._exit(1)  # a decoder that crashes its process
        return real_decode(path, num_frames, indices)
    t3._stop_decoder()  # the next decoding process is forked with the patched function
    monkeypatch.setattr(t3, "_decode", stuck_on_garbage)
    monkeypatch.setattr(t3, "DECODE_TIMEOUT", 2.0)
    began = time.perf_counter()
    with pytest.raises(t3.InputError, match="garbage_tail.mp4: decoding took over 2 s"):
        t3.read_frames(broken["garbage_tail"], 4)
    assert time.perf_counter() - began < 10
    with pytest.raises(t3.InputError, match="truncated.mp4: the video decoder crashed"):
        t3.read_frames(broken["truncated"], 4)
    assert t3.read_frames(broken["one_frame"], 2)[0].shape == (2, 64, 64, 3)
    t3._stop_decoder()


def warning_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def assert_quiet(result):
    """No traceback, and none of ffmpeg's per-packet complaints (they run to dozens of lines per file)."""
    assert "Traceback" not in result.stderr and "[h264" not in result.stderr and "[mov" not in result.stderr, result.stderr[-3000:]


def run_stage(script, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True, text=True)


def test_t3_video_mix_skips_what_does_not_decode(broken, tiny_models, tmp_path):
    subprocess.run([sys.executable, os.path.join(REPO, "01_synthesize.py"), "--out", str(tmp_path / "data"),
                    "--num-train", "16", "--num-val", "4", "--scales", "1x"], check=True, capture_output=True)
    mix = tmp_path / "mix.jsonl"
    mix.write_text("".join(json.dumps({"id": name, "video": path, "conversations": [
        {"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A square."}]}) + "\n"
        for name, path in broken.items()))
    result = run_stage("03_train_t3.py", "--model", tiny_models["qwen2_vl"], "--train", tmp_path / "data" / "t3_train.jsonl",
                       "--mix", mix, "--mix-ratio", "0.24", "--num-frames", "4", "--out", tmp_path / "out",
                       "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--no-4bit")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result)
    warnings = warning_lines(result.stderr)
    assert len(warnings) == 4, warnings  # the cut and the corrupted file: frames spread; empty file and strip: skipped
    assert sum("frames decode" in w for w in warnings) == 2
    assert sum("skipping" in w and "empty.mp4" in w for w in warnings) == 1
    assert sum("skipping" in w and "strip.mp4" in w and "video processor cannot take it" in w for w in warnings) == 1
    start = json.loads(open(tmp_path / "out" / "train_log.jsonl").readline())
    assert start["skipped_unreadable_video"] == 2 and start["examples"] == 16 + 5 - 2


def test_pair_building_skips_damaged_videos(broken, tiny_models, tmp_path):
    from videos import frames_for, write_video
    folder = tmp_path / "videos"
    folder.mkdir()
    for name, path in broken.items():
        os.link(path, folder / os.path.basename(path))
    for i in range(2):
        write_video(folder / f"good{i}.mp4", frames_for(24, seed=i))
    result = run_stage("04_build_pairs.py", "--model", tiny_models["qwen2_vl"], "--videos", folder, "--out", tmp_path / "out",
                       "--num-pairs", "2", "--num-frames", "4", "--sparse-frames", "2", "--max-new-tokens", "8",
                       "--temperature", "1.0", "--no-judge", "--max-attempts", "4", "--no-4bit")
    assert_quiet(result)
    warnings = warning_lines(result.stderr)
    skipped = [w for w in warnings if w.startswith("warning: skipping")]
    assert len(skipped) == 4, warnings
    # the strip decodes, so it is a usable video, but the processor refuses it: its attempts are dropped
    assert all(w.startswith("warning: dropping attempt strip.mp4:") for w in warnings if w not in skipped), warnings
    stats = json.load(open(tmp_path / "out" / "stats.json"))
    assert stats["skipped_videos"] == 4 and stats["dropped_by"]["unreadable_video"] == len(warnings) - 4 > 0
    assert sorted(stats["skipped_video_ids"]) == sorted(os.path.basename(p) for n, p in broken.items() if n != "strip")


def test_tpo_uses_what_decodes_and_skips_what_does_not(broken, tiny_models, tmp_path):
    pairs = make_pairs(tmp_path, count=2)
    lines = [json.loads(line) for line in open(pairs)]
    damaged = [dict(lines[0], id="cut", video=broken["truncated"], frames={"train": [0, 10, 20, 40]}),
               dict(lines[0], id="garbage", video=broken["garbage_tail"], frames={"train": [0, 4, 8, 12]}),
               dict(lines[0], id="empty", video=broken["empty"]),
               dict(lines[0], id="strip", video=broken["strip"], frames={"train": [0, 8, 16, 23]})]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in lines + damaged))
    result = run_stage("05_train_tpo.py", "--model", tiny_models["qwen2_vl"], "--pairs", pairs, "--out", tmp_path / "out",
                       "--max-steps", "1", "--grad-accum", "1", "--num-frames", "4", "--no-4bit")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result)
    warnings = warning_lines(result.stderr)
    assert len(warnings) == 3, warnings  # frame 40 of the cut file replaced; the empty file's and the strip's pairs skipped
    assert "truncated.mp4" in warnings[0] and "replaced by the nearest" in warnings[0]
    assert "skipping pair" in warnings[1] and "empty.mp4" in warnings[1]
    assert "skipping pair" in warnings[2] and "strip.mp4" in warnings[2]
    reference = [json.loads(line)["id"] for line in open(tmp_path / "out" / "reference_logps.rank0.jsonl")]
    assert sorted(reference) == ["cut", "garbage", "p0", "p1"]


def test_eval_scores_damaged_videos_and_counts_unreadable_ones(broken, tiny_models, tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"id": name, "video": path, "question": "What moves?", "options": ["a square", "a dog"],
                                         "answer": "A", "task_type": "x"}) + "\n" for name, path in broken.items()))
    common = ["--model", tiny_models["qwen2_vl"], "--bench", bench, "--num-frames", "4", "--no-4bit"]
    strict = run_stage("06_eval.py", *common, "--out", tmp_path / "strict")
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert strict.stderr.strip().splitlines()[-1].startswith(f"error: {bench}:4: {broken['empty']}: cannot open video")
    result = run_stage("06_eval.py", *common, "--out", tmp_path / "out", "--skip-missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result)
    assert len(warning_lines(result.stderr)) == 4  # two damaged files used; the empty one and the strip skipped
    results = json.load(open(tmp_path / "out" / "results.json"))
    assert results["results"]["base"]["bench"]["total"] == 3 and results["results"]["base"]["bench"]["skipped"] == 2
    assert sorted(results["meta"]["videos_with_decoder_errors"]) == sorted([broken["truncated"], broken["garbage_tail"]])


# ---------------------------------------------------------------- checkpoints that survive a kill anywhere

class Killed(BaseException):
    """A kill -9 at this instant: nothing after it runs."""


class AdapterFolder:
    """What save_checkpoint needs of a model: peft's save_pretrained, writing files one by one."""

    def save_pretrained(self, folder):
        os.makedirs(folder, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            with open(os.path.join(folder, name), "w") as f:
                f.write("{}")


def saved_step(folder):
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
    return torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=False)["step"]


def save(path, step, kill_at=None):
    """save_checkpoint, killed just before its `kill_at`-th file-system operation (a folder removal
    gets as far as deleting one file first); returns the number of operations it performed."""
    import shutil
    operations = []
    def killable(name, real):
        def operation(*args, **kwargs):
            operations.append(name)
            if len(operations) == kill_at:
                if name == "rmtree" and os.path.isdir(args[0]) and os.listdir(args[0]):
                    os.remove(os.path.join(args[0], sorted(os.listdir(args[0]))[0]))
                raise Killed
            return real(*args, **kwargs)
        return operation
    model = AdapterFolder()
    patches = [(os, "replace"), (os, "remove"), (shutil, "rmtree"), (torch, "save"), (model, "save_pretrained")]
    originals = [getattr(owner, name) for owner, name in patches]
    for (owner, name), real in zip(patches, originals):
        setattr(owner, name, killable(name, real))
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    try:
        t3.save_checkpoint(str(path), model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), step)
    finally:
        for (owner, name), real in zip(patches, originals):
            setattr(owner, name, real)
    return len(operations)


def test_a_kill_anywhere_in_checkpointing_leaves_one_to_resume(tmp_path):
    """Kill a save at each of its steps, then kill the next save at each of its steps: a complete
    checkpoint of one of the steps saved so far is always there to resume, and an uninterrupted
    save afterwards leaves just `checkpoint/`."""
    import shutil
    operations = save(tmp_path / "count" / "checkpoint", 1)
    assert operations >= 4
    for first in range(1, operations + 2):
        for second in range(1, operations + 2):
            folder = tmp_path / f"run-{first}-{second}"
            path = folder / "checkpoint"
            save(path, 1)
            for step, kill_at in ((2, first), (3, second)):
                try:
                    save(path, step, kill_at)
                except Killed:
                    pass
                resumable = t3.complete_checkpoint(str(path))
                assert resumable is not None, (first, second, os.listdir(folder))
                assert saved_step(resumable) in (1, 2, step)
            save(path, 4)
            assert sorted(os.listdir(folder)) == ["checkpoint"] and saved_step(path) == 4
            shutil.rmtree(folder)


# ---------------------------------------------------------------- one clear line for what users type

def one_error_line(result):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and not any(line.startswith("error") for line in lines[:-1]), lines
    return lines[-1]


CAPTIONS = "".join(json.dumps({"id": i, "caption": f"A {colour} dog runs on the grass by gate {i}."}) + "\n"
                   for i, colour in zip(range(300), ["red", "black", "small", "big"] * 75))


@pytest.mark.parametrize("case,expect", [
    ("latin1", "{path}:2: not UTF-8 text"),
    ("utf16", "{path}: not UTF-8 text (NUL bytes: UTF-16 or binary)"),
    ("gzip", "{path}: gzip-compressed; decompress it first"),
    ("parquet", "{path}: a Parquet file"),
    ("directory", "{path}: is a directory, not a file"),
])
def test_unreadable_input_files_are_one_line(tmp_path, case, expect):
    import gzip
    path = tmp_path / "captions.jsonl"
    if case == "latin1":
        path.write_bytes(b'{"id": 0, "caption": "A dog."}\n' + '{"id": 1, "caption": "Un café."}\n'.encode("latin-1"))
    elif case == "utf16":
        path.write_bytes(CAPTIONS.encode("utf-16-le"))
    elif case == "gzip":
        path.write_bytes(gzip.compress(CAPTIONS.encode()))
    elif case == "parquet":
        path.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    else:
        path.mkdir()
    result = run_stage("01_synthesize.py", "--captions", path, "--out", tmp_path / "out", "--num-train", "10", "--num-val", "5")
    assert one_error_line(result).startswith("error: " + expect.format(path=path))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_a_byte_order_mark_is_accepted(tmp_path):
    """Files saved by Windows editors start with a UTF-8 byte-order mark: JSONL and JSON alike."""
    (tmp_path / "captions.jsonl").write_bytes(b"\xef\xbb\xbf" + CAPTIONS.encode())
    result = run_stage("01_synthesize.py", "--captions", tmp_path / "captions.jsonl", "--out", tmp_path / "out",
                       "--num-train", "10", "--num-val", "5", "--val-fraction", "0.3")
    assert result.returncode == 0, result.stderr
    evaluation = load_stage("06_eval.py")
    bench = tmp_path / "bench.json"
    bench.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"id": "q", "video": "", "question": "Which?", "options": ["a", "b"],
                                                     "answer": "B"}]).encode())
    assert evaluation.read_bench(str(bench), "auto", None, None)[2][0]["answer"] == 1


def test_out_pointing_at_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("a file")
    result = run_stage("01_synthesize.py", "--out", tmp_path / "taken", "--num-train", "10", "--num-val", "5")
    assert one_error_line(result) == f"error: {tmp_path / 'taken'}: exists and is not a folder; --out takes a folder"


def test_a_mistyped_model_path_fails_in_seconds(tmp_path):
    """`runs/` exists, so `runs/tiny-modle` is a local path with a typo, not a hub id to retry for minutes;
    and a hub id with the hub out of reach (here: an endpoint nothing listens on) and no cached copy
    fails at once too."""
    import time
    (tmp_path / "runs").mkdir()
    data = tmp_path / "data"
    subprocess.run([sys.executable, os.path.join(REPO, "01_synthesize.py"), "--out", str(data), "--num-train", "8",
                    "--num-val", "4", "--scales", "1x"], check=True, capture_output=True)
    for model, expect in (("runs/tiny-modle", "runs/tiny-modle: no such model folder"),
                          ("someone/no-such-model", "someone/no-such-model: no such model folder, and the hub is out of reach")):
        began = time.perf_counter()
        result = subprocess.run([sys.executable, os.path.join(REPO, "03_train_t3.py"), "--model", model,
                                 "--train", str(data / "t3_train.jsonl"), "--out", str(tmp_path / "out")],
                                capture_output=True, text=True, cwd=tmp_path, timeout=120,
                                env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "cache")})
        assert one_error_line(result).startswith(f"error: {expect}")
        assert time.perf_counter() - began < 60


def test_pair_building_leaves_no_empty_logs_when_it_makes_nothing(tiny_models, broken, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    os.link(broken["empty"], folder / "empty.mp4")
    result = run_in_process("04_build_pairs.py", "--model", tiny_models["qwen2_vl"], "--videos", folder, "--out", tmp_path / "out")
    assert one_error_line(result) == f"error: {folder}: no readable videos (1 skipped)"
    assert not {"pairs.jsonl", "attempts.jsonl"} & set(os.listdir(tmp_path / "out"))


@pytest.mark.parametrize("answer", [1, "AB", None])
def test_an_answer_that_is_not_one_letter_is_one_line(tiny_models, tmp_path, answer):
    record = {"id": "q1", "task": "order", "options": ["A. a dog", "B. a cat"],
              "conversations": [{"from": "human", "value": "Which first?\nA. a dog\nB. a cat"}, {"from": "gpt", "value": "A"}]}
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps(dict(record, id="q0", answer="B")) + "\n" + json.dumps(dict(record, answer=answer)) + "\n")
    result = run_in_process("03_train_t3.py", "--model", tiny_models["qwen2_vl"], "--train", val, "--val", val,
                       "--out", tmp_path / "t3", "--max-steps", "1")
    assert one_error_line(result) == f"error: {val}:2: 'answer' must be one option letter (A-B), not {answer!r}"
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"id": "x", "video": "", "question": "Which?", "options": ["a", "b"], "answer": "A"}) + "\n"
                     + json.dumps({"id": "y", "video": "", "question": "Which?", "options": ["a", "b"], "answer": answer}) + "\n")
    result = run_in_process("06_eval.py", "--model", tiny_models["qwen2_vl"], "--bench", bench, "--out", tmp_path / "eval")
    assert one_error_line(result).startswith(f"error: {bench}:2: answer {answer!r} is not")


# ---------------------------------------------------------------- no out-of-bounds reads

@pytest.mark.parametrize("bad_label", [-1, 50, 1 << 40])
def test_a_label_outside_the_vocabulary_is_an_error_not_a_wild_read(bad_label):
    logits, hidden, weight = torch.randn(4, 50), torch.randn(4, 8), torch.randn(50, 8)
    labels = torch.tensor([3, -100, bad_label, 7])
    with pytest.raises(ValueError, match=f"label {bad_label} is outside the vocabulary \\[0, 50\\)"):
        tpo.token_logprobs(logits, labels)
    with pytest.raises(ValueError, match=f"label {bad_label} is outside the vocabulary \\[0, 50\\)"):
        tpo.fused_token_logprobs(hidden, weight, labels)
    fine = torch.tensor([3, -100, 49, 0])
    assert tpo.token_logprobs(logits, fine)[1] == 0 and torch.isfinite(tpo.fused_token_logprobs(hidden, weight, fine)).all()


def test_a_damaged_parquet_benchmark_is_one_line_in_eval(tiny_models, tmp_path):
    """Video-MME ships as Parquet (read with pyarrow); a damaged download is one line, not a traceback."""
    bench = tmp_path / "test-00000-of-00001.parquet"
    bench.write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    result = run_in_process("06_eval.py", "--model", tiny_models["qwen2_vl"], "--bench", f"videomme={bench}", "--out", tmp_path / "out")
    assert one_error_line(result).startswith(f"error: {bench}: not a readable Parquet file (")


def test_probe_uses_what_decodes_of_a_damaged_probe_video(tiny_models, tmp_path):
    """02 renders its probe videos itself (atomically, and keeps them for a rerun): one damaged on disk
    afterwards is read as far as it decodes, with one warning; one that decodes to nothing stops the run
    in one line naming it."""
    common = ["--model", tiny_models["qwen2_vl"], "--out", tmp_path, "--aspects", "size", "--num-videos", "6",
              "--num-frames", "8", "--seeds", "1", "--no-4bit"]
    assert run_stage("02_probe.py", *common).returncode == 0
    videos = sorted((tmp_path / "videos" / "size").iterdir())
    data = videos[0].read_bytes()  # its index is at the end: corrupt the middle of the stream instead of cutting it
    start, end = len(data) * 4 // 10, len(data) * 7 // 10
    videos[0].write_bytes(data[:start] + bytes(reversed(data[start:end])) + data[end:])
    os.remove(tmp_path / "features.safetensors")
    result = run_stage("02_probe.py", *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result)
    warnings = warning_lines(result.stderr)
    assert len(warnings) == 1 and str(videos[0]) in warnings[0] and "frames decode" in warnings[0]
    videos[1].write_bytes(b"")
    os.remove(tmp_path / "features.safetensors")
    assert one_error_line(run_in_process("02_probe.py", *common)).startswith(f"error: {videos[1]}: cannot open video (an empty file)")


@pytest.mark.parametrize("record,expect", [
    ({"options": [1, 2, 3]}, "'options' must be a list of strings, not [1, 2, 3]"),
    ({"options": "A. a\nB. b"}, "'options' must be a list of strings"),
    ({"question": None}, "'question' must be a string, not null"),
    ({"video": 5}, "'video' must be a string, not 5"),
    ({"conversations": [], "options": ["A. a", "B. b"]}, "'conversations' must be a list of {from, value} turns"),
])
def test_malformed_benchmark_records_are_one_line(tmp_path, record, expect):
    evaluation = load_stage("06_eval.py")
    bench = tmp_path / "bench.jsonl"
    good = {"id": "q", "video": "", "question": "Which?", "options": ["a", "b"], "answer": "A"}
    if "conversations" in record:  # a file's layout is its first record's: here stage 01's T3 layout
        good = {"id": "q", "conversations": [{"from": "human", "value": "Which?\nA. a\nB. b"}], "options": ["A. a", "B. b"],
                "answer": "A"}
    bench.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, **record)) + "\n")
    with pytest.raises(evaluation.InputError) as error:
        evaluation.read_bench(str(bench), "auto", None, None)
    assert str(error.value) == f"{bench}:2: {expect}" or str(error.value).startswith(f"{bench}:2: {expect}")


def test_training_refuses_to_overwrite_a_run_and_says_how_to_resume(tiny_models, tmp_path):
    subprocess.run([sys.executable, os.path.join(REPO, "01_synthesize.py"), "--out", str(tmp_path / "data"),
                    "--num-train", "8", "--num-val", "4", "--scales", "1x"], check=True, capture_output=True)
    common = ["--model", tiny_models["qwen2_vl"], "--train", tmp_path / "data" / "t3_train.jsonl", "--out", tmp_path / "out",
              "--max-steps", "1", "--batch-size", "2", "--no-4bit"]
    early = run_in_process("03_train_t3.py", *common, "--resume")
    assert one_error_line(early) == (f"error: {tmp_path / 'out'}/checkpoint: nothing to resume (no checkpoint saved yet); "
                                     "run without --resume to start")
    assert run_in_process("03_train_t3.py", *common).returncode == 0
    log = (tmp_path / "out" / "train_log.jsonl").read_text()
    again = run_in_process("03_train_t3.py", *common)
    assert one_error_line(again) == (f"error: {tmp_path / 'out'}: already holds a training checkpoint; "
                                     "pass --resume to continue, or choose another --out")
    assert (tmp_path / "out" / "train_log.jsonl").read_text() == log  # the earlier run is untouched


@pytest.mark.parametrize("script,args,expect", [
    ("04_build_pairs.py", ["--videos", "v", "--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    ("04_build_pairs.py", ["--videos", "v", "--ratio", "inf:1"], "--ratio must look like 5:5, not 'inf:1'"),
    ("03_train_t3.py", ["--train", "t.jsonl", "--save-every", "0"], "--save-every must be at least 1, not 0"),
    ("03_train_t3.py", ["--train", "t.jsonl", "--eval-every", "-1"], "--eval-every must be 0 (off) or more, not -1"),
    ("05_train_tpo.py", ["--pairs", "p.jsonl", "--grad-accum", "0"], "--grad-accum must be at least 1, not 0"),
    ("02_probe.py", ["--seeds", "0"], "--seeds must be at least 1, not 0"),
    ("06_eval.py", ["--bench", "b.jsonl", "--limit", "0"], "--limit must be at least 1, not 0"),
])
def test_counts_below_one_are_usage_errors_before_any_work(script, args, expect, tmp_path):
    """A zero batch size used to loop forever (04), a zero checkpoint interval to fail after the first step (03)."""
    result = run_in_process(script, "--model", "m", "--out", tmp_path / "out", *args)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(f"error: {expect}"), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script,args", [("02_probe.py", ["--num-videos", "6", "--aspects", "size"]),
                                         ("04_build_pairs.py", ["--videos", "videos"])])
def test_a_mistyped_model_fails_before_any_video_is_rendered_or_measured(script, args, broken, tmp_path):
    (tmp_path / "videos").mkdir()
    os.link(broken["one_frame"], tmp_path / "videos" / "one.mp4")
    result = run_in_process(script, "--model", tmp_path / "no-such-model", "--out", tmp_path / "out",
                            *[tmp_path / a if a == "videos" else a for a in args])
    assert one_error_line(result) == f"error: {tmp_path / 'no-such-model'}: no such model folder"
    assert not (tmp_path / "out").exists()


def test_a_pair_whose_frames_are_a_list_is_one_line(tiny_models, tmp_path):
    path = make_pairs(tmp_path, count=1)
    record = json.loads(path.read_text())
    path.write_text(json.dumps(dict(record, frames=[0, 1, 2, 3])) + "\n")
    result = run_in_process("05_train_tpo.py", "--model", tiny_models["qwen2_vl"], "--pairs", path, "--out", tmp_path / "out")
    assert one_error_line(result).startswith(f"error: {path}:1: 'frames' must be an object of frame index lists")
