"""The tiny models load with the plain Auto classes, take a video, generate, and know the task words."""
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from conftest import MODELS, REAL_FOLDERS, TWINS, load_stage

synth = load_stage("01_synthesize.py")


def video_inputs(processor, frames=8, question="Which event happens first in the video?"):
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    video = np.random.default_rng(0).integers(0, 255, (frames, 64, 64, 3), dtype=np.uint8)
    return processor(text=[text], videos=[video], return_tensors="pt")


@pytest.mark.parametrize("arch", MODELS)
def test_loads_runs_video_and_generates(tiny_models, arch):
    processor = AutoProcessor.from_pretrained(tiny_models[arch])
    model = AutoModelForImageTextToText.from_pretrained(tiny_models[arch]).eval()
    if arch in TWINS:  # the twin keeps the real checkpoint's architecture, vocabulary and special ids
        real = AutoConfig.from_pretrained(REAL_FOLDERS[arch.split(":", 1)[1]])
        assert model.config.model_type == real.model_type
        assert model.config.get_text_config().vocab_size == real.get_text_config().vocab_size
        assert model.config.video_token_id == real.video_token_id
    else:
        assert model.config.model_type == arch
    inputs = video_inputs(processor)
    video_token = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    assert (inputs["input_ids"] == video_token).sum() > 1  # the processor expanded the video placeholder
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    new_tokens = generated[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new_tokens) <= 5


@pytest.mark.parametrize("arch", MODELS)
def test_frames_change_the_output(tiny_models, arch):
    """The video really reaches the language model: different frames, different logits."""
    processor = AutoProcessor.from_pretrained(tiny_models[arch])
    model = AutoModelForImageTextToText.from_pretrained(tiny_models[arch]).eval()
    a = video_inputs(processor)
    b = dict(a)
    key = "pixel_values_videos"
    b[key] = a[key].flip(0) if a[key].dim() == 2 else a[key].flip(1)  # Qwen: [patches, dim]; LLaVA: [video, frame, ...]
    with torch.no_grad():
        assert not torch.allclose(model(**a).logits[0, -1], model(**b).logits[0, -1])


def test_tokenizer_covers_task_words(tiny_models):
    processor = AutoProcessor.from_pretrained(tiny_models["qwen2_vl"])
    text = " ".join(synth.builtin_captions(7, 50)) + " Which event happens first in the video? Answer with the option's letter"
    tokens = processor.tokenizer.tokenize(text)
    assert len(tokens) < 1.4 * len(text.split()), "task words should mostly be single tokens"


def test_chat_template_marks_assistant_turn(tiny_models):
    processor = AutoProcessor.from_pretrained(tiny_models["llava_onevision"])
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "B"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n"
