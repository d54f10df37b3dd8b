"""Stage 03: assistant-only masking, learning, plain-peft reload, resume, video mix, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import MODELS, REPO, TOY_MODEL, load_stage, needs_toy_model, run_in_process
from videos import frames_for, write_video

t3 = load_stage("03_train_t3.py")
synth = load_stage("01_synthesize.py")
SCRIPT = os.path.join(REPO, "03_train_t3.py")


@pytest.fixture(scope="module")
def t3_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("t3data")
    subprocess.run([sys.executable, os.path.join(REPO, "01_synthesize.py"), "--out", str(out), "--num-train", "64",
                    "--num-val", "12", "--scales", "1x", "--seed", "1"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def video_sft(tmp_path_factory):
    """Three tiny videos and a video instruction JSONL that names them relative to its folder."""
    folder = tmp_path_factory.mktemp("videosft")
    lines = []
    for i in range(3):
        write_video(folder / f"clip{i}.mp4", frames_for(12, seed=i))
        lines.append({"id": f"v{i}", "video": f"clip{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat moves in this video?"},
            {"from": "gpt", "value": "A square moves from left to right."}]})
    (folder / "video_sft.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return folder


def run_train(*args):
    """Stage 03 as a command: its own process, what a user's shell sees."""
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True)


def train_in_process(*args):
    """Stage 03 in this process, where the test is not about the command itself (no interpreter and torch
    start-up per run)."""
    return run_in_process("03_train_t3.py", *args)


@pytest.mark.parametrize("arch", MODELS)
def test_assistant_only_masking_is_exact(tiny_models, arch):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_models[arch])
    turns = [{"from": "human", "value": "<video>\nWhich event happens first?"}, {"from": "gpt", "value": "A red kite flies."},
             {"from": "human", "value": "And last?"}, {"from": "gpt", "value": "B"}]
    video = frames_for(8)
    example = t3.encode(processor, t3.chat_messages(turns, with_video=True), video)
    ids, labels = example["input_ids"], example["labels"]
    trained = [i for i, label in zip(ids, labels) if label != -100]
    assert all(label in (-100, i) for i, label in zip(ids, labels))
    assert processor.tokenizer.decode(trained) == "A red kite flies.<|im_end|>\nB<|im_end|>\n"
    # the turns tokenized apart are the whole conversation as the processor makes it at once: the
    # template's text (a default system turn included), the video expanded (with Qwen3-VL's timestamps)
    full = processor.apply_chat_template(t3.chat_messages(turns, with_video=True), tokenize=False)
    assert ids == processor(text=[full], videos=[video], return_tensors="pt")["input_ids"][0].tolist()
    video_token = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    assert ids.count(video_token) > 1
    for values in example["token_extras"].values():
        assert len(values) == len(ids)


def test_collate_pads_tokens_and_concatenates_vision(tiny_models, video_sft):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_models["qwen2_vl"])
    text_only = t3.encode(processor, t3.chat_messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]))
    frames = t3.sample_frames(str(video_sft / "clip0.mp4"), 4)
    with_video = t3.encode(processor, t3.chat_messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}], True), frames)
    batch = t3.collate([text_only, with_video], processor.tokenizer.pad_token_id)
    width = len(with_video["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape == (2, width)
    assert batch["attention_mask"][0].sum() == len(text_only["input_ids"])
    assert (batch["labels"][0, len(text_only["input_ids"]):] == -100).all()
    assert batch["video_grid_thw"].shape[0] == 1


def test_frames_are_uniform_over_decodable_frames(tmp_path):
    path = write_video(tmp_path / "v.mp4", frames_for(20))
    assert t3.uniform_indices(20, 4) == [2, 7, 12, 17]
    frames = t3.sample_frames(path, 4)
    assert frames.shape == (4, 64, 64, 3) and frames.dtype.name == "uint8"
    # the moving square's x position grows with time: frames come back in order
    xs = [int(abs(f[32].astype(int) - f[0, 0].astype(int)).sum(-1).argmax()) for f in frames]
    assert xs == sorted(xs) and xs[0] < xs[-1]
    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 20)
    with pytest.raises(t3.InputError, match="bad.mp4: cannot open video"):
        t3.sample_frames(str(tmp_path / "bad.mp4"), 4)


FIRST = "Which event happens first in the video?"


@pytest.fixture(scope="module")
def first_event_data(tmp_path_factory):
    """Stage 01's `order` records from the toy world's captions, kept to "Which event happens first in
    the video?": asked openly for training (the answer is the caption), as multiple choice for
    validation, whose captions are held out."""
    out = tmp_path_factory.mktemp("order")
    subprocess.run([sys.executable, os.path.join(REPO, "01_synthesize.py"), "--out", str(out), "--tasks", "order",
                    "--captions", os.path.join(TOY_MODEL, "captions.jsonl"), "--num-train", "4000", "--num-val", "1200",
                    "--scales", "1x", "--mc-fraction", "0", "--seed", "1"], check=True, capture_output=True)
    for split in ("train", "val"):
        records = [json.loads(line) for line in open(out / f"t3_{split}.jsonl")]
        kept = [r for r in records if FIRST in r["conversations"][0]["value"]]
        (out / f"first_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    return out


@pytest.mark.slow
@needs_toy_model
def test_training_teaches_event_order_and_adapter_reloads_with_plain_peft(tmp_path_factory, first_event_data, monkeypatch):
    """A real learning signal: validation captions are held out, options are never shown in training,
    and the model starts at chance. The toy-world model reads its captions but was never asked about
    order; on "which event happens first" it gets from 0.24 to 0.92 in 60 steps of 16 (426 items, about
    40 s on 2 CPU cores). A random tiny model needs about 16,000 records for a smaller gain, and when it
    comes differs between CPUs (bench/RESULTS.md). Only the one question: given "first" and "last"
    questions together, the toy learns to answer the last event to both in 200 steps, which would pass
    on "last" alone without reading the question. The test asks, on every held-out item, for accuracy
    above chance and above the start, each with 95% confidence."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor
    # The loss's PyTorch path, as on a CPU outside the tests: the Triton interpreter would take 4x as long
    # here, and the kernels have tests of their own.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path_factory.mktemp("order_run")
    args = t3.parse_args(["--model", TOY_MODEL, "--train", str(first_event_data / "first_train.jsonl"),
                          "--val", str(first_event_data / "first_val.jsonl"), "--out", str(out), "--max-steps", "60",
                          "--batch-size", "16", "--grad-accum", "1", "--lr", "2e-3", "--no-4bit", "--no-gradient-checkpointing",
                          "--save-every", "1000", "--seed", "1"])
    trained = t3.train(args)
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    losses = [e["loss"] for e in log if e["event"] == "train"]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    evals = [e for e in log if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [0, 60]
    assert set(evals[0]["text"]) == {"all", "order"}  # overall and per family
    before, after = evals[0]["text"]["order"], evals[1]["text"]["order"]
    items = evals[1]["items"]
    assert items > 400 and before < 0.32  # four options: chance is 0.25 (0.24 measured)
    assert t3.wilson_interval(round(after * items), items)[0] > 0.25, (before, after)
    gain, spread = after - before, 1.96 * ((after * (1 - after) + before * (1 - before)) / items) ** 0.5
    assert gain - spread > 0, (before, after)  # unpaired, so conservative: the items are the same

    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    base = AutoModelForImageTextToText.from_pretrained(TOY_MODEL)
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    processor = AutoProcessor.from_pretrained(TOY_MODEL)
    batch = processor(text=["Frame 1: A red circle on the left."], return_tensors="pt")
    trained.eval()
    with torch.no_grad():
        expected, got = trained(**batch).logits, reloaded(**batch).logits
        with reloaded.disable_adapter():
            untouched = reloaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(untouched, expected, atol=1e-3)  # the adapter really changes the model


def test_4bit_training_touches_only_language_model_lora(tiny_models, t3_data, tmp_path):
    args = t3.parse_args(["--model", tiny_models["llava_onevision"], "--train", str(t3_data / "t3_train.jsonl"),
                          "--out", str(tmp_path), "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1"])
    model = t3.train(args)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    linear_types = {type(m).__name__ for n, m in model.named_modules() if "language_model.layers" in n and n.endswith("base_layer")}
    assert linear_types == {"Linear4bit"}
    vision_types = {type(m).__name__ for n, m in model.named_modules() if "vision_tower" in n and isinstance(m, torch.nn.Linear)}
    assert vision_types == {"Linear"}


def test_resume_matches_uninterrupted_run(tiny_models, t3_data, tmp_path, video_sft):
    common = ["--model", tiny_models["qwen2_vl"], "--train", t3_data / "t3_train.jsonl", "--mix", video_sft / "video_sft.jsonl",
              "--mix-ratio", "0.1", "--num-frames", "4", "--max-steps", "6", "--batch-size", "4", "--grad-accum", "2",
              "--save-every", "2", "--lr", "1e-3"]
    whole = train_in_process(*common, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    first = train_in_process(*common, "--out", tmp_path / "split", "--stop-after-steps", "3")
    assert first.returncode == 0 and "continue with --resume" in first.stdout
    assert not (tmp_path / "split" / "adapter_model.safetensors").exists()
    with open(tmp_path / "split" / "train_log.jsonl", "a") as log:  # a kill -9 after logging steps 4-5, mid-line
        log.write('{"event": "train", "step": 4, "loss": 1.0}\n{"event": "train", "step": 5, "loss": 1.0}\n{"event": "tr')
    second = train_in_process(*common, "--out", tmp_path / "split", "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    steps = [json.loads(l)["step"] for l in open(tmp_path / "split" / "train_log.jsonl") if '"train"' in l]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_runs_under_torchrun_ddp_as_one_process_would(tiny_models, t3_data, tmp_path):
    """2 ranks x 2 micro-batches (gradients all-reduced once per step) give the adapter of 1 process x 4
    micro-batches, and validation, split between the ranks and gathered, gives the same accuracy."""
    common = ["--model", tiny_models["qwen2_vl"], "--train", str(t3_data / "t3_train.jsonl"), "--val",
              str(t3_data / "t3_val.jsonl"), "--max-steps", "2", "--batch-size", "2", "--no-4bit", "--lora-dropout", "0",
              "--no-gradient-checkpointing", "--lr", "1e-2"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", SCRIPT, *common,
                             "--grad-accum", "2", "--out", str(tmp_path / "ddp")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    single = train_in_process(*common, "--grad-accum", "4", "--out", tmp_path / "one")
    assert single.returncode == 0, single.stderr[-2000:]
    logs = {name: [json.loads(line) for line in open(tmp_path / name / "train_log.jsonl")] for name in ("ddp", "one")}
    assert logs["ddp"][0]["world_size"] == 2 and [e["step"] for e in logs["ddp"] if e["event"] == "train"] == [1, 2]
    evals = {name: [e for e in log if e["event"] == "eval"] for name, log in logs.items()}
    assert [e["items"] for e in evals["ddp"]] == [e["items"] for e in evals["one"]] == [12, 12]
    assert [e["letter"] for e in evals["ddp"]] == [e["letter"] for e in evals["one"]]
    ddp, one = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("ddp", "one"))
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["bad_json", "missing_video", "missing_model", "no_gpt"])
def test_bad_input_is_one_line(tiny_models, t3_data, tmp_path, case):
    train = t3_data / "t3_train.jsonl"
    model = tiny_models["qwen2_vl"]
    extra = []
    if case == "bad_json":
        train = tmp_path / "bad.jsonl"
        train.write_text(open(t3_data / "t3_train.jsonl").readline() + "{oops\n")
        expect = f"{train}:2: not valid JSON"
    elif case == "no_gpt":
        train = tmp_path / "nogpt.jsonl"
        train.write_text(json.dumps({"id": 1, "conversations": [{"from": "human", "value": "hi"}]}) + "\n")
        expect = f"{train}:1: no gpt turn"
    elif case == "missing_video":
        mix = tmp_path / "mix.jsonl"
        mix.write_text(json.dumps({"id": 1, "video": "gone.mp4", "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}) + "\n")
        extra = ["--mix", mix]
        expect = f"{mix}:1: video {tmp_path / 'gone.mp4'} not found"
    else:
        model = tmp_path / "no-such-model"
        expect = f"{model}: no such model folder"
    result = run_train("--model", model, "--train", train, "--out", tmp_path / "out", "--max-steps", "1", *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expect}"), result.stderr[-2000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_validation_letter_accuracy_is_stage_06s_t3_val_number(tiny_models, t3_data, tmp_path):
    """One meaning for "T3 validation accuracy": 03's letter score on its validation records equals
    06's accuracy on the same t3_val records with the adapter 03 wrote."""
    out = tmp_path / "run"
    result = train_in_process("--model", tiny_models["qwen2_vl"], "--train", t3_data / "t3_train.jsonl", "--val",
                              t3_data / "t3_val.jsonl", "--out", out, "--max-steps", "3", "--batch-size", "4",
                              "--grad-accum", "1", "--lr", "5e-3", "--seed", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "as stage 06 scores t3_val" in result.stdout
    final = [json.loads(line) for line in open(out / "train_log.jsonl") if '"eval"' in line][-1]
    evaluated = run_in_process("06_eval.py", "--model", tiny_models["qwen2_vl"], "--adapter", f"t3={out}",
                               "--bench", t3_data / "t3_val.jsonl", "--batch-size", 1, "--out", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.load(open(tmp_path / "eval" / "results.json"))["results"]
    assert results["t3"]["t3_val"]["total"] == final["items"] == 12
    assert results["t3"]["t3_val"]["accuracy"] == pytest.approx(final["letter"]["all"], abs=1e-4)


@pytest.mark.parametrize("arch", MODELS)
def test_the_answer_loss_equals_the_models_own_loss_without_its_logits(tiny_models, arch):
    """AnswerNLL (hidden states at supervised positions through the fused head) gives model(**batch).loss
    and the same LoRA gradients, on a batch of a video conversation and a text one of other lengths."""
    torch.manual_seed(0)  # LoRA's starting weights: the same whichever tests ran before
    model, processor = t3.load_model(tiny_models[arch], four_bit=False, device=torch.device("cpu"))
    args = t3.parse_args(["--model", "m", "--train", "-", "--out", "-", "--no-4bit", "--lora-dropout", "0",
                          "--no-gradient-checkpointing"])
    model = t3.prepare_lora(model, args)
    for name, param in model.named_parameters():  # LoRA B starts at zero: give it weight, so LoRA matters
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    turns = [{"from": "human", "value": "<video>\nWhich event happens first?"}, {"from": "gpt", "value": "A red kite flies."}]
    video = t3.encode(processor, t3.chat_messages(turns, with_video=True), frames_for(8))
    text = t3.encode(processor, t3.chat_messages([{"from": "human", "value": "First a dog barks, then a cat runs. Which came last?"},
                                                  {"from": "gpt", "value": "the cat runs"}]))
    batch = t3.collate([video, text], processor.tokenizer.pad_token_id)
    results = []
    for loss_of in (lambda b: model(**b).loss, lambda b: t3.AnswerNLL(model)(**b)):
        model.zero_grad()
        loss = loss_of(dict(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    # The two sum in float32 in another order: up to 4e-6 of a tensor's largest gradient apart over
    # seeds 0-5 (the Qwen2.5-VL twin; a fixed 1e-6 failed 3 of them). A wrong mask or shift is far more.
    for name in plain_grads:
        scale = plain_grads[name].abs().max().item()
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=2e-5 * scale)


def bytes_by_dtype(model):
    """{(trainable, dtype): bytes} of a model's parameters (4-bit weights count as their packed uint8)."""
    sizes = {}
    for param in model.parameters():
        key = (param.requires_grad, str(param.dtype).replace("torch.", ""))
        sizes[key] = sizes.get(key, 0) + param.numel() * param.element_size()
    return sizes


def test_preparing_a_4bit_bf16_model_upcasts_nothing_frozen(tiny_models):
    """As on a GPU: a bf16 model with a 4-bit language model. After preparation the frozen weights are
    bf16 or 4-bit (peft's prepare_model_for_kbit_training made them float32), LoRA's are float32, and a
    training step runs."""
    model, processor = t3.load_model(tiny_models["qwen2_vl"], four_bit=True, device=torch.device("cpu"), dtype=torch.bfloat16)
    args = t3.parse_args(["--model", "m", "--train", "-", "--out", "-"])
    model = t3.prepare_lora(model, args)
    sizes = bytes_by_dtype(model)
    assert sizes.get((False, "float32"), 0) == 0 and sizes[(False, "bfloat16")] > 0 and sizes[(False, "uint8")] > 0
    assert {dtype for trainable, dtype in sizes if trainable} == {"float32"}
    example = t3.encode(processor, t3.chat_messages([{"from": "human", "value": "Which came first?"},
                                                     {"from": "gpt", "value": "the dog barks"}]))
    loss = t3.AnswerNLL(model)(**t3.collate([example], processor.tokenizer.pad_token_id))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_mixed_videos_are_decoded_per_batch_not_kept(tiny_models, tmp_path):
    """--mix of many videos: the encoded examples hold token ids only (no pixel tensors, so memory does
    not grow with the number of videos); each batch decodes its videos again, to the same tensors."""
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(tiny_models["qwen2_vl"])
    lines = []
    for i in range(40):
        write_video(tmp_path / f"clip{i}.mp4", frames_for(8, seed=i))
        lines.append({"id": f"v{i}", "video": f"clip{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": f"square {i}"}]})
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = t3.load_records(str(tmp_path / "mix.jsonl"), need_video=True)
    examples, skipped = t3.encode_records(records, processor, 4, 4096, "tokenize", show=False)
    assert len(examples) == 40 and skipped == {"too_long": 0, "unreadable_video": 0}
    held = [v for e in examples for v in e.values() if isinstance(v, torch.Tensor)]
    held += [v for e in examples for v in e.get("extras", {}).values()]
    assert held == []
    ready = t3.with_video(examples[7], processor, 4)
    direct = t3.encode(processor, t3.chat_messages(records[7]["conversations"], True), t3.sample_frames(records[7]["video"], 4))
    assert ready["input_ids"] == examples[7]["input_ids"] == direct["input_ids"]
    for key, value in direct["extras"].items():
        assert torch.equal(ready["extras"][key], value)


@pytest.mark.parametrize("arch", MODELS)
def test_option_scores_from_one_prompt_pass_equal_separate_sequences(tiny_models, arch, video_sft):
    """Validation runs the prompt once and shares its cache with the options: the scores equal those of
    each option as its own sequence (options of different lengths, right-padded), also right after a
    forward pass over a batch with videos (as training with --mix leaves the model: M-RoPE models
    keep that batch's position offsets)."""
    model, processor = t3.load_model(tiny_models[arch], four_bit=False, device=torch.device("cpu"))
    model.eval()
    prompt, options = "First a dog barks, then a cat runs. Which came last?", ["the cat runs", "a dog", "nothing at all happens"]
    shared = t3.option_logprobs(model, processor, prompt, options, torch.device("cpu"))
    separate = []
    for option in options:
        example = t3.encode(processor, [{"role": "user", "content": [{"type": "text", "text": prompt}]},
                                        {"role": "assistant", "content": [{"type": "text", "text": option}]}])
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"][1:])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        picked = logprobs[labels != -100].gather(-1, labels[labels != -100].unsqueeze(-1))
        separate.append(float(picked.mean()))
    assert shared == pytest.approx(separate, abs=1e-4)
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]
    with_video = t3.encode(processor, t3.chat_messages(turns, True), t3.sample_frames(str(video_sft / "clip0.mp4"), 4))
    batch = t3.collate([with_video] * 3, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    assert t3.option_logprobs(model, processor, prompt, options, torch.device("cpu")) == pytest.approx(separate, abs=1e-4)
