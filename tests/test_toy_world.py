"""The toy world: its pretraining script, and the shipped model it made."""
import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import REPO, run_in_process

TOY_MODEL = os.path.join(REPO, "toy_world", "model")


def load_pretrain():
    spec = importlib.util.spec_from_file_location("pretrain", os.path.join(REPO, "toy_world", "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_pretraining_question_depends_on_order():
    """Every order-free question has the same options and answer on the frames played backwards or shuffled."""
    pretrain = load_pretrain()
    kinds = set()
    for seed in range(300):
        states, shape, _ = pretrain.random_scene(np.random.default_rng(seed))
        frames = pretrain.shown(states)
        asked = pretrain.order_free_question(np.random.default_rng(seed + 1000), frames, shape)
        kinds.add(asked[0])
        for reordered in (frames[::-1], [frames[i] for i in np.random.default_rng(seed).permutation(len(frames))]):
            assert pretrain.order_free_question(np.random.default_rng(seed + 1000), reordered, shape) == asked
    assert len(kinds) == 3  # every kind of question was asked


def test_captions_name_what_the_frame_shows():
    pretrain = load_pretrain()
    state = {"objects": [pretrain.PROBE.still("red", 0.8, 0.5, 0.24), pretrain.PROBE.still("blue", 0.2, 0.5, 0.08)]}
    assert pretrain.caption(state, "circle") == "a small blue circle on the left and a large red circle on the right"
    assert pretrain.caption({"objects": []}, "circle") == "nothing"


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision"])
def test_pretraining_is_seeded_and_writes_a_model_every_stage_loads(tmp_path, arch):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    pretrain = load_pretrain()
    digests = []
    for name in ("a", "b"):
        pretrain.main([str(tmp_path / name), "--arch", arch, "--steps", "2,1,2", "--hidden", "32", "--layers", "1", "--batch-size", "2"])
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "a")
    processor = AutoProcessor.from_pretrained(tmp_path / "a")
    assert model.config.model_type == arch
    if arch == "qwen2_vl":
        assert processor.video_processor.size.longest_edge == pretrain.FRAME_SIDE ** 2
    else:  # the world's frames as they are, 16 tokens each
        assert processor.video_processor.size.height == pretrain.PROBE.FRAME_SIDE
        states, shape, background = pretrain.random_scene(np.random.default_rng(0))
        video = pretrain.PROBE.render(pretrain.shown(states), shape, background)
        assert pretrain.PROBE.video_tokens(model, processor, [video], model.device).shape[:3] == (1, pretrain.NUM_FRAMES, 16)
    settings = json.load(open(tmp_path / "a" / "pretrain.json"))
    assert settings["steps"] == [2, 1, 2] and settings["seed"] == pretrain.parse_args(["x"]).seed and settings["arch"] == arch
    assert 0 <= settings["sight_check"] <= 1
    # its captions are stage 01's input as they ship
    result = run_in_process("01_synthesize.py", "--out", tmp_path / "01", "--captions", tmp_path / "a" / "captions.jsonl",
                            "--num-train", 40, "--num-val", 8, "--scales", "1x", "--workers", 1)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not os.path.isfile(os.path.join(TOY_MODEL, "model.safetensors")), reason="no shipped toy model")
def test_shipped_toy_model_is_small_and_made_by_the_script():
    size = sum(os.path.getsize(os.path.join(TOY_MODEL, f)) for f in os.listdir(TOY_MODEL))
    assert size <= 20 * 2 ** 20
    settings = json.load(open(os.path.join(TOY_MODEL, "pretrain.json")))
    pretrain = load_pretrain()
    defaults = vars(pretrain.parse_args(["x"]))
    assert {k: settings[k] for k in defaults if k != "out_dir"} == {k: v for k, v in defaults.items() if k != "out_dir"}
    assert settings["sight_check"] >= pretrain.SIGHT_CHECK_BAR  # it names the object in stage 02's control videos it had not seen
    captions = [json.loads(line)["caption"] for line in open(os.path.join(TOY_MODEL, "captions.jsonl"))]
    assert captions == pretrain.world_captions()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(TOY_MODEL, "model.safetensors")), reason="no shipped toy model")
def test_toy_model_sees_but_does_not_reason_about_time(tmp_path):
    """The diagnosis, measured by stage 02 as it ships: the 4-bit toy model names the object in a video
    (order-free control) far above chance, while on which object appears first it is near chance and
    the probes on its visual encodings are not. A change that breaks how 02 feeds videos, scores
    letters or pools encodings, or a pretraining that taught order, fails here."""
    result = run_in_process("02_probe.py", "--model", TOY_MODEL, "--out", tmp_path / "02", "--aspects",
                            "appearance,order_of_two", "--num-videos", 36, "--num-frames", 8, "--seeds", 1)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.load(open(tmp_path / "02" / "report.json"))["aspects"]
    control, order = rows["appearance"], rows["order_of_two"]
    assert control["video_llm_interval"][0] > 0.5  # chance 0.25, 12 test videos
    assert order["probe_linear"] >= 0.8 and order["video_llm"] <= 0.75  # chance 0.5, 12 test videos


def test_transfer_bench_asks_in_words_what_stage_02_asks_its_text_llm(tmp_path, monkeypatch):
    """bench/bench_toy_transfer.py trains on 02's questions in words: stage 06 must read its records back
    into exactly the prompt 02 gives its text-only LLM, with the right answer, and 03 must load them;
    temporal and control questions, train and test videos, stay apart."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))  # the bench imports its neighbour stages.py
    spec = importlib.util.spec_from_file_location("bench_toy_transfer", os.path.join(REPO, "bench", "bench_toy_transfer.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    probe, evaluate, train = (bench.load_stage(name) for name in ("02_probe.py", "06_eval.py", "03_train_t3.py"))
    videos = []
    for plan in probe.plan_videos(["order_of_three", "appearance"], 9, seed=0):
        states, shape, _ = probe.build_scene(plan)
        question, options, _ = probe.ASPECTS[plan["aspect"]]
        videos.append({**plan, "question": question, "options": options,
                       "description": probe.describe(states, shape, probe.uniform_indices(len(states), 8))})
    temporal = bench.words_records(probe, videos, "train", control=False)
    control = bench.words_records(probe, videos, "test", control=True)
    assert {r["task"] for r in temporal} == {"order_of_three"} and {r["task"] for r in control} == {"appearance"}
    assert len(temporal) == sum(v["split"] == "train" and v["aspect"] == "order_of_three" for v in videos) == 3
    path = tmp_path / "words.jsonl"
    bench.write_jsonl(path, temporal + control)
    assert len(train.load_records(str(path))) == len(temporal) + len(control)
    by_id = {f"words-{v['id']}": v for v in videos}
    for number, record in enumerate(temporal + control, 1):
        item = evaluate.to_item("t3", record, f"words.jsonl:{number}", str(tmp_path), None, "official")
        video = by_id[record["id"]]
        asked = probe.TEXT_PREFIX.format(description=video["description"]) + probe.choice_prompt(video["question"], video["options"])
        assert item["prompt"] == asked and item["options"] == video["options"] and item["answer"] == video["label"]
    # the same test videos in the caption words the toy was pretrained on: same questions and answers, other words
    pretrain = load_pretrain()
    reworded = bench.words_records(probe, bench.in_caption_words(probe, pretrain, videos, 9, seed=0), "test", control=True)
    assert [(r["id"], r["answer"], r["options"]) for r in reworded] == [(r["id"], r["answer"], r["options"]) for r in control]
    for record, original in zip(reworded, control):
        video = by_id[record["id"]]
        states, shape, _ = probe.build_scene(next(p for p in probe.plan_videos([video["aspect"]], 9, 0) if p["id"] == video["id"]))
        lines = record["conversations"][0]["value"].split("\n")
        shown = [states[t] for t in probe.uniform_indices(len(states), 8)]
        assert [line for line in lines if line.startswith("Frame ")] == [f"Frame {n}: {pretrain.caption(f, shape)}"
                                                                         for n, f in enumerate(shown, 1)]
        assert record["conversations"][0]["value"] != original["conversations"][0]["value"]


def test_transfer_bench_mixes_in_order_free_questions_about_toy_videos(tmp_path, monkeypatch):
    """--mix-videos: stage 03 must load the records with their videos, each video must decode to the
    scene it was rendered from (the shown frames' colours), and the answer must be the right option of
    an order-free question about it."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    spec = importlib.util.spec_from_file_location("bench_toy_transfer", os.path.join(REPO, "bench", "bench_toy_transfer.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    probe, train, pretrain = bench.load_stage("02_probe.py"), bench.load_stage("03_train_t3.py"), load_pretrain()
    path, again = (bench.video_instructions(probe, pretrain, str(tmp_path / name), 6, seed=3) for name in ("mix", "again"))
    assert path == str(tmp_path / "mix" / "mix.jsonl") and open(path).read() == open(again).read()  # seeded
    records = train.load_records(path, need_video=True)
    rng = np.random.default_rng([3, 7])
    for record in records:
        states, shape, background = pretrain.random_scene(rng)  # the same draws, in the same order
        question, options, answer = pretrain.order_free_question(rng, states, shape)
        assert record["conversations"][0]["value"] == "<video>\n" + probe.choice_prompt(question, options)
        assert record["conversations"][1]["value"] == probe.LETTERS[answer]
        frames = train.sample_frames(record["video"], 8).astype(float)
        rendered = probe.render(pretrain.shown(states), shape, background).astype(float)
        assert frames.shape == rendered.shape and np.abs(frames - rendered).mean() < 4  # lossy H.264, same pictures
