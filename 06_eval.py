"""Stage 06: temporal multiple-choice benchmarks for a base model and its adapters, side by side.

Reads the project's benchmark JSONL (as stage 02 writes), stage 01's T3 validation JSONL
(text only) and the published layouts of TempCompass, Video-MME, MLVU and LongVideoBench.
Each video is decoded once per run, and the same frames go to the base model and to every
adapter. Scoring is `loglik` (the log-probability of each option's letter, or of yes/no, as
the first reply token: deterministic, the default) or `generate` (a greedy reply, then the
letter is extracted from it). The raw scores or reply and the parsed answer of every item
are kept.

Usage:
    python 06_eval.py --model M [--adapter t3=runs/03 --adapter tpo=runs/05]
        --bench runs/02/probe_bench.jsonl [--bench videomme=videomme.json --video-root DIR ...]
        [--num-frames 16] [--mode loglik|generate] --out runs/06 [--limit N] [--shard i/n]
    merge shards:  python 06_eval.py --merge runs/06-shard-* --out runs/06

Writes OUT/predictions.jsonl (appended as items are scored; --resume skips scored ones),
OUT/results.json (per model, benchmark and task type / dimension / duration) and
OUT/results.md (models as rows, benchmarks and temporal aspects as columns, with the
difference from the base model).
"""
import argparse
import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext

import torch
from tqdm import tqdm

FORMATS = ("auto", "jsonl", "t3", "tempcompass", "videomme", "mlvu", "longvideobench")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder or hub id (AutoModelForImageTextToText)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT adapter to evaluate beside the base model (repeatable)")
    p.add_argument("--bench", action="append", default=[], metavar="[NAME=]FILE",
                   help="a benchmark file, JSON or JSONL (repeatable); NAME defaults to the file's stem")
    p.add_argument("--format", choices=FORMATS, default="auto", help="layout of every --bench (auto: by each record's fields)")
    p.add_argument("--video-root", help="folder of the published benchmarks' videos (default: beside the file)")
    p.add_argument("--num-frames", type=int, default=16, help="frames per video, uniform over the decodable ones")
    p.add_argument("--mode", choices=("loglik", "generate"), default="loglik")
    p.add_argument("--max-new-tokens", type=int, default=32, help="reply length in generate mode")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, help="first N items of each benchmark")
    p.add_argument("--shard", default="0/1", help="i/n: every n-th item starting at i")
    p.add_argument("--skip-missing", action="store_true", help="count and skip items whose video is missing or unreadable")
    p.add_argument("--resume", action="store_true", help="keep OUT/predictions.jsonl and skip what it already scored")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="join shard folders' predictions into --out and report")
    p.add_argument("--out", required=True)
    p.add_argument("--no-4bit", dest="four_bit", action="store_false")
    args = p.parse_args(argv)
    if not args.merge and not (args.model and args.bench):
        p.error("--model and --bench are required (unless --merge)")
    try:
        args.shard_index, args.shard_count = (int(x) for x in args.shard.split("/"))
        assert 0 <= args.shard_index < args.shard_count
    except (ValueError, AssertionError):
        p.error(f"--shard must be i/n with 0 <= i < n, not {args.shard!r}")
    args.adapters = []
    for spec in args.adapter:
        name, _, folder = spec.partition("=")
        if not folder or not name or name == "base":
            p.error(f"--adapter takes NAME=DIR with a NAME other than 'base', not {spec!r}")
        args.adapters.append((name, folder))
    if len({n for n, _ in args.adapters}) != len(args.adapters):
        p.error("--adapter names must differ")
    return args


# ---- shared: io (identical copies in every stage; tests/test_shared_blocks.py) ----
class InputError(Exception):
    """Bad user input; main() prints it as one line and exits non-zero."""


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


def run_main(main):
    """Run main(); turn InputError into one line on stderr and exit status 2."""
    try:
        main()
    except InputError as e:
        for bar in list(getattr(tqdm, "_instances", [])):  # end progress bars first: the error is the last line
            bar.close()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
# ---- end shared: io ----


# ---- shared: model (identical copies in every stage that loads a model) ----
VISION_MODULES = ["model.visual", "model.vision_tower", "model.multi_modal_projector", "lm_head"]


def pick_device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(path, four_bit=True, device=None):
    """(model, processor) for any AutoModelForImageTextToText checkpoint. 4-bit NF4 with double
    quantization on the language model only; bf16 compute on CUDA, float32 on the CPU."""
    import logging
    import warnings
    # Library notices a user cannot act on: bitsandbytes' hint to install an optional CPU kernel
    # package, and transformers' renames of gradient_checkpointing_* that peft still calls.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing(_enable)?` is deprecated", FutureWarning)
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
    device = device or pick_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
    keep_4bit_layout(model)
    return model, processor


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
        video_processor(videos=[frames], return_tensors="pt")
    except Exception as e:
        raise InputError(f"{path}: the model's video processor cannot take it ({str(e).splitlines()[0][:150]})") from None


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
            batch = processor(text=[prompt_piece], videos=[video] if video is not None else None, return_tensors="pt")
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


# ---- shared: frames (identical copies in every stage that decodes video) ----
# Decoding runs in a child process: a decoder that hangs (decord issue #373), crashes or leaks
# (#208) costs one video, never the run, and ffmpeg's per-packet complaints stay out of the console.
DECODE_TIMEOUT = float(os.environ.get("DECODE_TIMEOUT", 300))  # seconds per video before it is given up
DECODER_RESTART_EVERY = 500  # videos per decoding process
_decoder = {"process": None, "conn": None, "served": 0}
decode_warnings = {}  # video path -> what went wrong decoding it (each printed once)


def sample_frames(path, num_frames, indices=None):
    """uint8 frames [T, H, W, 3]: `num_frames` spread uniformly over the video, or exactly `indices`."""
    return read_frames(path, num_frames, indices)[0]


def read_frames(path, num_frames=0, indices=None):
    """(frames [T, H, W, 3] uint8, the frame index each shows). A frame that does not decode is
    replaced by the nearest one that does (a uniform pick is spread over the decodable frames
    instead), with a one-line warning per video; a video with no decodable frame, or one that
    takes over DECODE_TIMEOUT seconds, is an InputError. The same file always gives the same frames."""
    frames, shown, note = _ask_decoder(path, ("frames", path, num_frames, indices))
    if note and path not in decode_warnings:
        decode_warnings[path] = note
        tqdm.write(f"warning: {path}: {note}", file=sys.stderr)
    return frames, shown


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
    """(frames, indices shown, note). decord reads exactly the asked frames of a healthy video; if it
    fails in any way, every frame is decoded in order with PyAV (deterministic, where decord's
    read-ahead makes the failures of a damaged file vary from run to run)."""
    pick = (lambda total: list(indices)) if indices is not None else (lambda total: uniform_indices(total, num_frames))
    try:
        import decord
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        wanted = pick(len(reader))
        if wanted and 0 <= min(wanted) and max(wanted) < len(reader):
            return reader.get_batch(wanted).asnumpy(), wanted, None
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
    return _frames_at(path, wanted), wanted, note


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
    import numpy as np
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


# ---- shared: logs (identical copies in the stages that keep JSONL logs) ----
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


# ---- shared: chat (identical copies in the stages that prompt the model in batches) ----
def chat_inputs(processor, requests, device):
    """Left-padded model inputs for requests [(frames or None, text)], ready for the reply.
    A batch must be all video or all text (processors pair videos with placeholders in order)."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": ([{"type": "video"}] if frames is not None else []) + [{"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False) for frames, text in requests]
    videos = [frames for frames, _ in requests if frames is not None] or None
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, videos=videos, padding=True, return_tensors="pt").to(device)
# ---- end shared: chat ----


# ---- shared: choice (identical copies in the stages that ask multiple-choice questions) ----
LETTERS = "ABCDEFGHIJ"
YES_NO = ("yes", "no")


def is_yes_no(options):
    return tuple(o.strip().lower() for o in options) == YES_NO


def choice_prompt(question, options):
    """The question with lettered options and the instruction lmms-eval uses (or a yes/no one)."""
    if is_yes_no(options):
        return f"{question}\nPlease answer yes or no."
    lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join([question, *lines, "Answer with the option's letter from the given choices directly."])


def reply_token_ids(tokenizer, options):
    """Per option, the first token of each reply that picks it: its letter, or yes/no in either case."""
    replies = [(w, w.capitalize()) for w in YES_NO] if is_yes_no(options) else [(L,) for L in LETTERS[:len(options)]]
    return [sorted({tokenizer(r, add_special_tokens=False)["input_ids"][0] for r in variants}) for variants in replies]



@torch.no_grad()
def choice_logprobs(model, processor, requests, options, device):
    """Per request, the log-probability of each option's reply as the first answer token."""
    inputs = chat_inputs(processor, requests, device)
    last = torch.log_softmax(model(**inputs, logits_to_keep=1).logits[:, -1].float(), -1)
    return [[round(float(torch.logsumexp(row[ids], 0)), 5) for ids in reply_token_ids(processor.tokenizer, opts)]
            for row, opts in zip(last, options)]


@torch.no_grad()
def choice_generate(model, processor, requests, device, max_new_tokens=32):
    """Greedy replies to requests [(frames or None, text)]."""
    inputs = chat_inputs(processor, requests, device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [processor.tokenizer.decode(row, skip_special_tokens=True).strip()
            for row in output[:, inputs["input_ids"].shape[1]:]]


def extract_choice(reply, options):
    """Index of the option a free-form reply picks, or None. In order: yes/no by prefix; a letter
    opening the reply ("B", "(B)", "B. ..."); "answer/option is B"; the last "(B)"; the last "B." or
    "B)"; the one option whose text the reply contains; the last standalone letter (not the article "A")."""
    text = reply.strip()
    if is_yes_no(options):
        word = re.match(r"\W*([a-z]+)", text.lower())
        return YES_NO.index(word[1]) if word and word[1] in YES_NO else None
    letter = f"[{LETTERS[:len(options)]}]"
    at_start = re.match(rf"\W*\(?({letter})\)?(?:[.:,)]|\s*$|\s+(?![a-z])|\s+is\b)", text)
    if at_start:
        return LETTERS.index(at_start[1])
    for pattern in (rf"(?i:answer|option|choice)\s*(?:is|:)?\s*:?\s*\(?({letter})\b", rf"\(({letter})\)",
                    rf"\b({letter})[.)](?=\s|$)"):
        found = re.findall(pattern, text)
        if found:
            return LETTERS.index(found[-1])
    named = [i for i, option in enumerate(options) if option.strip() and option.strip().lower() in text.lower()]
    if len(named) == 1:
        return named[0]
    standalone = [m[1] for m in re.finditer(rf"\b({letter})\b(?!\s+[a-z])", text)]
    return LETTERS.index(standalone[-1]) if standalone else None
# ---- end shared: choice ----


# ---------------------------------------------------------------- benchmarks in

def load_records(path):
    """[(where, record)] from a JSONL file, a JSON list, or a JSON object of lists/records."""
    text = read_text(path)
    head = text[:4096].lstrip()
    if path.endswith(".jsonl") or not head.startswith(("[", "{")):
        return [(f"{path}:{n}", r) for n, r in read_jsonl(path)]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if head.startswith("{"):  # a JSONL file without the .jsonl name
            return [(f"{path}:{n}", r) for n, r in read_jsonl(path)]
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, dict):  # {"id": record} or {"split": [records]}
        values = list(data.values())
        data = [r for v in values for r in v] if all(isinstance(v, list) for v in values) else values
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path}: expected a list of JSON objects")
    return [(f"{path}: record {i}", r) for i, r in enumerate(data, 1)]


def detect_format(record):
    keys = set(record)
    for fmt, needed in (("t3", {"conversations", "options"}), ("videomme", {"videoID"}), ("longvideobench", {"correct_choice"}),
                        ("mlvu", {"candidates"}), ("tempcompass", {"video_id", "dim"}), ("jsonl", {"video", "options"})):
        if needed <= keys:
            return fmt
    return None


def strip_letters(options):
    """Option texts without "A. " / "(A) " prefixes, when every option carries its own letter."""
    pattern = re.compile(r"^\(?([A-J])[.):]\s*(.*)$", re.S)
    matches = [pattern.match(o.strip()) for o in options]
    if all(m and m[1] == LETTERS[i] for i, m in enumerate(matches)):
        return [m[2].strip() for m in matches]
    return [o.strip() for o in options]


def answer_index(answer, options, where, by_index=False):
    """An answer given as a letter ("B", "(B)", "B. text", "Caption B: text") or an option's text, or
    (`by_index`: layouts that number their options, as LongVideoBench does) a 0-based index -> the option's index."""
    if by_index and isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    if not isinstance(answer, str):
        raise InputError(f"{where}: answer {answer!r} is not a letter or an option's text")
    text = answer.strip()
    letter = re.match(r"^\(?(?:Caption\s+)?([A-J])(?:[.):]|$)", text)
    if letter and LETTERS.index(letter[1]) < len(options):
        return LETTERS.index(letter[1])
    lowered = [o.lower() for o in options]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise InputError(f"{where}: answer {answer!r} is not one of its {len(options)} options")


def split_inline_options(question, where):
    """TempCompass keeps options in the question: lines "A. text" or "Caption A: text"."""
    lines = question.strip().split("\n")
    pattern = re.compile(r"^(?:Caption\s+)?([A-J])[.):]\s*(.+)$")
    options = [pattern.match(line.strip()) for line in lines]
    first = next((i for i, m in enumerate(options) if m and m[1] == "A"), None)
    if first is None or not all(options[first:]):
        raise InputError(f"{where}: no lettered options in the question")
    return "\n".join(lines[:first]).strip(), [m[2].strip() for m in options[first:]]


def find_video(folder, name):
    """folder/name, trying the usual extensions when the layout gives a bare video id."""
    path = os.path.join(folder, name)
    if os.path.splitext(name)[1].lower() not in VIDEO_EXTENSIONS:
        path = next((path + e for e in VIDEO_EXTENSIONS if os.path.isfile(path + e)), path + ".mp4")
    return path


def to_item(fmt, record, where, bench_dir, video_root):
    """A benchmark record in any supported layout -> {id, video, question, options, answer, groups}."""
    root = video_root or bench_dir

    def get(key, kind=None):
        """record[key]; with `kind` str or list, an InputError unless it is a string / a list of strings."""
        if key not in record:
            raise InputError(f"{where}: missing {key!r}")
        value = record[key]
        if kind is str and not isinstance(value, str):
            raise InputError(f"{where}: {key!r} must be a string, not {json.dumps(value)[:40]}")
        if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise InputError(f"{where}: {key!r} must be a list of strings, not {json.dumps(value)[:40]}")
        return value
    if fmt == "t3":
        turns = get("conversations")
        if not (isinstance(turns, list) and turns and isinstance(turns[0], dict) and isinstance(turns[0].get("value"), str)):
            raise InputError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
        human = turns[0]["value"]
        options = strip_letters(get("options", list))
        block = "\n" + "\n".join(record["options"])
        question = human[:human.index(block)] if block in human else human
        item = {"video": None, "question": question.strip(), "options": options, "groups": {"task_type": record.get("task", "t3")}}
    elif fmt == "jsonl":
        video = get("video") or None
        item = {"video": os.path.join(bench_dir, get("video", str)) if video else None, "question": get("question", str),
                "options": strip_letters(get("options", list)), "groups": {"task_type": record.get("task_type", "all")}}
    elif fmt == "tempcompass":
        answer = str(get("answer")).strip()
        if answer.lower() in YES_NO:
            question, options, task = get("question", str), list(YES_NO), "yes_no"
        else:
            question, options = split_inline_options(get("question", str), where)
            task = "caption_matching" if answer.lower().startswith("caption") else "multi-choice"
        item = {"video": find_video(root, str(get("video_id"))), "question": question, "options": options,
                "groups": {"dim": record["dim"], "task": task}}
    elif fmt == "videomme":
        item = {"video": find_video(root, str(get("videoID"))), "question": get("question", str),
                "options": strip_letters(get("options", list)),
                "groups": {"task_type": record.get("task_type", "all"), "duration": record.get("duration", "all")}}
    elif fmt == "mlvu":
        name = record.get("video") or get("video_name", str)
        candidates = get("candidates")
        if not (isinstance(name, str) and isinstance(candidates, list) and all(isinstance(c, (str, int, float)) for c in candidates)):
            raise InputError(f"{where}: needs a 'video' name and a list of 'candidates'")
        item = {"video": find_video(root, name), "question": get("question", str), "options": [str(c) for c in candidates],
                "groups": {"task_type": record.get("question_type", record.get("task_type", "all"))}}
    elif fmt == "longvideobench":
        options = [str(record[f"option{i}"]) for i in range(10) if record.get(f"option{i}") not in (None, "", "N/A")]
        item = {"video": find_video(root, get("video_path", str)), "question": get("question", str), "options": options,
                "groups": {"task_type": record.get("question_category", "all"), "duration": str(record.get("duration_group", "all"))}}
    else:
        raise InputError(f"{where}: not a benchmark record this stage reads (give --format)")
    if not 2 <= len(item["options"]) <= len(LETTERS):
        raise InputError(f"{where}: needs 2 to {len(LETTERS)} options, has {len(item['options'])}")
    if fmt == "longvideobench":
        item["answer"] = answer_index(get("correct_choice"), item["options"], where, by_index=True)
    else:
        item["answer"] = answer_index(get("answer"), item["options"], where)
    item["id"] = str(record.get("id", record.get("question_id", record.get("uid", where.rsplit(" ", 1)[-1].rsplit(":", 1)[-1]))))
    return item


def read_bench(spec, fmt, video_root, limit):
    """(name, items) of one --bench [NAME=]FILE; ids made unique within the benchmark."""
    name, _, path = spec.rpartition("=") if "=" in spec and not os.path.exists(spec) else ("", "", spec)
    name = name or os.path.splitext(os.path.basename(path))[0]
    items, seen = [], {}
    for where, record in load_records(path):
        record_format = detect_format(record) if fmt == "auto" else fmt
        item = to_item(record_format, record, where, os.path.dirname(os.path.abspath(path)), video_root)
        seen[item["id"]] = seen.get(item["id"], 0) + 1
        if seen[item["id"]] > 1:
            item["id"] += f"#{seen[item['id']]}"
        item["where"] = where
        items.append(item)
        if limit and len(items) == limit:
            break
    if not items:
        raise InputError(f"{path}: no records")
    return name, items


def check_videos(items, skip_missing):
    """Items whose video exists; a missing one is an error, or counted with --skip-missing."""
    kept, missing = [], []
    for bench, item in items:
        if item["video"] is not None and not os.path.isfile(item["video"]):
            if not skip_missing:
                raise InputError(f"{item['where']}: video {item['video']} not found (or pass --skip-missing)")
            tqdm.write(f"warning: skipping {item['where']}: video {item['video']} not found", file=sys.stderr)
            missing.append((bench, item))
        else:
            kept.append((bench, item))
    return kept, missing


# ---------------------------------------------------------------- models

def load_variants(args, device):
    """The model with every adapter loaded, and [(name, context that activates it)], base first."""
    model, processor = load_model(args.model, args.four_bit, device)
    variants = [("base", nullcontext)]
    if args.adapters:
        from peft import PeftModel
        for i, (name, folder) in enumerate(args.adapters):
            if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
                raise InputError(f"{folder}: not a PEFT adapter folder (no adapter_config.json)")
            if i == 0:
                model = PeftModel.from_pretrained(model, folder, adapter_name=name)
            else:
                model.load_adapter(folder, adapter_name=name)
        variants = [("base", model.disable_adapter)]
        variants += [(name, lambda name=name: use_adapter(model, name)) for name, _ in args.adapters]
    model.eval()
    return model, processor, variants


@contextmanager
def use_adapter(model, name):
    model.set_adapter(name)
    yield


# ---------------------------------------------------------------- scoring

def batches(items, batch_size):
    """Consecutive items of one benchmark, all with video or all without, batch_size at a time."""
    batch = []
    for entry in items:
        if batch and (len(batch) == batch_size or (batch[0][0], batch[0][1]["video"] is None) != (entry[0], entry[1]["video"] is None)):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


def decode(batch, num_frames, skip_missing, processor):
    """Frames for each item of a batch (None for text-only items); unreadable videos, and videos the
    model's processor refuses, raise or are dropped."""
    kept, frames, bad = [], [], []
    for bench, item in batch:
        try:
            item_frames = None if item["video"] is None else sample_frames(item["video"], num_frames)
            check_video_input(processor, item_frames, item["video"])
            frames.append(item_frames)
            kept.append((bench, item))
        except InputError as e:
            if not skip_missing:
                raise InputError(f"{item['where']}: {e} (or pass --skip-missing)") from None
            tqdm.write(f"warning: skipping {item['where']}: {e}", file=sys.stderr)
            bad.append((bench, item))
    return kept, frames, bad


def score_batch(model, processor, batch, frames, args, device):
    """[(prediction index or None, raw)] for one model variant: raw is the scores or the reply."""
    requests = [(f, choice_prompt(item["question"], item["options"])) for f, (_, item) in zip(frames, batch)]
    if args.mode == "loglik":
        scores = choice_logprobs(model, processor, requests, [item["options"] for _, item in batch], device)
        return [(max(range(len(s)), key=s.__getitem__), {"scores": s}) for s in scores]
    replies = choice_generate(model, processor, requests, device, args.max_new_tokens)
    return [(extract_choice(r, item["options"]), {"reply": r}) for r, (_, item) in zip(replies, batch)]


def prediction_record(variant, bench, item, predicted, raw):
    return {"model": variant, "bench": bench, "id": item["id"], "groups": item["groups"],
            "answer": LETTERS[item["answer"]], "prediction": None if predicted is None else LETTERS[predicted],
            "correct": predicted == item["answer"], **raw}


# ---------------------------------------------------------------- results

def summarize(predictions, skipped):
    """{model: {bench: {accuracy, correct, total, skipped, by: {group: {value: {...}}}}}}, base first."""
    tally = lambda: {"correct": 0, "total": 0}
    results = {}
    for p in predictions:
        entry = results.setdefault(p["model"], {}).setdefault(p["bench"], {**tally(), "by": {}})
        cells = [entry] + [entry["by"].setdefault(g, {}).setdefault(v, tally()) for g, v in sorted(p["groups"].items())]
        for cell in cells:
            cell["correct"] += bool(p["correct"])
            cell["total"] += 1
    for benches in results.values():
        for bench, entry in benches.items():
            entry["skipped"] = skipped.get(bench, 0)
            for cell in [entry] + [c for values in entry["by"].values() for c in values.values()]:
                cell["accuracy"] = round(cell["correct"] / cell["total"], 4)
    order = sorted(results, key=lambda m: (m != "base", list(results).index(m)))
    return {m: results[m] for m in order}


def accuracy_cell(results, model, bench, group=None, value=None):
    """"52.3 (+1.2)": accuracy in %, and the difference from the base model on the same items' group."""
    def entry(name):
        found = results.get(name, {}).get(bench)
        return found if found is None or group is None else found["by"].get(group, {}).get(value)
    mine, base = entry(model), entry("base")
    if mine is None:
        return "-"
    text = f"{100 * mine['accuracy']:.1f}"
    return text if model == "base" or base is None else f"{text} ({100 * (mine['accuracy'] - base['accuracy']):+.1f})"


def results_table(results):
    """Markdown: models as rows; one table of benchmarks, then one per benchmark of its aspects."""
    benches = list(dict.fromkeys(b for per_model in results.values() for b in per_model))
    first = {b: next(r[b] for r in results.values() if b in r) for b in benches}

    def table(columns, titles):
        lines = ["| model | " + " | ".join(titles) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(accuracy_cell(results, m, *c) for c in columns) + " |" for m in results]
        return "\n".join(lines)

    parts = [table([(b,) for b in benches], [f"{b} (n={first[b]['total']})" for b in benches])]
    for bench in benches:
        by = first[bench]["by"]
        columns = [(bench, g, v) for g in sorted(by) if len(by[g]) > 1 for v in sorted(by[g])]
        if columns:
            parts.append(f"**{bench}** by " + ", ".join(g for g in sorted(by) if len(by[g]) > 1) + "\n\n"
                         + table(columns, [f"{v} (n={by[g][v]['total']})" for _, g, v in columns]))
    return "\n\n".join(parts)


def write_results(out, predictions, skipped, meta):
    results = summarize(predictions, skipped)
    with atomic_write(os.path.join(out, "results.json")) as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    table = results_table(results)
    with atomic_write(os.path.join(out, "results.md")) as f:
        f.write(f"# Temporal benchmarks\n\nAccuracy in %, and in brackets the difference from the base model.\n"
                f"Scoring: {meta.get('mode', '?')}; frames per video: {meta.get('num_frames', '?')}.\n\n{table}\n")
    return table


def merge(args):
    predictions, skipped, meta = [], {}, {}
    for folder in args.merge:
        path = os.path.join(folder, "predictions.jsonl")
        if not os.path.isfile(path):
            raise InputError(f"{folder}: no predictions.jsonl")
        predictions += read_log(path)
        if os.path.isfile(os.path.join(folder, "results.json")):
            shard = json.loads(read_text(os.path.join(folder, "results.json")))
            meta = {k: v for k, v in shard["meta"].items() if k != "shard"}
            for bench, count in shard["meta"].get("skipped", {}).items():
                skipped[bench] = skipped.get(bench, 0) + count
    write_jsonl(os.path.join(args.out, "predictions.jsonl"), predictions)
    print(write_results(args.out, predictions, skipped, {**meta, "skipped": skipped, "merged": args.merge}))


def main():
    args = parse_args()
    if args.merge:
        return merge(args)
    benches = [read_bench(spec, args.format, args.video_root, args.limit) for spec in args.bench]
    if len({name for name, _ in benches}) != len(benches):
        raise InputError("two --bench files have the same name; give them NAME=FILE")
    items = [(name, item) for name, bench_items in benches for item in bench_items][args.shard_index::args.shard_count]
    items, missing = check_videos(items, args.skip_missing)
    make_out_dir(args.out)
    path = os.path.join(args.out, "predictions.jsonl")
    predictions = read_log(path) if args.resume else []
    write_jsonl(path, predictions)  # drops a torn last line, or starts afresh without --resume
    device = pick_device()
    model, processor, variants = load_variants(args, device)
    done = {(p["model"], p["bench"], p["id"]) for p in predictions}
    todo = [(b, i) for b, i in items if any((v, b, i["id"]) not in done for v, _ in variants)]
    skipped = {}
    for bench, _ in missing:
        skipped[bench] = skipped.get(bench, 0) + 1
    began = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"eval ({len(variants)} models)", unit="item")
    for batch in batches(todo, args.batch_size):
        batch, frames, bad = decode(batch, args.num_frames, args.skip_missing, processor)  # once for every model
        for bench, _ in bad:
            skipped[bench] = skipped.get(bench, 0) + 1
        new = []
        for variant, active in variants:
            if batch:
                with active():
                    scored = score_batch(model, processor, batch, frames, args, device)
                new += [prediction_record(variant, bench, item, *s) for (bench, item), s in zip(batch, scored)
                        if (variant, bench, item["id"]) not in done]
        append_jsonl(path, new)
        predictions += new
        bar.update(len(batch) + len(bad))
    bar.close()
    meta = {"model": args.model, "adapters": dict(args.adapters), "benches": [s for s in args.bench], "mode": args.mode,
            "num_frames": args.num_frames, "shard": args.shard, "skipped": skipped,
            "videos_with_decoder_errors": sorted(decode_warnings), "seconds": round(time.perf_counter() - began, 1)}
    print(write_results(args.out, predictions, skipped, meta))
    print(f"results in {args.out}/results.md and results.json; every answer in {path}"
          + (f"; skipped {sum(skipped.values())} items without a readable video" if skipped else "")
          + (f"; {len(decode_warnings)} videos had frames that do not decode (nearest frames shown instead)"
             if decode_warnings else ""))


if __name__ == "__main__":
    run_main(main)
