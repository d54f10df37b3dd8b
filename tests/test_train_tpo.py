"""Stage 05: the log-prob kernel against float64, the DPO objective, one vision pass per pair, training."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import MODELS, REPO, load_stage, run_in_process
from videos import frames_for, write_video

tpo = load_stage("05_train_tpo.py")
SCRIPT = os.path.join(REPO, "05_train_tpo.py")


def reference_logprobs(logits, labels, ignore_index=-100):
    logits64 = logits.detach().double().requires_grad_(True)
    picked = torch.log_softmax(logits64, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels != ignore_index, picked, torch.zeros_like(picked)), logits64


@pytest.mark.parametrize("shape,vocab,dtype,scale", [
    ((6,), 1000, torch.float32, 3.0),
    ((2, 5), 3001, torch.float32, 1.0),       # not a power of two, batched labels
    ((4,), 70001, torch.float32, 2.0),        # several vocabulary blocks
    ((3, 3), 1531, torch.bfloat16, 4.0),
    ((5,), 257, torch.float32, 1e4),          # large-magnitude logits
])
def test_token_logprobs_matches_float64(shape, vocab, dtype, scale):
    assert tpo._use_triton(torch.empty(1)), "the Triton path must be the one under test"
    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(*shape, vocab, generator=generator) * scale).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, shape, generator=generator)
    labels.view(-1)[1] = -100
    upstream = torch.randn(shape, generator=generator)
    out = tpo.token_logprobs(logits, labels)
    out.backward(upstream)
    expected, logits64 = reference_logprobs(logits, labels)
    expected.backward(upstream.double())
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert out.view(-1)[1].item() == 0.0 and logits.grad.view(-1, vocab)[1].abs().max().item() == 0.0
    tol = 1e-5 * max(1.0, scale) if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=tol)
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=4e-3 if dtype != torch.float32 else 1e-6)


def test_pytorch_path_matches_triton_path(monkeypatch):
    logits = torch.randn(9, 777, dtype=torch.float64).float().requires_grad_(True)
    labels = torch.randint(0, 777, (9,))
    labels[4] = -100
    upstream = torch.randn(9)
    triton_out = tpo.token_logprobs(logits, labels)
    (triton_grad,) = torch.autograd.grad(triton_out, logits, upstream)
    monkeypatch.setattr(tpo, "_use_triton", lambda _: False)
    torch_out = tpo.token_logprobs(logits, labels)
    (torch_grad,) = torch.autograd.grad(torch_out, logits, upstream)
    torch.testing.assert_close(torch_out, triton_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch_grad, triton_grad, rtol=1e-6, atol=1e-7)


def test_dpo_loss_equals_hand_computation():
    beta, alpha = 0.2, 0.5
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -3.0])
    nll = torch.tensor([1.5, 2.5])
    loss, metrics = tpo.dpo_loss(pc, pr, rc, rr, nll, beta, alpha)
    # pair 1: 0.2 * ((-3 + 3.5) - (-4 + 3.5)) = 0.2; pair 2: 0.2 * ((-5 + 4) - (-2 + 3)) = -0.4
    import math
    by_hand = ((math.log1p(math.exp(-0.2)) + 0.5 * 1.5) + (math.log1p(math.exp(0.4)) + 0.5 * 2.5)) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert metrics["reward_accuracy"] == 0.5 and metrics["margin"] == pytest.approx(-0.1, rel=1e-6)


def make_pairs(folder, count=6):
    lines = []
    for i in range(count):
        write_video(folder / f"clip{i}.mp4", frames_for(16, seed=i))
        lines.append({"id": f"p{i}", "video": f"clip{i}.mp4", "prompt": "What happens right after the square appears?",
                      "chosen": "The square moves to the right.", "rejected": "Nothing happens.",
                      "kind": "localized", "negative": "irrelevant",
                      "frames": {"train": [0, 2, 4, 6, 8, 10, 12, 14], "segment": [4, 8]}})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.mark.parametrize("shared_prompt", [True, False], ids=["packed", "two-sequences"])
@pytest.mark.parametrize("arch", MODELS)
def test_shared_vision_pass_equals_the_models_own_forward(tiny_models, pairs_file, arch, shared_prompt):
    """rows_logps (vision once, response-only head, fused kernel; packed or not) == log-softmax of the
    model's plain forward over each sequence alone."""
    model, processor = tpo.load_model(tiny_models[arch], four_bit=False, device=torch.device("cpu"))
    model.eval()
    pairs = tpo.load_pairs(str(pairs_file))[:2]
    pairs[1] = dict(pairs[1], chosen="A much longer answer about the square and where it goes next.")
    encoded = [tpo.encode_pair(processor, p, 8) for p in pairs]
    calls = []
    tower = model.model.visual if hasattr(model.model, "visual") else model.model.vision_tower
    hook = tower.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        sums, counts = tpo.rows_logps(model, processor, encoded, torch.device("cpu"), shared_prompt=shared_prompt)
    assert len(calls) == 1  # one vision call for both pairs' videos, shared by chosen and rejected
    for row, example in enumerate(e for pair in encoded for e in pair):
        batch = tpo.collate([example], processor.tokenizer.pad_token_id)
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits[0, :-1].double()
        targets = labels[0, 1:]
        expected = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)[targets != -100].sum()
        assert counts[row] == (targets != -100).sum()
        assert sums[row].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-4)
    hook.remove()
    assert len(calls) == 1 + 4  # the plain forwards above ran it once per row


def test_vision_tower_runs_once_per_pair_in_training(tiny_models, pairs_file, tmp_path, monkeypatch):
    calls = []
    original = tpo.prepare_policy
    def counting_policy(model, args):
        model.model.visual.register_forward_hook(lambda *a: calls.append(1))
        return original(model, args)
    monkeypatch.setattr(tpo, "prepare_policy", counting_policy)
    args = tpo.parse_args(["--model", tiny_models["qwen2_vl"], "--pairs", str(pairs_file), "--out", str(tmp_path),
                           "--max-steps", "2", "--grad-accum", "2", "--batch-size", "1"])
    tpo.train(args)
    # 6 reference passes (one per pair, before training) + 2 steps x 2 pairs; checkpointing recomputes none
    assert len(calls) == 6 + 4


def test_training_raises_reward_accuracy_and_reloads_with_plain_peft(tiny_models, pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    result = subprocess.run([sys.executable, SCRIPT, "--model", tiny_models["qwen2_vl"], "--pairs", str(pairs_file),
                             "--out", str(tmp_path), "--max-steps", "6", "--grad-accum", "2", "--lr", "1e-3",
                             "--no-4bit", "--beta", "0.1", "--alpha", "1.0"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert log[0]["margin"] == pytest.approx(0.0, abs=1e-5)  # policy starts equal to the reference
    assert log[0]["reward_accuracy"] == 0.0 and sum(e["reward_accuracy"] for e in log[-3:]) / 3 > 0.9
    assert log[-1]["margin"] > 0.3
    base = AutoModelForImageTextToText.from_pretrained(tiny_models["qwen2_vl"])
    model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    processor = tpo.load_model(tiny_models["qwen2_vl"], four_bit=False, device=torch.device("cpu"))[1]
    pairs = tpo.load_pairs(str(pairs_file))
    with torch.no_grad():
        sums, _ = tpo.rows_logps(model, processor, [tpo.encode_pair(processor, p, 8) for p in pairs], torch.device("cpu"))
    reference = {json.loads(l)["id"]: json.loads(l)["logps"] for l in open(tmp_path / "reference_logps.rank0.jsonl")}
    margins = [(sums[2 * i] - reference[p["id"]][0]) - (sums[2 * i + 1] - reference[p["id"]][1]) for i, p in enumerate(pairs)]
    assert all(m > 0 for m in margins)  # the reloaded adapter prefers every chosen answer over its rejected one


def test_starts_from_a_t3_adapter_which_is_also_the_reference(tiny_models, pairs_file, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText
    base = AutoModelForImageTextToText.from_pretrained(tiny_models["qwen2_vl"])
    t3 = get_peft_model(base, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)$", init_lora_weights=False))
    t3.save_pretrained(tmp_path / "t3")
    args = tpo.parse_args(["--model", tiny_models["qwen2_vl"], "--adapter", str(tmp_path / "t3"), "--pairs", str(pairs_file),
                           "--out", str(tmp_path / "out"), "--max-steps", "2", "--grad-accum", "1", "--no-4bit"])
    model = tpo.train(args)
    config = json.load(open(tmp_path / "out" / "adapter_config.json"))
    assert config["r"] == 4  # the T3 adapter, trained further
    log = [json.loads(l) for l in open(tmp_path / "out" / "train_log.jsonl")]
    assert log[0]["margin"] == pytest.approx(0.0, abs=1e-5)  # reference == starting policy == base + T3
    assert list(model.peft_config) == ["default"]


def test_resume_matches_uninterrupted_run(tiny_models, pairs_file, tmp_path):
    from safetensors.torch import load_file
    common = ["05_train_tpo.py", "--model", tiny_models["llava_onevision"], "--pairs", pairs_file,
              "--max-steps", 4, "--grad-accum", 2, "--save-every", 1, "--lr", 1e-3]
    whole = run_in_process(*common, "--out", tmp_path / "whole")
    assert whole.returncode == 0 and "reference:" in whole.stderr, whole.stderr[-2000:]  # its progress bar shows here
    first = run_in_process(*common, "--out", tmp_path / "split", "--stop-after-steps", 2)
    assert first.returncode == 0 and "continue with --resume" in first.stdout
    with open(tmp_path / "split" / "train_log.jsonl", "a") as log:  # a kill -9 after logging step 3, mid-line
        log.write('{"step": 3, "loss": 1.0}\n{"step"')
    with open(tmp_path / "split" / "reference_logps.rank0.jsonl", "a") as cache:  # and mid-way through a cache line
        cache.write('{"id": "p9", "lo')
    second = run_in_process(*common, "--out", tmp_path / "split", "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "reference:" not in second.stderr  # cached reference log-probs were reused, not recomputed
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("whole", "split"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "split" / "train_log.jsonl")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_processes_equal_one_with_twice_the_accumulation(tiny_models, pairs_file, tmp_path):
    """Under torchrun each process takes every other pair of a step and the gradients are averaged,
    so 2 processes x 1 pair per step train the same adapter as 1 process x 2 pairs."""
    from safetensors.torch import load_file
    common = [SCRIPT, "--model", tiny_models["qwen2_vl"], "--pairs", str(pairs_file), "--max-steps", "3",
              "--lr", "1e-3", "--no-4bit", "--no-gradient-checkpointing"]
    single = subprocess.run([sys.executable, *common, "--grad-accum", "2", "--out", str(tmp_path / "one")],
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common,
                             "--grad-accum", "1", "--out", str(tmp_path / "two")], capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-2000:]
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(a[key], torch.zeros_like(a[key])))
    assert moved > 0


@pytest.mark.parametrize("case", ["bad_json", "missing_video", "missing_field"])
def test_bad_pairs_are_one_line(tiny_models, pairs_file, tmp_path, case):
    good = open(pairs_file).readline()
    path = tmp_path / "pairs.jsonl"
    if case == "bad_json":
        path.write_text(good.replace('"clip0.mp4"', f'"{pairs_file.parent}/clip0.mp4"') + "{nope\n")
        expect = f"{path}:2: not valid JSON"
    elif case == "missing_video":
        path.write_text(good)
        expect = f"{path}:1: video {tmp_path / 'clip0.mp4'} not found"
    else:
        record = json.loads(good)
        del record["rejected"]
        path.write_text(json.dumps(record) + "\n")
        expect = f"{path}:1: pair needs a non-empty 'rejected'"
    result = subprocess.run([sys.executable, SCRIPT, "--model", tiny_models["qwen2_vl"], "--pairs", str(path),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expect}"), result.stderr[-2000:]


def fused_reference(hidden, weight, labels, upstream):
    """float64 log p(labels) under hidden @ weight.T, and its gradients for hidden and weight."""
    hidden64, weight64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    logits = hidden64 @ weight64.T
    picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(labels != -100, picked, torch.zeros_like(picked))
    picked.backward(upstream.double())
    return picked.detach(), hidden64.grad, weight64.grad


@pytest.mark.parametrize("tokens,width,vocab,dtype", [
    (7, 16, 130, torch.float32),       # fewer tokens than a block, a partial vocabulary block
    (70, 48, 1000, torch.float32),     # several token blocks, width not a multiple of the block
    (33, 64, 515, torch.bfloat16),
])
def test_fused_logprobs_match_float64_and_the_logits_path(tokens, width, vocab, dtype):
    assert tpo._use_triton(torch.empty(1)), "the Triton path must be the one under test"
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, width, generator=generator).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, width, generator=generator) / width ** 0.5 * 4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::5] = -100
    upstream = torch.randn(tokens, generator=generator)
    out = tpo.fused_token_logprobs(hidden, weight, labels)
    out.backward(upstream)
    expected, grad_hidden, grad_weight = fused_reference(hidden, weight, labels, upstream)
    assert out.dtype == torch.float32 and (out[::5] == 0).all() and (hidden.grad[::5] == 0).all()
    exact = dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 if exact else 1e-2)
    torch.testing.assert_close(hidden.grad.double(), grad_hidden, rtol=1e-5 if exact else 2e-2, atol=1e-5 if exact else 1e-2)
    torch.testing.assert_close(weight.grad.double(), grad_weight, rtol=1e-5 if exact else 2e-2, atol=1e-5 if exact else 1e-2)
    hidden.grad = None
    logits_path = tpo.token_logprobs(hidden @ weight.T, labels)
    torch.testing.assert_close(out, logits_path, rtol=1e-5, atol=1e-5 if exact else 6e-2)  # bf16 logits round


def test_fused_logprobs_skip_a_frozen_head_and_match_the_pytorch_path(monkeypatch):
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(300, 32)  # frozen, as the LM head is under QLoRA
    labels = torch.randint(0, 300, (40,))
    labels[3] = -100
    upstream = torch.randn(40)
    triton_out = tpo.fused_token_logprobs(hidden, weight, labels)
    (triton_grad,) = torch.autograd.grad(triton_out, hidden, upstream)
    assert weight.grad is None
    monkeypatch.setattr(tpo, "_use_triton", lambda _: False)
    monkeypatch.setattr(tpo, "_chunk_rows", lambda vocab: 7)  # several chunks
    torch_out = tpo.fused_token_logprobs(hidden, weight, labels)
    (torch_grad,) = torch.autograd.grad(torch_out, hidden, upstream)
    torch.testing.assert_close(torch_out, triton_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch_grad, triton_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", MODELS)
def test_packed_pairs_equal_two_sequences_with_gradients(tiny_models, pairs_file, arch, monkeypatch):
    """[prompt, chosen, rejected] in one row gives the same log-probs, and the same LoRA gradients,
    as chosen and rejected run as two sequences."""
    from peft import LoraConfig, get_peft_model
    # The log-probs' PyTorch path: packing is what is compared here, and the interpreted kernel over a real
    # checkpoint's vocabulary would take most of a minute (the kernel is checked against it above).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, processor = tpo.load_model(tiny_models[arch], four_bit=False, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                             target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)"))
    pairs = tpo.load_pairs(str(pairs_file))[:3]
    pairs[0] = dict(pairs[0], rejected="No.")
    pairs[2] = dict(pairs[2], chosen="The square moves from the left edge to the right edge, slowly and steadily.")
    encoded = [tpo.encode_pair(processor, p, 8) for p in pairs]
    weights = torch.randn(6)
    results = {}
    for shared in (True, False):
        model.zero_grad()
        sums, counts = tpo.rows_logps(model, processor, encoded, torch.device("cpu"), shared_prompt=shared)
        (sums * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[shared] = sums.detach(), counts, grads
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-4)
    assert results[True][1].tolist() == results[False][1].tolist()
    assert len(results[True][2]) > 0
    for name, grad in results[True][2].items():
        torch.testing.assert_close(grad, results[False][2][name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(g.abs().max() > 0 for g in results[True][2].values())


def test_packed_rows_hide_the_chosen_answer_from_the_rejected_one():
    chosen = {"input_ids": [1, 2, 3, 10, 11], "labels": [-100, -100, -100, 10, 11]}
    rejected = {"input_ids": [1, 2, 3, 20], "labels": [-100, -100, -100, 20]}
    positions = torch.arange(5).expand(2, 5)
    ids, mask, pos, (rows, sources, targets, owners) = tpo.packed_pairs([(chosen, rejected)], positions, 0,
                                                                         torch.float32, torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3, 10, 11, 20]] and pos.tolist() == [[0, 1, 2, 3, 4, 3]]
    seen = (mask[0, 0] == 0).int().tolist()
    assert seen[5] == [1, 1, 1, 0, 0, 1]  # the rejected token sees the prompt and itself only
    assert seen[4] == [1, 1, 1, 1, 1, 0] and seen[2] == [1, 1, 1, 0, 0, 0]
    assert sources.tolist() == [2, 3, 2] and targets.tolist() == [10, 11, 20] and owners.tolist() == [0, 0, 1]


def test_importing_does_not_train():
    assert callable(tpo.main) and not hasattr(tpo, "args")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_kernel_at_qwen2_vocabulary(dtype):
    """The compiled kernel (no interpreter) at a real size: 2,048 tokens x 152,064 vocabulary."""
    assert os.environ.get("TRITON_INTERPRET") != "1"
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(2048, 152064, device="cuda", generator=generator) * 4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 152064, (2048,), device="cuda", generator=generator)
    labels[::7] = -100
    upstream = torch.randn(2048, device="cuda", generator=generator)
    out = tpo.token_logprobs(logits, labels)
    out.backward(upstream)
    rows = torch.arange(0, 2048, 97, device="cuda")  # a float64 reference on a sample of rows
    expected, logits64 = reference_logprobs(logits[rows], labels[rows])
    expected.backward(upstream[rows].double())
    torch.testing.assert_close(out[rows].double(), expected, rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 2e-2)
    torch.testing.assert_close(logits.grad[rows].double(), logits64.grad, rtol=1e-2, atol=1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_fused_kernel_at_qwen2_sizes():
    """The compiled fused kernel at hidden 3,584 and vocabulary 152,064 (bf16), against float64 on sampled rows."""
    assert os.environ.get("TRITON_INTERPRET") != "1"
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1024, 3584, device="cuda", generator=generator).bfloat16().requires_grad_(True)
    weight = (torch.randn(152064, 3584, device="cuda", generator=generator) * 3584 ** -0.5).bfloat16()
    labels = torch.randint(0, 152064, (1024,), device="cuda", generator=generator)
    labels[::7] = -100
    upstream = torch.randn(1024, device="cuda", generator=generator)
    out = tpo.fused_token_logprobs(hidden, weight, labels)
    out.backward(upstream)
    rows = torch.arange(0, 1024, 61, device="cuda")
    expected, grad_hidden, _ = fused_reference(hidden[rows], weight, labels[rows], upstream[rows])
    torch.testing.assert_close(out[rows].double(), expected, rtol=1e-3, atol=2e-2)
    torch.testing.assert_close(hidden.grad[rows].double(), grad_hidden, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "t3-adapter"])
def test_the_first_step_starts_at_ln2_without_dropout(tiny_models, pairs_file, tmp_path, with_adapter):
    """Policy and reference are the same model at step 1, so every margin is 0 and the DPO term ln 2,
    also from a T3 adapter trained with lora_dropout 0.05 (the policy runs without dropout, as the
    reference does), in 4-bit."""
    import math
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText
    extra = []
    if with_adapter:
        base = AutoModelForImageTextToText.from_pretrained(tiny_models["qwen2_vl"])
        t3 = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.05, init_lora_weights=False,
                                             target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)$"))
        t3.save_pretrained(tmp_path / "t3")
        extra = ["--adapter", str(tmp_path / "t3")]
    args = tpo.parse_args(["--model", tiny_models["qwen2_vl"], "--pairs", str(pairs_file), "--out", str(tmp_path / "out"),
                           "--max-steps", "1", "--grad-accum", "1", "--batch-size", "2", *extra])
    tpo.train(args)
    first = json.loads(open(tmp_path / "out" / "train_log.jsonl").readline())
    assert first["dpo"] == pytest.approx(math.log(2), abs=1e-6) and first["margin"] == pytest.approx(0.0, abs=1e-6)


def test_sft_term_is_a_token_mean_over_the_micro_batch():
    """TPO normalises the chosen answers' NLL by all their tokens in the micro-batch; per pair is a flag."""
    sums = torch.tensor([-6.0, -1.0, -2.0, -9.0])  # rows [c1, r1, c2, r2]: chosen log-prob sums -6 (3 tokens), -2 (1 token)
    counts = torch.tensor([3, 5, 1, 7])
    assert tpo.chosen_nll(sums, counts).item() == pytest.approx(8 / 4)
    assert tpo.chosen_nll(sums, counts, "pair").tolist() == pytest.approx([2.0, 2.0])
    uneven = torch.tensor([-6.0, 0.0, -4.0, 0.0])
    assert tpo.chosen_nll(uneven, counts).item() == pytest.approx(10 / 4)
    assert tpo.chosen_nll(uneven, counts, "pair").mean().item() == pytest.approx((2 + 4) / 2)


def test_held_out_pairs_show_memorisation_and_revisits_are_warned(tiny_models, tmp_path):
    pairs = make_pairs(tmp_path, count=12)
    result = subprocess.run([sys.executable, SCRIPT, "--model", tiny_models["qwen2_vl"], "--pairs", str(pairs),
                             "--out", str(tmp_path / "out"), "--max-steps", "20", "--grad-accum", "2", "--save-every", "10",
                             "--no-4bit", "--num-frames", "4"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 20 steps of 2 pairs show each of the 11 training pairs 3.6 times; reward accuracy on "
                        "them will reach 1 by memorising (watch val_reward_accuracy on the 1 held-out pairs)"]
    log = [json.loads(line) for line in open(tmp_path / "out" / "train_log.jsonl")]
    evaluated = [e for e in log if "val_reward_accuracy" in e]
    assert [e["step"] for e in evaluated] == [10, 20] and all(e["val_pairs"] == 1 for e in evaluated)
    reference = [json.loads(line)["id"] for line in open(tmp_path / "out" / "reference_logps.rank0.jsonl")]
    assert len(reference) == 12  # the held-out pair has its reference too


def test_under_4bit_bf16_the_fused_head_sees_bf16(tiny_models, pairs_file, monkeypatch):
    """As on a GPU (bf16, 4-bit language model): after preparation the head's weight and the hidden
    states reach fused_token_logprobs in bf16, the dtype with a tensor-core path (peft's preparation
    made both float32, the kernel's slow full-float32 path)."""
    model, processor = tpo.load_model(tiny_models["qwen2_vl"], four_bit=True, device=torch.device("cpu"), dtype=torch.bfloat16)
    args = tpo.parse_args(["--model", "m", "--pairs", str(pairs_file), "--out", "-"])
    model = tpo.prepare_policy(model, args)
    seen, fused = [], tpo.fused_token_logprobs
    monkeypatch.setattr(tpo, "fused_token_logprobs", lambda h, w, t: seen.append((h.dtype, w.dtype)) or fused(h, w, t))
    pair = tpo.load_pairs(str(pairs_file))[0]
    sums, _ = tpo.rows_logps(model, processor, [tpo.encode_pair(processor, pair, 8)], torch.device("cpu"))
    sums.sum().backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] and torch.isfinite(sums).all()
