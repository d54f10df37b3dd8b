"""Stage 03 training throughput: one QLoRA step (4-bit NF4) against the same step unquantized.

Builds a tiny Qwen2-VL (tests/tiny_model.py), synthesizes T3 records, and times
optimizer steps of 03_train_t3.py's own load/encode/collate/LoRA path, with the stage's loss
(AnswerNLL: answer positions through the fused head) and with model(**batch).loss (logits at
every position), the way the stage computed it before. Reports tokens/s
and, on CUDA, peak memory. `--preset qwen2-vl-7b` instead writes a randomly initialized
model with Qwen2-VL-7B's shapes (hidden 3,584, 28 layers, vocabulary 152,064; the tiny
tokenizer's ids all fit in it), so the 4-bit vs bf16 comparison is at real size with no
download; `--layers` cuts the depth (e.g. 1 to try the path on a CPU).

`--param-bytes` (with `--preset`) loads the preset as training does on a GPU (bf16, language model
in 4-bit NF4), prepares it with peft's prepare_model_for_kbit_training (the old way) and with the
stage's prepare_for_lora, and prints parameter bytes by dtype for each; with fewer `--layers` than
the preset's 28 the language-model layers are measured at that depth and scaled to 28.

Usage: python bench/bench_train_t3.py [--steps 20] [--hidden 128] [--layers 4] [--preset qwen2-vl-7b [--param-bytes]]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from stages import load_stage, machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

# Qwen2-VL-7B-Instruct's published config.json, the parts that set the compute.
QWEN2_VL_7B = {
    "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    "vision": dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2),
}


def write_preset_model(tiny_dir, out_dir, layers=None):
    """A random Qwen2-VL with 7B shapes and the tiny model's processor, saved in bf16."""
    from transformers import AutoConfig, AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    tiny = AutoConfig.from_pretrained(tiny_dir)
    text = dict(QWEN2_VL_7B["text"], num_hidden_layers=layers or QWEN2_VL_7B["text"]["num_hidden_layers"],
                bos_token_id=tiny.text_config.bos_token_id, eos_token_id=tiny.text_config.eos_token_id,
                pad_token_id=tiny.text_config.pad_token_id)
    config = Qwen2VLConfig(text_config=text, vision_config=QWEN2_VL_7B["vision"], image_token_id=tiny.image_token_id,
                           video_token_id=tiny.video_token_id, vision_start_token_id=tiny.vision_start_token_id,
                           vision_end_token_id=tiny.vision_end_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return params


def parameter_bytes(t3, model_dir, prepare):
    """{(frozen or trainable, dtype, part): bytes} after loading the model as on a GPU and preparing it
    with `prepare` ("peft" or "stage"), LoRA attached; part is "layers" (the language model's decoder
    layers, which scale with depth) or "rest"."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    model, _ = t3.load_model(model_dir, four_bit=True, device=t3.pick_device(), dtype=torch.bfloat16)
    args = t3.parse_args(["--model", model_dir, "--train", "-", "--out", "-"])
    if prepare == "peft":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model = t3.prepare_for_lora(model, args)
    model = get_peft_model(model, t3.lora_config(args))
    sizes = {}
    for name, param in model.named_parameters():
        key = ("trainable" if param.requires_grad else "frozen", str(param.dtype).replace("torch.", ""),
               "layers" if "language_model.layers." in name else "rest")
        sizes[key] = sizes.get(key, 0) + param.numel() * param.element_size()
    return sizes


def print_parameter_bytes(t3, model_dir, layers, full_layers):
    """One table row per (frozen/trainable, dtype): GiB after peft's preparation and after the stage's."""
    scale = full_layers / layers
    tables = {prepare: parameter_bytes(t3, model_dir, prepare) for prepare in ("peft", "stage")}
    keys = sorted({(kind, dtype) for sizes in tables.values() for kind, dtype, _ in sizes})
    gib = lambda sizes, kind, dtype: sum(v * (scale if part == "layers" else 1) for (k, d, part), v in sizes.items()
                                         if (k, d) == (kind, dtype)) / 2**30
    print(f"| parameters ({full_layers} layers{'' if layers == full_layers else f', scaled from {layers}'}) "
          "| peft prepare_model_for_kbit_training (GiB) | prepare_for_lora (GiB) |")
    print("|---|---|---|")
    for kind, dtype in keys:
        print(f"| {kind} {dtype} | {gib(tables['peft'], kind, dtype):.2f} | {gib(tables['stage'], kind, dtype):.2f} |")
    totals = {p: sum(gib(tables[p], k, d) for k, d in keys) for p in tables}
    print(f"| all | {totals['peft']:.2f} | {totals['stage']:.2f} |")


def time_steps(t3, model_dir, examples, four_bit, steps, batch_size, answer_loss=True):
    device = t3.pick_device()
    args = t3.parse_args(["--model", model_dir, "--train", "-", "--out", "-"] + ([] if four_bit else ["--no-4bit"]))
    model, processor = t3.load_model(model_dir, four_bit, device)
    model = t3.prepare_lora(model, args)
    loss_of = t3.AnswerNLL(model) if answer_loss else (lambda **batch: model(**batch).loss)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for step in range(steps + 2):
        batch = t3.collate(examples[(step * batch_size) % len(examples):][:batch_size], processor.tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        began = time.perf_counter()
        loss_of(**batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # two warm-up steps
            times.append(time.perf_counter() - began)
            tokens += int(batch["attention_mask"].sum())
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return statistics.median(times), tokens / sum(times), peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=None, help="default: 4 for the tiny model, 28 for the preset")
    p.add_argument("--preset", choices=["qwen2-vl-7b"], help="time a random model of this real architecture")
    p.add_argument("--param-bytes", action="store_true", help="with --preset: parameter bytes by dtype, peft's "
                   "preparation against the stage's, instead of timing")
    args = p.parse_args()
    if args.param_bytes and not args.preset:
        p.error("--param-bytes needs --preset")
    import tiny_model
    t3 = load_stage("03_train_t3.py")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model.build(os.path.join(tmp, "model"), hidden=args.hidden, layers=args.layers or 4)
        if args.preset:
            params = write_preset_model(model_dir, os.path.join(tmp, "preset"), args.layers)
            model_dir = os.path.join(tmp, "preset")
            if args.param_bytes:
                full = QWEN2_VL_7B["text"]["num_hidden_layers"]
                print(f"{machine()}; random {args.preset} ({params / 1e9:.2f}B parameters at {args.layers or full} layers), "
                      "bf16 with a 4-bit NF4 language model, LoRA r=16 on its linear layers")
                return print_parameter_bytes(t3, model_dir, args.layers or full, full)
        os.system(f"{sys.executable} {REPO}/01_synthesize.py --out {tmp}/t3 --num-train 256 --num-val 1 --scales 1x 2x >/dev/null 2>&1")
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(model_dir)
        records = t3.load_records(f"{tmp}/t3/t3_train.jsonl")
        examples = [t3.encode(processor, t3.chat_messages(r["conversations"])) for r in records]
        rows = [(f"{name}, {loss}", *time_steps(t3, model_dir, examples, four_bit, args.steps, args.batch_size, fused))
                for name, four_bit in (("unquantized", False), ("4-bit NF4 QLoRA", True))
                for loss, fused in (("model(**batch).loss (baseline)", False), ("AnswerNLL, the stage's loss", True))]
    shape = (f"random {args.preset} ({params / 1e9:.2f}B parameters)" if args.preset else
             f"tiny Qwen2-VL hidden {args.hidden}, {args.layers or 4} layers")
    print(f"{machine()}; {shape}; "
          f"batch {args.batch_size} T3 records (1x/2x)")
    print("| model weights, loss | median step (ms) | tokens/s | ratio | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for name, step, speed, peak in rows:
        print(f"| {name} | {step * 1000:.1f} | {speed:,.0f} | {speed / rows[0][2]:.2f}x | {'-' if peak is None else f'{peak:.0f}'} |")


if __name__ == "__main__":
    main()
