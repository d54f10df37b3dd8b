"""Write a tiny, randomly initialized video LLM of a real architecture, with its processor.

The folder loads with AutoModelForImageTextToText.from_pretrained and
AutoProcessor.from_pretrained and needs no network: the BPE tokenizer is trained here
with `tokenizers` on text that stage 01 synthesizes, so the words of the temporal tasks
are whole tokens and losses and generations mean something.

Usage: python tests/tiny_model.py OUT_DIR [--arch qwen2_vl|llava_onevision] [--hidden 64] [--layers 2]
"""
import argparse
import importlib.util
import os
import random
import shutil
import sys
import tempfile

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ARCHS = ("qwen2_vl", "llava_onevision")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAME_SIDE = 56  # Qwen2-VL: 56x56 pixels = 2x2 merged tokens per temporal patch

# A ChatML template that accepts {"type": "video"} / {"type": "image"} / {"type": "text"} parts.
CHAT_TEMPLATE = """{%- for message in messages -%}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}\
{% if part['type'] == 'video' %}VIDEO{% elif part['type'] == 'image' %}IMAGE{% else %}{{ part['text'] }}{% endif %}\
{% endfor %}{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""
MEDIA = {
    "qwen2_vl": {"VIDEO": "<|vision_start|><|video_pad|><|vision_end|>", "IMAGE": "<|vision_start|><|image_pad|><|vision_end|>"},
    "llava_onevision": {"VIDEO": "<video>\n", "IMAGE": "<image>\n"},
}
SPECIAL = {
    "qwen2_vl": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava_onevision": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
}


def synthesize_corpus(num_records=1500, seed=0):
    """Text of the kind the pipeline feeds the model: stage 01's prompts and answers, plus chat roles."""
    spec = importlib.util.spec_from_file_location("synthesize", os.path.join(REPO, "01_synthesize.py"))
    synth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synth)
    captions = synth.builtin_captions(seed, 4000)
    pools = {"train": (captions, [c for c in captions if synth.find_attribute(c)])}
    synth._init_worker({"seed": seed, "positions": "relative"}, pools)
    jobs = synth.plan_jobs("train", num_records, synth.TASKS, ["1x", "2x"], seed, mc_fraction=0.5)
    corpus = [synth.make_record(job)[0] for job in jobs]
    corpus += captions
    corpus += ["system user assistant You are a helpful assistant. Describe the video. What happens in this segment? "
               "Which answer is better? Answer yes or no. The question, the caption and the answer."] * 20
    return corpus


def train_tokenizer(arch, corpus, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL[arch],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    template = CHAT_TEMPLATE
    for placeholder, text in MEDIA[arch].items():
        template = template.replace(placeholder, text)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=template)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[arch][1:]})
    return fast, template


def text_config(tokenizer, hidden, layers, **extra):
    heads = max(2, hidden // 16)
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=8192,
                bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **extra)


def build_qwen2_vl(tokenizer, template, hidden, layers):
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)
    size = {"shortest_edge": FRAME_SIDE * FRAME_SIDE, "longest_edge": FRAME_SIDE * FRAME_SIDE}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(size=size), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(size=size, cap_pixels_per_frame=True),
                                 chat_template=template)
    head_dim = hidden // max(2, hidden // 16)
    quarter = head_dim // 2 // 4  # rotary sections (time, height, width) over head_dim / 2 frequencies
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=text_config(tokenizer, hidden, layers, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return Qwen2VLForConditionalGeneration(config), processor


def build_llava_onevision(tokenizer, template, hidden, layers):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)
    side, patch = 32, 8
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    image_processor = LlavaOnevisionImageProcessor(size={"height": side, "width": side}, crop_size={"height": side, "width": side},
                                                   image_grid_pinpoints=pinpoints)
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor(size={"height": side, "width": side}),
                                        num_image_tokens=(side // patch) ** 2, vision_feature_select_strategy="full",
                                        chat_template=template)
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **text_config(tokenizer, hidden, layers)),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=side, patch_size=patch, vision_use_head=False),
        image_token_index=ids("<image>"), video_token_index=ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    return LlavaOnevisionForConditionalGeneration(config), processor


def build(out_dir, arch="qwen2_vl", hidden=64, layers=2, vocab_size=1024, seed=0):
    """Write the model and processor to out_dir (atomically) and return out_dir."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer, template = train_tokenizer(arch, synthesize_corpus(seed=seed), vocab_size)
    builder = build_qwen2_vl if arch == "qwen2_vl" else build_llava_onevision
    model, processor = builder(tokenizer, template, hidden, layers)
    # A trained model's output head spans logits of tens; a random one at std 0.02 behind an
    # RMSNorm spans about one, which keeps the softmax near uniform whatever LoRA learns.
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tiny-model-")
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=ARCHS, default="qwen2_vl")
    p.add_argument("--hidden", type=int, default=64, help="language model width (a multiple of 16)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    build(args.out_dir, args.arch, args.hidden, args.layers, args.vocab_size, args.seed)
    print(f"wrote a tiny {args.arch} model to {args.out_dir}")


if __name__ == "__main__":
    sys.exit(main())
