"""The one source of the helper blocks the stage scripts share (run tools/sync_shared.py after editing).

Each stage stays a single self-contained file: tools/sync_shared.py copies into it, at its end,
the definitions below that its own code reaches and nothing else. This file imports like a
module so that linters and tests can read it, but no stage imports it.
"""
import collections
import json
import math
import os
import random
import shutil
import sys
import re
import tempfile
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

try:
    import triton
    import triton.language as tl
except ImportError:  # the chunked PyTorch path still works
    triton = None


# ---- shared: io (user input, JSONL, atomic writes) ----
class InputError(Exception):
    """Bad user input; run_main prints it as one line and exits with status 2."""


def read_jsonl(path):
    """Yield (line_number, record) for every non-blank line; InputError names file and line."""
    check_input_file(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object")
            yield number, record


def read_text(path):
    """A whole text file (UTF-8; a byte-order mark is allowed); InputError names the first line that is not UTF-8."""
    check_input_file(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text") from None


def check_input_file(path):
    """InputError unless `path` is a file this project can read as text (not a folder, gzip or Parquet)."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        raise InputError(f"{path}: gzip-compressed; decompress it first (gunzip -k {path})")
    if magic == b"PAR1":
        raise InputError(f"{path}: a Parquet file; give the JSON or JSONL form of it")
    if b"\x00" in magic:
        raise InputError(f"{path}: not UTF-8 text (NUL bytes: UTF-16 or binary); save it as UTF-8")


def make_out_dir(path):
    """Create the output folder (and its parents); InputError if `path` is an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path}: exists and is not a folder; --out takes a folder")
    os.makedirs(path, exist_ok=True)
    return path


@contextmanager
def atomic_write(path, mode="w"):
    """Write to a temp file beside `path` and rename it into place only on success."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def parse_shard(parser, shard):
    """(i, n) from a --shard value "i/n"; a usage error unless 0 <= i < n."""
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        parser.error(f"--shard must be i/n with 0 <= i < n, not {shard!r}")
    return index, count


def require_positive(parser, args, *names):
    """A usage error for any of these whole-number options that is given and below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, not {value}")


def run_main(main, argv=None):
    """Run main(argv); turn InputError into one line on stderr and exit status 2."""
    try:
        main(argv)
    except InputError as e:
        for bar in list(getattr(tqdm, "_instances", [])):  # end progress bars first: the error is the last line
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
# ---- end shared: io ----


# ---- shared: model (loading a video LLM and its processor, chat encoding) ----
VISION_MODULES = ["model.visual", "model.vision_tower", "model.multi_modal_projector", "lm_head"]
TESTED_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")  # README: "Models"


def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(path, four_bit=True, device=None, dtype=None):
    """(model, processor) for any AutoModelForImageTextToText checkpoint. 4-bit NF4 with double
    quantization on the language model only; bf16 compute on CUDA, float32 on the CPU (or `dtype`)."""
    import logging
    import warnings
    # Library notices a user cannot act on: bitsandbytes' hint to install an optional CPU kernel
    # package, and transformers' renames of gradient_checkpointing_* that peft still calls.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing(_enable)?` is deprecated", FutureWarning)
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
    device = device or pick_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=VISION_MODULES) if four_bit else None
    cached_only = check_model_path(path)
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=cached_only)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, quantization_config=quantization, device_map={"": device}, local_files_only=cached_only)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from None
    check_chat_template(processor, path)
    if hasattr(getattr(processor, "video_processor", None), "cap_pixels_per_frame"):
        processor.video_processor.cap_pixels_per_frame = True  # Qwen-VL: bound a video's pixels as qwen-vl-utils does
    if model.config.model_type not in TESTED_ARCHITECTURES:
        tqdm.write(f"warning: {path}: {model.config.model_type} is not among the architectures the stages are tested "
                   f"on ({', '.join(TESTED_ARCHITECTURES)}); check its prompts and numbers", file=sys.stderr)
    keep_4bit_layout(model)
    return model, processor


def check_adapter_folder(folder):
    """InputError unless `folder` holds a PEFT adapter."""
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise InputError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")


def load_for_inference(path, adapter, four_bit, device):
    """(model in eval mode, processor), with the PEFT adapter in the folder `adapter` applied if given."""
    model, processor = load_model(path, four_bit, device)
    if adapter:
        from peft import PeftModel
        check_adapter_folder(adapter)
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), processor


def check_chat_template(processor, path):
    """InputError unless the processor's chat template renders a user turn holding a video and a
    question: a base (not chat) checkpoint, whose template ignores chat messages, or a processor
    without videos fails here in one line instead of prompting the model with the wrong text."""
    question = "Which event happens first?"
    turn = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    try:
        text = processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    except Exception as e:
        raise InputError(f"{path}: its chat template cannot render a video question ({str(e).splitlines()[0][:150]})") from None
    video_token = getattr(processor, "video_token", None)
    if question not in text or not video_token or video_token not in text:
        raise InputError(f"{path}: its chat template does not render a chat turn with a video ({type(processor).__name__}); "
                         "give an instruction-tuned checkpoint that takes videos")


def check_model_path(path):
    """Fail in seconds, in one line, where transformers would retry the hub for minutes: a local path
    that does not exist, or a hub id with the hub out of reach and no cached copy. Returns whether
    to load from the cache only (a cached hub model while the hub is out of reach)."""
    if os.path.isdir(path) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1 or os.path.exists(path.split("/")[0])
    if os.path.isfile(path):
        raise InputError(f"{path}: a file, not a model folder")
    if looks_local or os.path.exists(path):
        raise InputError(f"{path}: no such model folder")
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    try:
        model_info(path, timeout=10)
        return False
    except GatedRepoError:
        return False  # it exists; transformers says what access it needs
    except RepositoryNotFoundError:
        raise InputError(f"{path}: no such model folder, nor a model on the hub") from None
    except Exception:  # the hub is out of reach
        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return True
        raise InputError(f"{path}: no such model folder, and the hub is out of reach to download it") from None


def check_video_input(processor, frames, path):
    """InputError if the model's video processor refuses these frames (e.g. Qwen-VL's aspect-ratio
    limit of 200:1), so such a video is skipped like one that does not decode, not a crash mid-batch."""
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is None or frames is None:
        return
    try:
        video_processor(videos=[frames], return_tensors="pt", **video_timing([frames]))
    except Exception as e:
        raise InputError(f"{path}: the model's video processor cannot take it ({str(e).splitlines()[0][:150]})") from None


def video_timing(videos):
    """Processor arguments for frames a stage chose: take them all (no resampling of the processor's
    own), and when each was shown, where every video is a Clip that knows (else processors assume
    24 fps: Qwen3-VL would then drop frames and write wrong timestamps)."""
    if not videos:
        return {}
    metadata = [getattr(video, "metadata", None) for video in videos]
    return {"do_sample_frames": False, **({"video_metadata": metadata} if None not in metadata else {})}


def keep_4bit_layout(model):
    """Keep every 4-bit layer in the one weight layout that all CPUs and GPUs share. On CPUs with
    AVX512-BF16, bitsandbytes repacks a layer for bf16 inference the first time it runs in eval
    mode without gradients; a later backward through it fails (so evaluating, then training,
    breaks) and its bf16 products differ from every other machine's."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def chat_messages(conversations, with_video=False):
    """LLaVA turns ({"from": "human"|"gpt", "value"}) as chat-template messages; the video, if
    any, goes before the first user text, and LLaVA's <video>/<image> placeholders are dropped."""
    messages = []
    for turn in conversations:
        role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}[turn["from"]]
        text = turn["value"].replace("<video>", "").replace("<image>", "").strip() if role == "user" else turn["value"]
        parts = [{"type": "text", "text": text}]
        if with_video and role == "user" and not any(m["role"] == "user" for m in messages):
            parts.insert(0, {"type": "video"})
        messages.append({"role": role, "content": parts})
    return messages


def encode(processor, messages, video=None):
    """Token ids, labels (-100 except assistant turns) and the processor's vision tensors.
    Each assistant turn is tokenized apart from its prompt, exactly as generation sees it."""
    tokenizer = processor.tokenizer
    ids, labels, token_extras, extras, rendered = [], [], {}, {}, ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = processor.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = processor.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ValueError("the chat template does not render turns as prefixes of each other")
        prompt_piece, answer_piece = prompt[len(rendered):], full[len(prompt):]
        if not rendered:
            videos = [video] if video is not None else None
            batch = processor(text=[prompt_piece], videos=videos, return_tensors="pt", **video_timing(videos))
            piece = batch.pop("input_ids")[0].tolist()
            batch.pop("attention_mask", None)
            for key, value in batch.items():  # token-aligned (e.g. mm_token_type_ids) or per-video tensors
                (token_extras if value.dim() == 2 and value.shape[1] == len(piece) else extras)[key] = value
            token_extras = {k: v[0].tolist() for k, v in token_extras.items()}
        else:
            piece = tokenizer(prompt_piece, add_special_tokens=False)["input_ids"]
            for values in token_extras.values():
                values += [0] * len(piece)
        answer = tokenizer(answer_piece, add_special_tokens=False)["input_ids"]
        for values in token_extras.values():
            values += [0] * len(answer)
        ids += piece + answer
        labels += [-100] * len(piece) + answer
        rendered = full
    return {"input_ids": ids, "labels": labels, "token_extras": token_extras, "extras": extras}


def collate(examples, pad_id):
    """Right-pad token-aligned fields; concatenate vision tensors in record order."""
    width = max(len(e["input_ids"]) for e in examples)
    pad = lambda seq, value: seq + [value] * (width - len(seq))
    batch = {
        "input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
    }
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([pad(e["labels"], -100) for e in examples])
    for key in {k for e in examples for k in e["token_extras"]}:
        batch[key] = torch.tensor([pad(e["token_extras"].get(key, [0] * len(e["input_ids"])), 0) for e in examples])
    for key in {k for e in examples for k in e["extras"]}:
        batch[key] = torch.cat([e["extras"][key] for e in examples if key in e["extras"]])
    return batch
# ---- end shared: model ----


# ---- shared: frames (video decoding in a restartable subprocess) ----
# Decoding runs in a child process: a decoder that hangs (decord issue #373), crashes or leaks
# (#208) costs one video, never the run, and ffmpeg's per-packet complaints stay out of the console.
DECODE_TIMEOUT = float(os.environ.get("DECODE_TIMEOUT", 300))  # seconds per video before it is given up
DECODER_RESTART_EVERY = 500  # videos per decoding process
_decoder = {"process": None, "conn": None, "served": 0}
decode_warnings = {}  # video path -> what went wrong decoding it (each printed once)


class Clip(np.ndarray):
    """Decoded frames [T, H, W, 3] uint8 that remember when they were shown (`metadata`: the video's
    fps, the frame indices, its frame count), so a processor can tell the model real times:
    Qwen2.5-VL's rotary time ids and Qwen3-VL's timestamps in the text. A slice or copy forgets."""

    def __new__(cls, frames, fps, indices, total):
        clip = np.asarray(frames).view(cls)
        clip.metadata = {"fps": fps, "frames_indices": list(indices), "total_num_frames": total}
        return clip

    def __array_finalize__(self, obj):
        self.metadata = None


def sample_frames(path, num_frames, indices=None):
    """uint8 frames [T, H, W, 3]: `num_frames` spread uniformly over the video, or exactly `indices`."""
    return read_frames(path, num_frames, indices)[0]


def read_frames(path, num_frames=0, indices=None):
    """(frames [T, H, W, 3] uint8, a Clip where the video's fps is known; the frame index each shows).
    A frame that does not decode is replaced by the nearest one that does (a uniform pick is spread
    over the decodable frames instead), with a one-line warning per video; a video with no decodable
    frame, or one that takes over DECODE_TIMEOUT seconds, is an InputError. The same file always
    gives the same frames."""
    frames, shown, note, fps, total = _ask_decoder(path, ("frames", path, num_frames, indices))
    if note and path not in decode_warnings:
        decode_warnings[path] = note
        tqdm.write(f"warning: {path}: {note}", file=sys.stderr)
    return (Clip(frames, fps, shown, total) if fps else frames), shown


def video_length(path):
    """Number of frames of a video whose every frame decodes; InputError naming what is wrong otherwise."""
    return _ask_decoder(path, ("length", path, 0, None))


def uniform_indices(total, count):
    """`count` indices spread evenly over range(total), centred in equal bins."""
    return [min(total - 1, int((i + 0.5) * total / count)) for i in range(count)]


def _ask_decoder(path, request):
    """Send a request to the decoding process (forked on first use, and again after a kill or every
    DECODER_RESTART_EVERY videos) and wait at most DECODE_TIMEOUT seconds for its answer."""
    import multiprocessing
    state = _decoder
    if state["process"] is None or not state["process"].is_alive() or state["served"] >= DECODER_RESTART_EVERY:
        _stop_decoder()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # the child never tokenizes: no fork warning
        context = multiprocessing.get_context("fork")
        state["conn"], child_end = context.Pipe()
        state["process"] = context.Process(target=_decoder_loop, args=(child_end,), daemon=True)
        state["process"].start()
        child_end.close()
        state["served"] = 0
    state["conn"].send(request)
    state["served"] += 1
    if not state["conn"].poll(DECODE_TIMEOUT):
        _stop_decoder()
        raise InputError(f"{path}: decoding took over {DECODE_TIMEOUT:.0f} s (set DECODE_TIMEOUT to wait longer)")
    try:
        status, value = state["conn"].recv()
    except (EOFError, OSError):
        _stop_decoder()
        raise InputError(f"{path}: the video decoder crashed on this file") from None
    if status == "error":
        raise InputError(f"{path}: {value}")
    return value


def _stop_decoder():
    if _decoder["process"] is not None:
        _decoder["process"].kill()
        _decoder["process"].join()
        _decoder["conn"].close()
    _decoder.update(process=None, conn=None)


def _decoder_loop(conn):
    """The decoding process: answers requests until the pipe closes; ffmpeg's stderr goes nowhere."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    while True:
        try:
            kind, path, num_frames, indices = conn.recv()
        except EOFError:
            return
        try:
            result = _decode(path, num_frames, indices) if kind == "frames" else _length(path)
            conn.send(("ok", result))
        except Exception as e:  # any decoder failure is this video's problem, reported in one line
            conn.send(("error", str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__))


def _decode(path, num_frames, indices):
    """(frames, indices shown, note, fps or None, frame count). decord reads exactly the asked frames
    of a healthy video; if it fails in any way, every frame is decoded in order with PyAV
    (deterministic, where decord's read-ahead makes the failures of a damaged file vary from run to run)."""
    pick = (lambda total: list(indices)) if indices is not None else (lambda total: uniform_indices(total, num_frames))
    try:
        import decord
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        wanted = pick(len(reader))
        if wanted and 0 <= min(wanted) and max(wanted) < len(reader):
            return reader.get_batch(wanted).asnumpy(), wanted, None, reader.get_avg_fps() or None, len(reader)
    except Exception:
        pass
    total, decodable = _decodable_frames(path)
    wanted = pick(total)
    if indices is not None and wanted and not 0 <= min(wanted) <= max(wanted) < total:
        raise ValueError(f"frame {max(wanted)} asked for, but the video has {total} frame{'s' * (total != 1)}")
    missing = sorted({i for i in wanted if i not in decodable})
    note = None
    if missing:
        ordered = sorted(decodable)
        if indices is None:
            wanted = [ordered[i] for i in uniform_indices(len(ordered), num_frames)]
            note = f"{len(ordered)} of {total} frames decode; sampling {num_frames} from those"
        else:
            wanted = [i if i in decodable else min(ordered, key=lambda d: (abs(d - i), d)) for i in wanted]
            note = f"{len(ordered)} of {total} frames decode; frames {missing[:8]} replaced by the nearest that decode"
    return _frames_at(path, wanted), wanted, note, _fps(path), total


def _fps(path):
    """The container's frame rate, or None where it does not say (the frames are used either way)."""
    import av
    try:
        with av.open(path) as container:
            rate = container.streams.video[0].average_rate
        return float(rate) if rate else None
    except Exception:
        return None


def _length(path):
    try:
        import decord
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        if len(reader) and reader.get_batch([len(reader) - 1]).shape[0] == 1:
            return len(reader)
    except Exception:
        pass
    total, decodable = _decodable_frames(path)
    if len(decodable) < total:
        raise ValueError(f"only {len(decodable)} of its {total} frames decode")
    return total


def _decodable_frames(path):
    """(frames the container lists, {index: pts} of those that decode)."""
    listed, decoded, _ = _walk_frames(path, set())
    total = max(listed["count"], len(listed["pts"]))
    index_of = {pts: i for i, pts in enumerate(sorted(listed["pts"]))}
    decodable = {index_of[pts]: pts for pts in decoded if pts in index_of}
    if not decodable:
        raise ValueError("no decodable frames")
    return total, decodable


def _frames_at(path, wanted):
    """The frames at container indices `wanted` (all decodable), in that order."""
    _, decodable = _decodable_frames(path)
    _, _, kept = _walk_frames(path, {decodable[i] for i in wanted})
    return np.stack([kept[decodable[i]] for i in wanted])


def _walk_frames(path, keep):
    """Decode every frame in order with PyAV, going on past errors: ({"pts": listed packet times,
    "count": the container's frame count}, decoded frame times, {time: RGB frame} for times in `keep`)."""
    import av
    listed, decoded, kept = {"pts": [], "count": 0}, set(), {}
    if not os.path.isfile(path):
        raise ValueError("is a directory, not a video" if os.path.isdir(path) else "no such file")
    if os.path.getsize(path) == 0:
        raise ValueError("cannot open video (an empty file)")
    try:
        container = av.open(path)
    except Exception as e:
        raise ValueError(f"cannot open video ({getattr(e, 'strerror', None) or str(e).splitlines()[0][:120]})") from None
    with container:
        if not container.streams.video:
            raise ValueError("cannot open video (no video stream)")
        stream = container.streams.video[0]
        listed["count"] = stream.frames
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except Exception:  # StopIteration, or a container cut short
                break
            if packet.pts is not None:
                listed["pts"].append(packet.pts)
            try:
                for frame in packet.decode():
                    decoded.add(frame.pts)
                    if frame.pts in keep and frame.pts not in kept:
                        kept[frame.pts] = frame.to_ndarray(format="rgb24")
            except Exception:  # a damaged packet: its frames are lost, the rest go on
                continue
    return listed, decoded, kept
# ---- end shared: frames ----


# ---- shared: logs (JSONL logs that survive a crash) ----
def read_log(path):
    """Records of an append-only JSONL log; a torn last line (a kill mid-write) is ignored."""
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records


def write_jsonl(path, records):
    """Replace `path` with these records, atomically."""
    with atomic_write(path) as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def append_jsonl(path, records):
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
# ---- end shared: logs ----


# ---- shared: chat (batched chat prompts) ----
def chat_inputs(processor, requests, device):
    """Left-padded model inputs for requests [(frames or None, text)], ready for the reply.
    A batch must be all video or all text (processors pair videos with placeholders in order)."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": ([{"type": "video"}] if frames is not None else []) + [{"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False) for frames, text in requests]
    videos = [frames for frames, _ in requests if frames is not None] or None
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, videos=videos, padding=True, return_tensors="pt", **video_timing(videos)).to(device)
# ---- end shared: chat ----


# ---- shared: choice (multiple-choice prompts, scoring and answer parsing) ----
LETTERS = "ABCDEFGHIJ"
YES_NO = ("yes", "no")
# Words after which "A" (or "I") is still a letter, not the article (or the pronoun): "A or B", "A is right".
LETTER_FOLLOWERS = {"or", "and", "nor", "is", "was", "seems", "appears", "fits", "matches", "because", "since", "but",
                    "as", "vs", "versus", "best", "correctly", "then"}
# "The answer is b", "Option (C)", "I would choose B": a letter given as the answer.
STATED_ANSWER = (r"(?i:answer|option|choice|choose|pick|select|go with)(?:\s+(?i:is|would be|should be|will be))?"
                 r"\s*[:=]?\s*[\[(]?([A-Ja-j])(?=[\]).,:;!?]|\s*$|\s)")
YES_WORDS = {"yes", "yeah", "yep", "yup", "true"}
NO_WORDS = {"no", "nope", "nah", "false"}


def is_yes_no(options):
    return tuple(o.strip().lower() for o in options) == YES_NO


def choice_prompt(question, options):
    """The question with lettered options and the instruction lmms-eval uses (or a yes/no one)."""
    if is_yes_no(options):
        return f"{question}\nPlease answer yes or no."
    lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join([question, *lines, "Answer with the option's letter from the given choices directly."])


def reply_token_ids(tokenizer, options, labels=LETTERS):
    """Per option, the first token of each reply that picks it: its label (a letter), or yes/no in either case."""
    replies = [(w, w.capitalize()) for w in YES_NO] if is_yes_no(options) else [(L,) for L in labels[:len(options)]]
    return [sorted({tokenizer(r, add_special_tokens=False)["input_ids"][0] for r in variants}) for variants in replies]



@torch.no_grad()
def choice_logprobs(model, processor, requests, options, device, labels=None):
    """Per request, the log-probability of each option's reply as the first answer token (`labels`:
    per request, the options' labels when they are not A, B, C ...)."""
    inputs = chat_inputs(processor, requests, device)
    last = torch.log_softmax(model(**inputs, logits_to_keep=1).logits[:, -1].float(), -1)
    return [[round(float(torch.logsumexp(row[ids], 0)), 5) for ids in reply_token_ids(processor.tokenizer, opts, marks)]
            for row, opts, marks in zip(last, options, labels or [LETTERS] * len(options))]


def calibrated_choices(score_lists):
    """Batch calibration (Zhou et al., ICLR 2024): the option each item's scores (choice_logprobs; all
    items with the same number of options) pick once the model's prior over the option letters is
    divided out, that prior being its mean probability for each letter over these items. No answer is
    used: a model that tells the options apart keeps its picks, one that favours a letter is left with
    what it tells apart."""
    probabilities = [torch.softmax(torch.tensor(scores, dtype=torch.float64), 0) for scores in score_lists]
    prior = torch.stack(probabilities).mean(0)
    return [int(torch.argmax(p / prior)) for p in probabilities]


@torch.no_grad()
def choice_generate(model, processor, requests, device, max_new_tokens=32):
    """Greedy replies to requests [(frames or None, text)]."""
    inputs = chat_inputs(processor, requests, device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip()
            for row in output[:, inputs["input_ids"].shape[1]:]]


def extract_choice(reply, options):
    """Index of the option a free-form reply picks, or None when it picks none or several.
    Multiple choice: the letters the reply states as its answer ("B", "(c)", "b)", "The answer is b",
    "Option B"); else the letters it mentions ("... so (B) fits"), never the article "A"; else the one
    option whose whole text it quotes. Two or more different letters, or options, and no single one
    stated: None. Yes/no: the reply's first word, or a yes/no after a comma ("Based on the video, yes.")."""
    text = re.sub(r"[*_`#]+", "", reply).strip(" \t\n'\"“”‘’")
    if is_yes_no(options):
        return yes_no_choice(text.lower())
    valid = LETTERS[:len(options)]
    for letters in (stated_letters(text), mentioned_letters(text)):
        if letters:
            if len(letters) > 1 or not letters <= set(valid):
                return None
            chosen = valid.index(letters.pop())
            quoted = re.match(rf"\W*{valid[chosen]}[.):]\s*(.+?)[.!]?\s*(?:\n|$)", text)  # "B. <text of option A>"
            others = [o.strip().lower() for i, o in enumerate(options) if i != chosen]
            return None if quoted and quoted[1].strip().lower() in others else chosen
    named = [i for i, o in enumerate(options) if o.strip() and re.search(
        rf"(?<!\w){re.escape(o.strip().rstrip('.'))}(?!\w)", text, re.I)]
    named = [i for i in named if not any(j != i and options[i].strip().lower() in options[j].lower() for j in named)]
    return named[0] if len(named) == 1 else None


def is_letter_at(text, end):
    """Whether the single capital letter just before `end` names an option: "A" and "I" followed by
    another word are the article and the pronoun, unless the word joins options ("A or B")."""
    letter, word = text[end - 1], re.match(r"[ \t]+([A-Za-z]+)", text[end:])
    return not (letter in "AIai" and word and word[1].lower() not in LETTER_FOLLOWERS)


def stated_letters(text):
    """Upper-case letters of the options a reply states as its answer."""
    found = set()
    opening = re.match(r"[\[(]?([A-J])(?:[\]).:,;\-]|\s*$|\s*\n|(?=[ \t]))", text)
    if opening and is_letter_at(text, opening.end(1)) and not re.match(r"\W*(?:and|or|nor|vs)\b|\s*/", text[opening.end():]):
        found.add(opening[1])
    lower = re.fullmatch(r"[\[(]?([a-j])(?:[\]).:,]\s*.*|)", text, re.S)  # "b", "(c)", "c) the dog runs"
    if lower and (lower[1] != "a" or len(text) <= 3 or text[1] in ").:,]"):
        found.add(lower[1].upper())
    for m in re.finditer(STATED_ANSWER, text):
        if is_letter_at(text, m.end(1)):
            found.add(m[1].upper())
    return found


def mentioned_letters(text):
    """Upper-case letters a reply mentions as options: "(B)", "[c]", "B." or a standalone "B"."""
    found = {m[1].upper() for m in re.finditer(r"[\[(]([A-Ja-j])[\])]", text)}
    for m in re.finditer(r"(?<![\w'’-])([A-J])(?![\w'’-])", text):
        if is_letter_at(text, m.end(1)):
            found.add(m[1])
    return found


def yes_no_choice(text):
    """0 (yes), 1 (no) or None, from a lower-cased reply."""
    if re.search(r"\b(?:yes|no)\b\W*(?:and|or)\W*\b(?:yes|no)\b", text):
        return None
    first = re.match(r"\W*([a-z]+)(?:\W+([a-z]+))?", text)
    if first and first[1] in YES_WORDS:
        return 0
    if first and (first[1] in NO_WORDS or first[1] == "not" and first[2] in ("really", "at", "quite", "exactly")):
        return 1
    stated = {m[1] in NO_WORDS for m in re.finditer(r"(?:answer is|answer:|[,.;:!?]\s*)\W*(yes|no)\b", text)}
    return int(stated.pop()) if len(stated) == 1 else None
# ---- end shared: choice ----


# ---- shared: stats (Wilson intervals) ----
def wilson_interval(correct, total, z=1.96):
    """95% Wilson score interval of a proportion (sound for small n and for 0 or n successes)."""
    if total == 0:
        return [0.0, 1.0]
    p, spread = correct / total, z * z / total
    centre = (p + spread / 2) / (1 + spread)
    half = z * math.sqrt(p * (1 - p) / total + spread / (4 * total)) / (1 + spread)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]
# ---- end shared: stats ----


# ---- shared: training (QLoRA setup, schedule, checkpoints, runs) ----
def prepare_for_lora(model, args):
    """Freeze everything, cast nothing. Frozen bf16 weights stay bf16 (peft's prepare_model_for_kbit_training
    makes every weight that is not 4-bit float32: for a 7B video LLM's vision tower, embeddings and head,
    7 GB instead of 3.5 GB, none of it trained); LoRA's weights are float32, as peft makes them. With
    gradient checkpointing the embeddings' output requires grad (reentrant checkpointing needs an input
    that does), and only the language model is checkpointed: the frozen vision tower keeps no
    activations for backward, so recomputing it would be waste."""
    for param in model.parameters():
        param.requires_grad_(False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    for name, module in model.named_modules():
        if name.startswith(tuple(VISION_MODULES)) and getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False
    return model


def lora_config(args):
    """LoRA on the language model's linear layers named in --lora-targets, nowhere else."""
    from peft import LoraConfig
    names = "|".join(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=getattr(args, "lora_dropout", 0.0),
                      target_modules=rf".*language_model.*\.({names})$", task_type="CAUSAL_LM")


def save_adapter(model, out_dir):
    """peft's own adapter files, written to a temp folder and renamed into place."""
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    tmp = tempfile.mkdtemp(dir=parent, prefix=".adapter-")
    model.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def save_checkpoint(path, model, optimizer, scheduler, step):
    """Write `path`.tmp in full (trainer_state.pt last: it marks a complete checkpoint), then swap it
    in through `path`.old, so a kill at any instant leaves one complete checkpoint to resume from."""
    tmp, old = path + ".tmp", path + ".old"
    discard_checkpoint(tmp)
    model.save_pretrained(tmp)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(state, os.path.join(tmp, "trainer_state.pt.part"))
    os.replace(os.path.join(tmp, "trainer_state.pt.part"), os.path.join(tmp, "trainer_state.pt"))
    if os.path.isdir(path):
        discard_checkpoint(old)
        os.replace(path, old)
    os.replace(tmp, path)
    discard_checkpoint(old)


def discard_checkpoint(folder):
    """Remove a checkpoint folder, its completeness mark first: a kill half-way leaves no folder
    that looks complete."""
    if os.path.isfile(os.path.join(folder, "trainer_state.pt")):
        os.remove(os.path.join(folder, "trainer_state.pt"))
    shutil.rmtree(folder, ignore_errors=True)


def complete_checkpoint(path):
    """The folder of the checkpoint to resume: `path`, else a complete `path`.tmp or `path`.old
    (a kill during save_checkpoint), else None."""
    for folder in (path, path + ".tmp", path + ".old"):
        if os.path.isfile(os.path.join(folder, "trainer_state.pt")):
            return folder
    return None


def load_checkpoint(path, model, optimizer, scheduler):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    folder = complete_checkpoint(path)
    if folder is None:
        raise InputError(f"{path}: no checkpoint to resume from")
    set_peft_model_state_dict(model, load_file(os.path.join(folder, "adapter_model.safetensors")))
    state = torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def check_run_folder(out, resume):
    """Before any loading: --out must be a folder; --resume needs a checkpoint in it, and a new run
    must not silently overwrite an earlier run's checkpoint and log."""
    make_out_dir(out)
    found = complete_checkpoint(os.path.join(out, "checkpoint"))
    if resume and found is None:
        raise InputError(f"{out}/checkpoint: nothing to resume (no checkpoint saved yet); run without --resume to start")
    if not resume and found is not None:
        raise InputError(f"{out}: already holds a training checkpoint; pass --resume to continue, or choose another --out")


@contextmanager
def train_log(path, resume_step, enabled=True):
    """A function that appends an entry to the JSONL training log and flushes it (one that does nothing
    when not `enabled`, on the other ranks). On resume the log is first cut back to the checkpoint's
    step, since the steps after it are trained again: every step is logged once."""
    if not enabled:
        yield lambda entry: None
        return
    records = [r for r in read_log(path) if r.get("step", 0) <= resume_step] if resume_step is not None else []
    write_jsonl(path, records)
    with open(path, "a", encoding="utf-8") as f:
        def record(entry):
            f.write(json.dumps(entry) + "\n")
            f.flush()
        yield record


def step_batches(epoch_batches, step, stop_at, steps_per_epoch, micro_per_step, rank=0, world=1):
    """This rank's micro-batches for each optimizer step after `step` up to `stop_at`, epoch after
    epoch; epoch_batches(epoch) orders one epoch. A resumed run goes on mid-epoch where it stopped."""
    while step < stop_at:
        epoch, offset = divmod(step * micro_per_step, steps_per_epoch * micro_per_step)
        batches = epoch_batches(epoch)[:steps_per_epoch * micro_per_step]
        for start in range(offset, len(batches), micro_per_step):
            if step >= stop_at:
                return
            yield batches[start + rank:start + micro_per_step:world]
            step += 1


def optimizer_update(optimizer, scheduler, trainable, max_grad_norm):
    """Clip the gradients, step the optimizer and the schedule, clear the gradients; the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def distributed_setup():
    """(rank, world size); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", 0)), world


Run = collections.namedtuple("Run", "rank world device")


def start_run(seed):
    """Run(rank, world size, device), seeded, in the process group under torchrun."""
    rank, world = distributed_setup()
    random.seed(seed)
    torch.manual_seed(seed)
    device = pick_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Run(rank, world, device)


def end_run():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def optimizer_and_schedule(model, args, total_steps):
    """AdamW over the trainable (LoRA) parameters and transformers' cosine schedule with linear warmup
    (as the Trainer's: the first step at learning rate 0, the peak at step `warmup`, then down to 0 at the end)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    from transformers import get_cosine_schedule_with_warmup
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, int(args.warmup_ratio * total_steps)), total_steps)
    return trainable, optimizer, scheduler

# ---- end shared: training ----


# ---- shared: logprobs (per-token log-probs in Triton, fused with the LM head) ----
def _use_triton(logits):
    return triton is not None and (logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    @triton.jit
    def _logprob_forward_kernel(logits_ptr, labels_ptr, logprob_ptr, lse_ptr, vocab, row_stride, ignore_index,
                                BLOCK: tl.constexpr):
        """One row: online logsumexp over vocabulary blocks, target logit picked up in the same pass."""
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row)
        row_ptr = logits_ptr + row * row_stride
        running_max = float("-inf")
        running_sum = 0.0
        target = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, 0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            running_max = new_max
            target += tl.sum(tl.where(cols == label, x, 0.0), 0)
        lse = running_max + tl.log(running_sum)
        tl.store(lse_ptr + row, lse)
        tl.store(logprob_ptr + row, tl.where(label != ignore_index, target - lse, 0.0))

    @triton.jit
    def _logprob_backward_kernel(logits_ptr, labels_ptr, lse_ptr, grad_out_ptr, grad_logits_ptr, vocab, row_stride,
                                 grad_row_stride, ignore_index, BLOCK: tl.constexpr):
        """d log p(label) / d logits = one_hot(label) - softmax, scaled by the row's upstream gradient."""
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(labels_ptr + row)
        lse = tl.load(lse_ptr + row)
        scale = tl.where(label != ignore_index, tl.load(grad_out_ptr + row).to(tl.float32), 0.0)
        row_ptr = logits_ptr + row * row_stride
        grad_ptr = grad_logits_ptr + row * grad_row_stride
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < vocab
            x = tl.load(row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            grad = scale * (tl.where(cols == label, 1.0, 0.0) - tl.exp(x - lse))
            tl.store(grad_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=inside)


def _block_size(vocab):
    return min(triton.next_power_of_2(vocab), 4096 if os.environ.get("TRITON_INTERPRET") != "1" else 1 << 15)


def _chunk_rows(vocab):
    """Rows per chunk of the PyTorch paths: about 64 MiB of float32 logits at a time."""
    return max(1, (64 << 20) // (4 * vocab))


def _logprob_forward(logits, labels, ignore_index):
    rows, vocab = logits.shape
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return logprobs, lse
    if _use_triton(logits):
        _logprob_forward_kernel[(rows,)](logits, labels, logprobs, lse, vocab, logits.stride(0), ignore_index,
                                         BLOCK=_block_size(vocab))
        return logprobs, lse
    step = _chunk_rows(vocab)
    for start in range(0, rows, step):  # PyTorch: float32 copies of one chunk at a time
        end = min(rows, start + step)
        chunk, chunk_labels = logits[start:end].float(), labels[start:end]
        lse[start:end] = torch.logsumexp(chunk, -1)
        target = chunk.gather(1, chunk_labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        logprobs[start:end] = torch.where(chunk_labels != ignore_index, target - lse[start:end], 0.0)
    return logprobs, lse


def _logprob_backward(logits, labels, lse, grad_out, ignore_index):
    rows, vocab = logits.shape
    grad_logits = torch.empty_like(logits)
    if rows == 0:
        return grad_logits
    if _use_triton(logits):
        _logprob_backward_kernel[(rows,)](logits, labels, lse, grad_out.contiguous(), grad_logits, vocab, logits.stride(0),
                                          grad_logits.stride(0), ignore_index, BLOCK=_block_size(vocab))
        return grad_logits
    step = _chunk_rows(vocab)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        scale = torch.where(labels[start:end] != ignore_index, grad_out[start:end].float(), 0.0)
        grad = logits[start:end].float().sub_(lse[start:end, None]).exp_().mul_(-scale[:, None])  # -g * softmax
        grad.scatter_add_(1, labels[start:end].clamp(min=0).unsqueeze(1), scale.unsqueeze(1))    # + g * one_hot
        grad_logits[start:end] = grad
    return grad_logits


class TokenLogprobs(torch.autograd.Function):
    """log p(label) per row of a [rows, vocab] logits matrix, with its exact gradient."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index):
        logprobs, lse = _logprob_forward(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index = ignore_index
        return logprobs

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        return _logprob_backward(logits, labels, lse, grad_out, ctx.ignore_index), None, None


def token_logprobs(logits, labels, ignore_index=-100):
    """float32 log p(labels) of shape labels.shape; exactly 0 where labels == ignore_index.
    Triton kernel on CUDA (or under TRITON_INTERPRET=1), chunked PyTorch otherwise."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if flat_logits.stride(-1) != 1:
        flat_logits = flat_logits.contiguous()
    flat_labels = labels.reshape(-1).to(device=logits.device, dtype=torch.int64).contiguous()
    check_labels(flat_labels, flat_logits.shape[-1], ignore_index)
    return TokenLogprobs.apply(flat_logits, flat_labels, ignore_index).reshape(labels.shape)


def check_labels(labels, vocab, ignore_index):
    """The kernels index the logits (or the head's weight) by label: one outside [0, vocab) would read
    other memory, so it is an error (one reduction per call)."""
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(outside.any()):
        raise ValueError(f"label {int(labels[outside][0])} is outside the vocabulary [0, {vocab}) "
                         f"and is not the ignore index {ignore_index}")


# ---------------------------------------------------------------- log-probs straight from hidden states
# fused_token_logprobs(hidden, weight, labels) = token_logprobs(hidden @ weight.T, labels), without
# ever holding the [tokens, vocabulary] logits: each program multiplies a block of tokens by a
# block of the vocabulary, folds it into a running logsumexp and drops it; the backward pass
# recomputes the blocks. Under QLoRA the LM head is frozen, so its gradient is skipped.

if triton is not None:
    @triton.jit
    def _logit_block(h_ptr, w_ptr, rows, cols, n_rows, vocab, width, h_stride, w_stride,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr):
        """logits[rows, cols] = hidden[rows] @ weight[cols].T, accumulated in float32."""
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for start in range(0, width, BLOCK_H):
            k = start + tl.arange(0, BLOCK_H)
            h = tl.load(h_ptr + rows[:, None] * h_stride + k[None, :], mask=(rows[:, None] < n_rows) & (k[None, :] < width), other=0.0)
            w = tl.load(w_ptr + cols[None, :] * w_stride + k[:, None], mask=(cols[None, :] < vocab) & (k[:, None] < width), other=0.0)
            if UPCAST:  # the interpreter multiplies bfloat16 wrongly
                h, w = h.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _fused_forward_kernel(h_ptr, w_ptr, labels_ptr, target_ptr, lse_ptr, n_rows, vocab, width, h_stride, w_stride,
                              split_size, ignore_index, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                              BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """A block of tokens x one split of the vocabulary: online logsumexp over the split's blocks
        (the splits' results are combined afterwards); the first split also writes the target logit,
        an indexed dot of each hidden state with its label's weight row."""
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        split = tl.program_id(1)
        inside = rows < n_rows
        labels = tl.load(labels_ptr + rows, mask=inside, other=ignore_index)
        running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(split * split_size, tl.minimum(vocab, (split + 1) * split_size), BLOCK_V):
            cols = (start + tl.arange(0, BLOCK_V)).to(tl.int64)
            logits = _logit_block(h_ptr, w_ptr, rows, cols, n_rows, vocab, width, h_stride, w_stride,
                                  BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
            logits = tl.where(cols[None, :] < vocab, logits, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(logits, 1))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
            running_max = new_max
        tl.store(lse_ptr + split * n_rows + rows, running_max + tl.log(running_sum), mask=inside)
        if split == 0:
            target_rows = tl.where(labels == ignore_index, 0, labels).to(tl.int64)
            target = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, width, BLOCK_H):
                k = start + tl.arange(0, BLOCK_H)
                both = inside[:, None] & (k[None, :] < width)
                h = tl.load(h_ptr + rows[:, None] * h_stride + k[None, :], mask=both, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + target_rows[:, None] * w_stride + k[None, :], mask=both, other=0.0).to(tl.float32)
                target += tl.sum(h * w, 1)
            tl.store(target_ptr + rows, target, mask=inside)

    @triton.jit
    def _fused_backward_kernel(h_ptr, w_ptr, labels_ptr, lse_ptr, grad_out_ptr, grad_h_ptr, grad_w_ptr, n_rows, vocab,
                               width, h_stride, w_stride, ignore_index, WEIGHT_GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
                               UPCAST: tl.constexpr):
        """One (token block, vocabulary block): recompute the logits, form g * (one_hot - softmax), and add
        its products with the weight (and, if asked, with the hidden states) into float32 gradients."""
        rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        inside = rows < n_rows
        labels = tl.load(labels_ptr + rows, mask=inside, other=ignore_index)
        lse = tl.load(lse_ptr + rows, mask=inside, other=0.0)
        scale = tl.where(labels != ignore_index, tl.load(grad_out_ptr + rows, mask=inside, other=0.0), 0.0)
        logits = _logit_block(h_ptr, w_ptr, rows, cols, n_rows, vocab, width, h_stride, w_stride,
                              BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST)
        one_hot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
        grad = scale[:, None] * (one_hot - tl.exp(logits - lse[:, None]))
        grad = tl.where(cols[None, :] < vocab, grad, 0.0)
        grad = grad if UPCAST else grad.to(h_ptr.dtype.element_ty)
        for start in range(0, width, BLOCK_H):
            k = start + tl.arange(0, BLOCK_H)
            w = tl.load(w_ptr + cols[:, None] * w_stride + k[None, :], mask=(cols[:, None] < vocab) & (k[None, :] < width), other=0.0)
            w = w.to(tl.float32) if UPCAST else w
            tl.atomic_add(grad_h_ptr + rows[:, None] * width + k[None, :], tl.dot(grad, w, input_precision=PRECISION),
                          mask=inside[:, None] & (k[None, :] < width))
            if WEIGHT_GRAD:
                h = tl.load(h_ptr + rows[:, None] * h_stride + k[None, :], mask=inside[:, None] & (k[None, :] < width), other=0.0)
                h = h.to(tl.float32) if UPCAST else h
                tl.atomic_add(grad_w_ptr + cols[:, None] * width + k[None, :], tl.dot(tl.trans(grad), h, input_precision=PRECISION),
                              mask=(cols[:, None] < vocab) & (k[None, :] < width))


def _fused_blocks(hidden):
    """Block sizes, the dot precision (float32 inputs multiply in full float32) and whether to
    upcast half-precision tiles (the interpreter only)."""
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and hidden.dtype != torch.float32
    return dict(BLOCK_N=32, BLOCK_V=128, BLOCK_H=64, PRECISION=precision, UPCAST=upcast)


def _vocab_splits(token_blocks, vocab, block_v, device):
    """Vocabulary columns per split, so that token blocks x splits fill the GPU (twice its SMs)
    even when there are few tokens."""
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    splits = max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(2 * processors, token_blocks)))
    return triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v


def _fused_forward(hidden, weight, labels, ignore_index):
    rows, width = hidden.shape
    vocab = weight.shape[0]
    if rows == 0:
        return torch.zeros(0, device=hidden.device), torch.zeros(0, device=hidden.device)
    if _use_triton(hidden):
        blocks = _fused_blocks(hidden)
        token_blocks = triton.cdiv(rows, blocks["BLOCK_N"])
        split_size = _vocab_splits(token_blocks, vocab, blocks["BLOCK_V"], hidden.device)
        splits = triton.cdiv(vocab, split_size)
        target = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        partial = torch.empty(splits, rows, dtype=torch.float32, device=hidden.device)
        _fused_forward_kernel[(token_blocks, splits)](
            hidden, weight, labels, target, partial, rows, vocab, width, hidden.stride(0), weight.stride(0), split_size,
            ignore_index, **blocks)
        lse = torch.logsumexp(partial, 0)
        return torch.where(labels != ignore_index, target - lse, 0.0), lse
    logprobs = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    step = _chunk_rows(vocab)
    for start in range(0, rows, step):  # PyTorch: one chunk of logits at a time, never all of them
        end = min(rows, start + step)
        logprobs[start:end], lse[start:end] = _logprob_forward(hidden[start:end] @ weight.T, labels[start:end], ignore_index)
    return logprobs, lse


def _fused_backward(hidden, weight, labels, lse, grad_out, ignore_index, weight_grad):
    rows, width = hidden.shape
    vocab = weight.shape[0]
    grad_hidden = torch.zeros(rows, width, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(vocab, width, dtype=torch.float32, device=hidden.device) if weight_grad else None
    if rows == 0:
        return grad_hidden.to(hidden.dtype), grad_weight
    grad_out = grad_out.float().contiguous()
    if _use_triton(hidden):
        blocks = _fused_blocks(hidden)
        _fused_backward_kernel[(triton.cdiv(rows, blocks["BLOCK_N"]), triton.cdiv(vocab, blocks["BLOCK_V"]))](
            hidden, weight, labels, lse, grad_out, grad_hidden, grad_hidden if grad_weight is None else grad_weight,
            rows, vocab, width, hidden.stride(0), weight.stride(0), ignore_index, WEIGHT_GRAD=weight_grad, **blocks)
    else:
        step = _chunk_rows(vocab)
        for start in range(0, rows, step):
            end = min(rows, start + step)
            logits = hidden[start:end] @ weight.T
            grad_logits = _logprob_backward(logits, labels[start:end], lse[start:end], grad_out[start:end], ignore_index)
            grad_hidden[start:end] = (grad_logits @ weight).float()
            if weight_grad:
                grad_weight += (grad_logits.T @ hidden[start:end]).float()
    return grad_hidden.to(hidden.dtype), None if grad_weight is None else grad_weight.to(weight.dtype)


class FusedTokenLogprobs(torch.autograd.Function):
    """log p(label) per row of hidden @ weight.T, with gradients for hidden (and weight if it needs one)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index):
        logprobs, lse = _fused_forward(hidden, weight, labels, ignore_index)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index = ignore_index
        return logprobs

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad_hidden, grad_weight = _fused_backward(hidden, weight, labels, lse, grad_out, ctx.ignore_index,
                                                   ctx.needs_input_grad[1])
        return grad_hidden, grad_weight, None, None


def fused_token_logprobs(hidden, weight, labels, ignore_index=-100):
    """float32 log p(labels) under logits hidden @ weight.T, of shape labels.shape, without holding
    the logits; exactly 0 where labels == ignore_index. Triton on CUDA (or under
    TRITON_INTERPRET=1), chunked PyTorch otherwise."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_hidden = flat_hidden if flat_hidden.stride(-1) == 1 else flat_hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    flat_labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.int64).contiguous()
    check_labels(flat_labels, weight.shape[0], ignore_index)
    return FusedTokenLogprobs.apply(flat_hidden, weight.to(flat_hidden.dtype), flat_labels, ignore_index).reshape(labels.shape)


def head_logprobs(hf_model, hidden, targets, fused=True):
    """log p(targets) under the LM head for selected hidden states [tokens, width]: fused (the
    logits never exist) unless the head has a bias or is quantized."""
    head = hf_model.lm_head
    if fused and getattr(head, "bias", None) is None and head.weight.is_floating_point():
        return fused_token_logprobs(hidden, head.weight, targets)
    return token_logprobs(head(hidden), targets)
# ---- end shared: logprobs ----
