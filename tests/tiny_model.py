"""Write a tiny, randomly initialized video LLM of a real architecture, with its processor.

The folder loads with AutoModelForImageTextToText.from_pretrained and
AutoProcessor.from_pretrained and needs no network: the BPE tokenizer is trained here
with `tokenizers` on text that stage 01 synthesizes, so the words of the temporal tasks
are whole tokens and losses and generations mean something.

With --like DIR it instead writes the tiny twin of a real checkpoint: DIR is the folder of a
real model without its weights (config, tokenizer, chat template and processor files, as users
have after downloading one). The twin keeps DIR's architecture, vocabulary size, special token
ids and vision patch settings, shrinks every width and depth, and carries DIR's own tokenizer,
chat template and processor files unchanged, so the stages see the real tokens and templates.

Usage: python tests/tiny_model.py OUT_DIR [--arch qwen2_vl|llava_onevision] [--hidden 64] [--layers 2]
       python tests/tiny_model.py OUT_DIR --like DIR [--hidden 64] [--layers 2]
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
# SYSTEM is where Qwen-VL's template opens with its default system turn when none is given.
CHAT_TEMPLATE = """SYSTEM{%- for message in messages -%}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}\
{% if part['type'] == 'video' %}VIDEO{% elif part['type'] == 'image' %}IMAGE{% else %}{{ part['text'] }}{% endif %}\
{% endfor %}{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""
QWEN_DEFAULT_SYSTEM = ("{%- if messages[0]['role'] != 'system' -%}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                       "{% endif -%}")
TEMPLATE_PARTS = {
    "qwen2_vl": {"SYSTEM": QWEN_DEFAULT_SYSTEM, "VIDEO": "<|vision_start|><|video_pad|><|vision_end|>",
                 "IMAGE": "<|vision_start|><|image_pad|><|vision_end|>"},
    "llava_onevision": {"SYSTEM": "", "VIDEO": "<video>\n", "IMAGE": "<image>\n"},
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
    # Replies as real vocabularies hold them: a letter, yes and no are single tokens with and
    # without a leading space, so scoring reads one token per reply as it does on a real model.
    corpus += [" ".join(["A", "B", "C", "D", "E", "yes", "no", "Yes", "No"] * 2) + "\nA\nB\nC\nD\nE\nyes\nno\nYes\nNo"] * 300
    return corpus


def train_tokenizer(arch, corpus, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL[arch],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    template = CHAT_TEMPLATE
    for placeholder, text in TEMPLATE_PARTS[arch].items():
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


def build_qwen3_vl(tokenizer, template, hidden, layers, side=64, patch=16, vision_depth=2, vision_width=32,
                   temporal_patch=1):
    """A Qwen3-VL whose every frame is its own temporal unit (temporal patch 1), so that each gets its
    own "<t seconds>" timestamp in the text; images of `side` pixels, and videos kept at their own
    size, in patches of `patch` pixels merged 2 x 2. The released checkpoints merge 2 frames a unit
    (temporal_patch=2) and their video processor keeps transformers' defaults (fps 2, frames sampled)."""
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)
    image_size = {"shortest_edge": side * side, "longest_edge": side * side}
    video_size = {"shortest_edge": (2 * patch) ** 2, "longest_edge": 256 * side * side}  # up to 256 frames unscaled
    patches = dict(patch_size=patch, merge_size=2, temporal_patch_size=temporal_patch)
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=image_size, **patches), tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(size=video_size, cap_pixels_per_frame=True, **patches),
                                 chat_template=template)
    head_dim = hidden // max(2, hidden // 16)
    half = head_dim // 2  # rotary frequencies, interleaved over (time, height, width)
    space = half * 5 // 16
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=text_config(tokenizer, hidden, layers, head_dim=head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * space, space, space],
            "mrope_interleaved": True}),
        vision_config=dict(depth=vision_depth, hidden_size=vision_width, intermediate_size=2 * vision_width,
                           num_heads=max(2, vision_width // 16), patch_size=patch, spatial_merge_size=2, temporal_patch_size=temporal_patch,
                           out_hidden_size=hidden, num_position_embeddings=(side // patch) ** 2,
                           deepstack_visual_indexes=[]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return Qwen3VLForConditionalGeneration(config), processor


def build_llava_onevision(tokenizer, template, hidden, layers, side=32, patch=8):
    """Frames and images of side x side pixels in patch x patch patches (a video frame's are pooled 2 x 2)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)
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

    def write(tmp):
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return write_atomically(out_dir, write)


# Files of a real checkpoint that are not its processor: the twin writes its own config and weights.
NOT_PROCESSOR_FILES = ("config.json", "generation_config.json", "SOURCE.md", "README.md")
NOT_PROCESSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".gguf")


def shrink_text_config(text, hidden, layers):
    """The language model at width `hidden` and depth `layers`, with the same vocabulary, special
    token ids, attention layout (grouped queries, rotary sections in proportion) and layer kinds."""
    heads = max(2, hidden // 16)
    head_dim = hidden // heads
    old_half = (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) // 2
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, 2 * hidden, layers
    text.num_attention_heads, text.num_key_value_heads = heads, max(1, heads // 2)
    if getattr(text, "head_dim", None):
        text.head_dim = head_dim
    if getattr(text, "max_window_layers", None) is not None:
        text.max_window_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:layers]
    ropes = {id(r): r for r in (getattr(text, "rope_parameters", None), getattr(text, "rope_scaling", None))
             if isinstance(r, dict)}  # one dict under two names in some configs: scale it once
    for rope in ropes.values():
        if rope.get("mrope_section"):
            rope["mrope_section"] = scale_sections(rope["mrope_section"], old_half, head_dim // 2)


def scale_sections(sections, old_total, new_total):
    """Rotary sections (time, height, width) rescaled to a new number of frequencies, each kept >= 1."""
    scaled = [max(1, round(s * new_total / old_total)) for s in sections]
    scaled[0] += new_total - sum(scaled)
    return scaled


def shrink_vision_config(vision, out_width):
    """A 2-layer vision tower 32 wide that keeps the patch, merge and image-size settings (so the
    processor's token counts are the real ones) and hands `out_width` features to the LLM."""
    for depth in ("depth", "num_hidden_layers"):
        if hasattr(vision, depth):
            setattr(vision, depth, 2)
    for heads in ("num_heads", "num_attention_heads"):
        if hasattr(vision, heads):
            setattr(vision, heads, 2)
    if hasattr(vision, "out_hidden_size"):  # Qwen2.5-VL, Qwen3-VL: hidden inside, out_hidden to the LLM
        vision.hidden_size, vision.out_hidden_size = 32, out_width
    elif hasattr(vision, "embed_dim"):  # Qwen2-VL: embed_dim inside, hidden_size to the LLM
        vision.embed_dim, vision.hidden_size = 32, out_width
    else:  # SigLIP, CLIP: a projector in the VLM maps to the LLM
        vision.hidden_size = 32
    if hasattr(vision, "intermediate_size"):
        vision.intermediate_size = 64
    if getattr(vision, "fullatt_block_indexes", None):
        vision.fullatt_block_indexes = [1]  # one windowed and one full-attention block, as the real mix
    if getattr(vision, "deepstack_visual_indexes", None):
        vision.deepstack_visual_indexes = [0]


def build_like(out_dir, like_dir, hidden=64, layers=2, seed=0):
    """Write the tiny twin of the real checkpoint folder `like_dir` to out_dir (atomically)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(like_dir)
    if hasattr(config, "quantization_config"):  # a quantized release (AWQ, GPTQ) ships the same processor;
        del config.quantization_config  # the twin is plain
    text = config.get_text_config()
    shrink_text_config(text, hidden, layers)
    if getattr(config, "vision_config", None) is not None:
        shrink_vision_config(config.vision_config, hidden)
    model = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10.0)  # logits of a trained model's range (see build)
    if os.path.exists(os.path.join(like_dir, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(like_dir)
    AutoProcessor.from_pretrained(like_dir)  # fail here, not in a stage, if the processor does not load

    def write(tmp):
        model.save_pretrained(tmp)
        for name in os.listdir(like_dir):
            path = os.path.join(like_dir, name)
            if os.path.isfile(path) and name not in NOT_PROCESSOR_FILES and not name.endswith(NOT_PROCESSOR_SUFFIXES):
                shutil.copyfile(path, os.path.join(tmp, name))
    return write_atomically(out_dir, write)


def write_atomically(out_dir, write):
    """Call write(tmp) on a fresh folder beside out_dir, then move it into place."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tiny-model-")
    try:
        write(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def real_processor_folders():
    """{name: folder} of the real checkpoint folders (without weights) this machine has: the
    subfolders of $REAL_PROCESSORS, else of ../shared/real-processors beside the repository."""
    root = os.environ.get("REAL_PROCESSORS") or os.path.join(os.path.dirname(REPO), "shared", "real-processors")
    if not os.path.isdir(root):
        return {}
    return {name: os.path.join(root, name) for name in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, name, "config.json"))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=ARCHS, default="qwen2_vl")
    p.add_argument("--hidden", type=int, default=64, help="language model width (a multiple of 16)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--like", metavar="DIR", help="a real checkpoint's folder (weights not needed): build its tiny twin, "
                   "with its own tokenizer, chat template and processor (--arch and --vocab-size are then unused)")
    args = p.parse_args()
    if args.like:
        if not os.path.isfile(os.path.join(args.like, "config.json")):
            p.error(f"{args.like}: no config.json; give the folder of a real checkpoint")
        build_like(args.out_dir, args.like, args.hidden, args.layers, args.seed)
        print(f"wrote the tiny twin of {args.like} to {args.out_dir}")
    else:
        build(args.out_dir, args.arch, args.hidden, args.layers, args.vocab_size, args.seed)
        print(f"wrote a tiny {args.arch} model to {args.out_dir}")


if __name__ == "__main__":
    sys.exit(main())
