"""Every stage on tiny twins of real checkpoints: the real tokenizer, chat template and processor.

A twin (tests/tiny_model.py --like DIR) has random weights at toy sizes but the real vocabulary,
special token ids, template and video processor, so what differs between real checkpoints (a default
system turn, " A" vs "A", timestamps written into the text, several stop tokens) is what the stages
meet here. The real folders come from ../shared/real-processors or $REAL_PROCESSORS; the per-model
tests of the other files run on the twins too (conftest.MODELS). A base checkpoint, whose template
ignores chat messages, must be refused in one line by every stage.
"""
import filecmp
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoProcessor

from conftest import MODELS, NOT_CHAT_TWINS, REAL_FOLDERS, REPO, TWINS, load_stage
from videos import frames_for, write_video

t3 = load_stage("03_train_t3.py")
pairs_stage = load_stage("04_build_pairs.py")
evaluation = load_stage("06_eval.py")


def run_stage(script, *args):
    """Run a stage script. The losses take their PyTorch path, not the Triton interpreter, which at a
    real vocabulary's 150k columns costs minutes (the kernels have tests of their own)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True, text=True,
                          env=env)


def test_real_checkpoint_folders_are_found():
    if not REAL_FOLDERS:
        pytest.skip("no real checkpoint folders in ../shared/real-processors or $REAL_PROCESSORS: "
                    "the per-model tests ran on the tiny default models only")
    assert TWINS, f"none of {sorted(REAL_FOLDERS)} has a chat template that renders chat messages"


@pytest.mark.parametrize("twin", TWINS)
def test_the_twin_wears_the_real_processor_at_toy_size(tiny_models, twin):
    real_dir, twin_dir = REAL_FOLDERS[twin.split(":", 1)[1]], tiny_models[twin]
    for name in os.listdir(real_dir):
        if name not in ("config.json", "generation_config.json", "SOURCE.md", "README.md"):
            assert filecmp.cmp(os.path.join(real_dir, name), os.path.join(twin_dir, name), shallow=False), name
    real, tiny = AutoConfig.from_pretrained(real_dir), AutoConfig.from_pretrained(twin_dir)
    assert tiny.get_text_config().hidden_size == 64 and tiny.get_text_config().num_hidden_layers == 2
    for key in ("vocab_size", "bos_token_id", "eos_token_id"):
        assert getattr(tiny.get_text_config(), key) == getattr(real.get_text_config(), key), key
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(tiny, key, None) == getattr(real, key, None), key
    for key in ("patch_size", "spatial_merge_size", "temporal_patch_size"):
        assert getattr(tiny.vision_config, key, None) == getattr(real.vision_config, key, None), key
    assert os.path.getsize(os.path.join(twin_dir, "model.safetensors")) < 60 * 2 ** 20


@pytest.fixture(scope="module")
def t3_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("t3data")
    result = run_stage("01_synthesize.py", "--out", out, "--num-train", "24", "--num-val", "6", "--scales", "1x", "--seed", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def adapters(tiny_models, t3_data, tmp_path_factory):
    """{twin: folder of a 2-step stage-03 adapter}, trained on first use."""
    made = {}

    def adapter(twin):
        if twin not in made:
            out = tmp_path_factory.mktemp("t3-" + twin.split(":", 1)[1])
            result = run_stage("03_train_t3.py", "--model", tiny_models[twin], "--train", t3_data / "t3_train.jsonl",
                               "--val", t3_data / "t3_val.jsonl", "--val-limit", "4", "--out", out, "--max-steps", "2",
                               "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3", "--seed", "0")
            assert result.returncode == 0, result.stderr[-3000:]
            made[twin] = out
        return made[twin]
    return adapter


@pytest.mark.parametrize("arch", MODELS)
def test_the_model_sees_every_chosen_frame_and_when_it_was_shown(tiny_models, arch, tmp_path):
    """The processor keeps the stage's frames (Qwen3-VL's would resample them, at an assumed 24 fps)
    and learns their real times: Qwen2.5-VL's seconds per temporal patch, Qwen3-VL's timestamps."""
    write_video(tmp_path / "v.mp4", frames_for(40, seed=1), fps=8)
    frames = t3.sample_frames(str(tmp_path / "v.mp4"), 8)
    assert frames.metadata == {"fps": 8.0, "frames_indices": [2, 7, 12, 17, 22, 27, 32, 37], "total_num_frames": 40}
    processor = AutoProcessor.from_pretrained(tiny_models[arch])
    inputs = evaluation.chat_inputs(processor, [(frames, "What happens?")], torch.device("cpu"))
    patch = getattr(processor.video_processor, "temporal_patch_size", 1)
    if "video_grid_thw" in inputs:
        assert inputs["video_grid_thw"][0, 0].item() * patch == 8
    else:
        assert inputs["pixel_values_videos"].shape[1] == 8
    if "second_per_grid_ts" in inputs:  # Qwen2.5-VL: 2 frames 5 apart at 8 fps
        assert inputs["second_per_grid_ts"].tolist() == [pytest.approx(patch * 5 / 8)]
    stamps = re.findall(r"<([0-9.]+) seconds>", processor.tokenizer.decode(inputs["input_ids"][0]))
    if stamps:  # Qwen3-VL: the mean time of each temporal patch's frames
        times = [i / 8 for i in frames.metadata["frames_indices"]]
        assert [float(x) for x in stamps] == pytest.approx([sum(times[i:i + patch]) / patch for i in range(0, 8, patch)], abs=0.06)


@pytest.mark.parametrize("twin", TWINS)
def test_stage_02_probes_and_asks_both_llm_columns(tiny_models, twin, tmp_path):
    result = run_stage("02_probe.py", "--model", tiny_models[twin], "--out", tmp_path, "--aspects", "order_of_two,size",
                       "--num-videos", "18", "--num-frames", "4", "--seeds", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "report.json"))
    for aspect in ("order_of_two", "size"):
        row = report["aspects"][aspect]
        assert all(0.0 <= row[k] <= 1.0 for k in ("probe_linear", "text_llm", "video_llm")), row


@pytest.mark.parametrize("twin", TWINS)
def test_stage_03_trains_the_assistant_turns_and_the_adapter_reloads(tiny_models, adapters, twin):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    folder = adapters(twin)
    log = [json.loads(line) for line in open(folder / "train_log.jsonl")]
    losses = [e["loss"] for e in log if e["event"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert [e for e in log if e["event"] == "eval"][-1]["items"] == 4
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_models[twin]), str(folder))
    assert any("lora_A" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("twin", TWINS)
def test_stage_04_replies_end_at_every_stop_token_of_the_checkpoint(tiny_models, twin, monkeypatch):
    model, processor = pairs_stage.load_model(tiny_models[twin], four_bit=False, device=torch.device("cpu"))
    stops = pairs_stage.stop_token_ids(model, processor.tokenizer)
    configured = model.generation_config.eos_token_id
    assert set(configured if isinstance(configured, list) else [configured]) <= stops
    assert processor.tokenizer.eos_token_id in stops
    args = pairs_stage.parse_args(["--model", "m", "--videos", "v", "--out", "o", "--max-new-tokens", "3", "--batch-size", "2"])
    requests = [(frames_for(4, seed=1), "What happens?"), (None, "Write a question.")]
    real = pairs_stage.generate(model, processor, requests, args, torch.device("cpu"))
    assert [cut for _, cut in real] == [True, True]  # 3 random tokens of 150k: no stop among them, so cut short
    word = processor.tokenizer("Yes", add_special_tokens=False)["input_ids"]
    pad = processor.tokenizer.pad_token_id

    def fake_generate(stop):  # the model's reply: "Yes", then `stop`, then padding
        def generate(input_ids, **kwargs):
            reply = torch.tensor(word + [stop] + [pad] * 2).expand(len(input_ids), -1)
            return torch.cat([input_ids, reply], 1)
        return generate
    for stop in stops:
        monkeypatch.setattr(model, "generate", fake_generate(stop))
        assert pairs_stage.generate(model, processor, requests, args, torch.device("cpu")) == [("Yes", False)] * 2


@pytest.mark.parametrize("twin", MODELS)
def test_judge_and_scoring_tokens_are_the_letters_the_model_is_trained_to_write(tiny_models, twin):
    """The token ids 04's judge and 06's scoring read are the letter, yes or no, decoded as such,
    and the first token of that reply as stage 03 trains it under the real chat template."""
    processor = AutoProcessor.from_pretrained(tiny_models[twin])
    tokenizer = processor.tokenizer
    scored = evaluation.reply_token_ids(tokenizer, ["A. x", "B. y", "C. z"]) + evaluation.reply_token_ids(tokenizer, ["yes", "no"])
    assert [sorted(tokenizer.decode([i]) for i in ids) for ids in scored] == [["A"], ["B"], ["C"], ["Yes", "yes"], ["No", "no"]]
    for reply, ids in zip(["A", "B", "C", "yes", "no"], scored):
        turns = [{"from": "human", "value": "Which one?"}, {"from": "gpt", "value": reply}]
        example = t3.encode(processor, t3.chat_messages(turns))
        first_trained = next(i for i, label in zip(example["input_ids"], example["labels"]) if label != -100)
        assert first_trained in ids, (reply, tokenizer.decode([first_trained]))


def write_pairs(folder, count=3):
    lines = []
    for i in range(count):
        write_video(folder / f"clip{i}.mp4", frames_for(16, seed=i))
        lines.append({"id": f"p{i}", "video": f"clip{i}.mp4", "prompt": "What happens right after the square appears?",
                      "chosen": "The square moves to the right.", "rejected": "Nothing happens.", "kind": "localized",
                      "negative": "irrelevant", "frames": {"train": [0, 2, 4, 6, 8, 10, 12, 14], "segment": [4, 8]}})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "pairs.jsonl"


@pytest.mark.parametrize("twin", TWINS)
def test_stages_05_and_06_from_the_t3_adapter(tiny_models, adapters, twin, tmp_path):
    pairs = write_pairs(tmp_path)
    result = run_stage("05_train_tpo.py", "--model", tiny_models[twin], "--adapter", adapters(twin), "--pairs", pairs,
                       "--out", tmp_path / "tpo", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
                       "--num-frames", "8", "--seed", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads(open(tmp_path / "tpo" / "train_log.jsonl").readline())
    assert first["dpo"] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts at its reference
    bench = [{"id": f"q{i}", "video": f"clip{i}.mp4", "question": "Where does the square go?", "options": ["left", "right", "up"],
              "answer": "B", "task_type": "direction"} for i in range(3)]
    bench.append({"id": "yn", "video": "clip0.mp4", "question": "Does the square move?", "options": ["yes", "no"], "answer": "A",
                  "task_type": "motion"})
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(item) + "\n" for item in bench))
    result = run_stage("06_eval.py", "--model", tiny_models[twin], "--adapter", f"t3={adapters(twin)}",
                       "--adapter", f"t3+tpo={tmp_path / 'tpo'}", "--bench", tmp_path / "bench.jsonl",
                       "--num-frames", "4", "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl")]
    assert len(predictions) == 3 * len(bench)  # base, t3, t3+tpo
    assert all(p["prediction"] is not None for p in predictions)


@pytest.fixture(scope="module")
def base_checkpoints(tiny_models, tmp_path_factory):
    """The real base checkpoints' twins, and a tiny model given a base model's template: the parts of
    the first message in a row, with no roles (as base Qwen2-VL's)."""
    folder = tmp_path_factory.mktemp("base") / "base"
    shutil.copytree(tiny_models["qwen2_vl"], folder)
    (folder / "chat_template.jinja").write_text(
        "{% for part in messages %}{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}")
    return {"made:base": str(folder), **{twin: tiny_models[twin] for twin in NOT_CHAT_TWINS}}


@pytest.mark.parametrize("base", ["made:base"] + NOT_CHAT_TWINS)
def test_a_base_checkpoint_is_refused_in_one_line_by_every_stage(base_checkpoints, t3_data, tmp_path, base, monkeypatch,
                                                                 capsys):
    model = base_checkpoints[base]
    pairs = write_pairs(tmp_path, count=1)
    commands = {
        "02_probe.py": ["--aspects", "size", "--num-videos", "6", "--num-frames", "4"],
        "03_train_t3.py": ["--train", t3_data / "t3_train.jsonl", "--max-steps", "1"],
        "04_build_pairs.py": ["--videos", tmp_path, "--num-pairs", "1"],
        "05_train_tpo.py": ["--pairs", pairs, "--max-steps", "1"],
        "06_eval.py": ["--bench", t3_data / "t3_val.jsonl"],
    }
    for script, extra in commands.items():  # in-process: what `python SCRIPT ...` runs, without its start-up
        stage = load_stage(script)
        monkeypatch.setattr(sys, "argv", [script, "--model", model, "--out", str(tmp_path / script), *map(str, extra)])
        with pytest.raises(SystemExit) as exit_status:
            stage.run_main(stage.main)
        assert exit_status.value.code == 2, script
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith(f"error: {model}: its chat template does not render a chat turn with a video"), \
            (script, lines[-1:])


def test_stage_05_names_an_architecture_without_a_video_encoder(tiny_models, tmp_path, monkeypatch, capsys):
    """A model that reads videos as images (SmolVLM2 has no get_video_features) stops 05 in one line."""
    from transformers import Qwen2VLModel
    tpo = load_stage("05_train_tpo.py")
    monkeypatch.delattr(Qwen2VLModel, "get_video_features")
    monkeypatch.setattr(sys, "argv", ["05_train_tpo.py", "--model", tiny_models["qwen2_vl"], "--pairs",
                                      str(write_pairs(tmp_path, count=1)), "--out", str(tmp_path / "out"), "--max-steps", "1"])
    with pytest.raises(SystemExit) as exit_status:
        tpo.run_main(tpo.main)
    assert exit_status.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {tiny_models['qwen2_vl']}: qwen2_vl has no video encoder (get_video_features)"), last


@pytest.fixture(scope="module")
def qwen3_vl_two_frame_units(tmp_path_factory):
    """A tiny Qwen3-VL with the released checkpoints' video layout: 2 frames to a temporal unit (one
    "<t seconds>" each, at the mean time of its frames) and transformers' default video processor."""
    import tiny_model
    tokenizer, template = tiny_model.train_tokenizer("qwen2_vl", tiny_model.synthesize_corpus(seed=0), 1024)
    torch.manual_seed(0)
    model, processor = tiny_model.build_qwen3_vl(tokenizer, template, 64, 2, temporal_patch=2)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    def write(tmp):
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return tiny_model.write_atomically(str(tmp_path_factory.mktemp("qwen3_vl") / "model"), write)


@pytest.mark.parametrize("count", [8, 7])
def test_qwen3_vl_with_two_frames_a_unit_keeps_the_frames_and_stamps_each_unit(qwen3_vl_two_frame_units, count, tmp_path):
    """The stage's frames are kept (not resampled at the processor's fps 2), grouped 2 to a unit, and each
    unit's stamp is the mean time of its frames; an odd count repeats the last frame."""
    write_video(tmp_path / "v.mp4", frames_for(40, seed=1), fps=8)
    frames = t3.sample_frames(str(tmp_path / "v.mp4"), count)
    processor = AutoProcessor.from_pretrained(qwen3_vl_two_frame_units)
    inputs = evaluation.chat_inputs(processor, [(frames, "What happens?")], torch.device("cpu"))
    units = (count + 1) // 2
    assert inputs["video_grid_thw"][0, 0].item() == units
    times = [i / 8 for i in frames.metadata["frames_indices"]]
    times += times[-1:] * (2 * units - count)
    stamps = re.findall(r"<([0-9.]+) seconds>", processor.tokenizer.decode(inputs["input_ids"][0]))
    assert [float(x) for x in stamps] == pytest.approx([(times[i] + times[i + 1]) / 2 for i in range(0, 2 * units, 2)], abs=0.06)


def test_qwen3_vl_with_two_frames_a_unit_runs_the_probe_and_the_evaluation(qwen3_vl_two_frame_units, tmp_path):
    """Stage 02 pools its encodings per unit of 2 frames, and 06 scores its videos, on the released layout."""
    result = run_stage("02_probe.py", "--model", qwen3_vl_two_frame_units, "--out", tmp_path / "02", "--aspects",
                       "order_of_two,appearance", "--num-videos", 12, "--num-frames", 8, "--seeds", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "02" / "report.json"))
    assert 0.0 <= report["aspects"]["order_of_two"]["probe_linear"] <= 1.0
    result = run_stage("06_eval.py", "--model", qwen3_vl_two_frame_units, "--bench", tmp_path / "02" / "probe_bench.jsonl",
                       "--num-frames", 8, "--out", tmp_path / "06")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(tmp_path / "06" / "results.json"))["results"]["base"]["probe_bench"]["total"] == 4
