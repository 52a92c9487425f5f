"""``gpa train``: the training loop, one process or many under ``torchrun`` (DDP or FSDP; gloo on CPU, nccl on GPUs).

Every process computes the same global batch plan and trains on its slice of each micro-batch; the
loss is the token mean over the whole global batch (all micro-batches, all processes), so a run with
N processes follows the single-process run, and a resumed run the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from gpa.checkpoint import Checkpoint, load_lm
from gpa.config import Task
from gpa.model import GPALM
from gpa.prompts import IGNORE_INDEX
from gpa.train.config import TrainConfig, model_config
from gpa.train.data import BatchPlan, PreparedData, Sample, collate, split_records
from gpa.train.lora import apply_lora
from gpa.train.shards import file_sha256
from gpa.train.state import latest_checkpoint, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
# Settings that fix the sequence of batches; a resumed run with others goes on, but in another order.
ORDER_KEYS = ("data", "seed", "batch_size", "grad_accum", "task_weights", "eval_fraction", "max_len", "bucket_batches")


@dataclass
class TrainResult:
    """How a call to :func:`train` ended."""

    step: int  # optimizer steps done (in total, over resumptions)
    checkpoint: Path | None  # the last checkpoint written
    losses: list[float] = field(default_factory=list)  # training loss of each step this call ran
    eval_losses: dict[str, float] = field(default_factory=dict)  # last held-out loss per task


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


# --- setup -------------------------------------------------------------------------------------------


def init_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """Join the torchrun job if there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_pref == "auto":
        device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_pref)
    if device.type == "cuda" and device.index is None:  # "cuda": this process's GPU (set_device needs an index)
        device = torch.device("cuda", d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where asked for, or (auto) where the GPU supports it; None: plain fp32."""
    if cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def init_weights(model: GPALM, std: float) -> None:
    """Normal(0, std) for every linear and embedding matrix (HF's initializer_range); norms stay at 1."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def enable_grad_checkpointing(model: GPALM) -> None:
    """Recompute each block's activations in the backward pass (the blocks' names are unchanged)."""

    def run(forward: Any, *args: Any) -> Tensor:
        return checkpoint(forward, *args, use_reentrant=False) if torch.is_grad_enabled() else forward(*args)

    for block in model.model.layers:
        block.forward = partial(run, block.forward)


def build_model(cfg: TrainConfig, data: PreparedData) -> GPALM:
    """From scratch (a preset or a config file) or from a GPA checkpoint; then LoRA if asked for."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        ckpt = Checkpoint.open(cfg.init_from)
        if file_sha256(ckpt.tokenizer) != data.meta["tokenizer_sha256"]:
            raise ValueError(f"{cfg.data} was tokenized with another tokenizer than {ckpt.tokenizer}")
        model = load_lm(ckpt).train().requires_grad_(True)
    else:
        model = GPALM(model_config(cfg.model, data.lm_vocab_size))
        init_weights(model, cfg.init_std)
    if model.config.vocab_size < data.vocab.size:
        raise ValueError(f"model vocab_size {model.config.vocab_size} < the data tokenizer's {data.vocab.size}")
    if cfg.lora_rank:
        n = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        logger.info("LoRA rank %d on %d layers", cfg.lora_rank, n)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    return model


def shard(model: GPALM) -> None:
    """FSDP: each block, then the rest, split across processes (gathered only while it runs)."""
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only (not norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def split_samples(data: PreparedData, cfg: TrainConfig) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out) samples; over-long ones are left out (never truncated) and counted."""
    held = split_records(data.records, cfg.eval_fraction, cfg.seed)
    fits = [s for s in data.samples if s.length <= cfg.max_len]
    if len(fits) < len(data.samples):
        logger.warning("%d samples longer than max_len %d are left out", len(data.samples) - len(fits), cfg.max_len)
    train = [s for s in fits if s.record not in held]
    held_out = [s for s in fits if s.record in held]
    logger.info("samples: %d train, %d held out (%d records)", len(train), len(held_out), len(held))
    return train, held_out


# --- one step ----------------------------------------------------------------------------------------


def batch_loss(model: nn.Module, ids: Tensor, labels: Tensor, amp: torch.dtype | None) -> Tensor:
    """Per-token cross entropy (B, T) of predicting each label from the tokens before it (0 where ignored).

    Right padding needs no attention mask: causal attention never looks forward at the padding.
    """
    with torch.autocast(ids.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(ids)  # (B, T, V) fp32
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): position t predicts token t+1
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(targets)


@contextlib.contextmanager
def _grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Accumulate gradients locally (no communication) unless ``sync``: DDP's no_sync, FSDP's switch."""
    if sync or not dist.is_initialized():
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def _all_reduce(t: Tensor) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def train_step(model: nn.Module, opt: torch.optim.Optimizer, data: PreparedData, samples: Sequence[Sample],
               micro: list[list[int]], cfg: TrainConfig, d: Dist, device: torch.device,
               amp: torch.dtype | None) -> tuple[float, float]:
    """One optimizer step over ``micro`` (global micro-batches); returns (mean loss, grad norm)."""
    n_targets = sum(samples[i].targets for batch in micro for i in batch)  # global: every rank knows the plan
    loss_sum = torch.zeros((), device=device)
    for k, batch in enumerate(micro):
        mine = batch[d.rank :: d.world]
        ids, labels = collate([data.prompt(samples[i]) for i in mine], data.vocab.pad)
        last = k == len(micro) - 1
        with _grad_sync(model, last):
            loss = batch_loss(model, ids.to(device), labels.to(device), amp).sum()
            # DDP averages gradients over processes: scale so that the result is the global token mean.
            (loss * d.world / n_targets).backward()
        loss_sum += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                          cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if isinstance(norm, DTensor):  # FSDP: the norm over every process's shards
        norm = norm.full_tensor()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(_all_reduce(loss_sum)) / n_targets, float(norm)


@torch.no_grad()
def evaluate(model: nn.Module, data: PreparedData, samples: Sequence[Sample], batch_size: int, d: Dist,
             device: torch.device, amp: torch.dtype | None = None) -> dict[str, float]:
    """Token-mean loss per task over ``samples`` (split across processes)."""
    tasks = list(Task)
    sums = torch.zeros(len(tasks), 2, dtype=torch.float64, device=device)  # (task, [loss, tokens])
    order = sorted(range(len(samples)), key=lambda i: samples[i].length)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        mine = batch[d.rank :: d.world]
        chunk = [samples[i] for i in mine or batch[:1]]  # an idle process still joins FSDP's collectives
        ids, labels = collate([data.prompt(s) for s in chunk], data.vocab.pad)
        per_token = batch_loss(model, ids.to(device), labels.to(device), amp)  # (B, T)
        if not mine:
            continue
        counted = (labels[:, 1:] != IGNORE_INDEX).sum(1).to(device)
        for b, s in enumerate(chunk):
            sums[tasks.index(s.task)] += torch.stack([per_token[b].sum().double(), counted[b].double()])
    model.train(was_training)
    _all_reduce(sums)
    return {t.value: float(sums[i, 0] / sums[i, 1]) for i, t in enumerate(tasks) if sums[i, 1] > 0}


# --- the loop ----------------------------------------------------------------------------------------


class JsonlLog:
    """Appends one JSON object per line (only the main process writes)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **row: Any) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def _resume(cfg: TrainConfig, model: GPALM, opt: torch.optim.Optimizer, d: Dist
            ) -> tuple[int, tuple[int, int], Path | None]:
    """(step, data position, checkpoint) of the newest checkpoint in ``out_dir``, or a fresh start."""
    ckpt = latest_checkpoint(cfg.out_dir)
    if ckpt is None:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout differs between processes, is fixed by the seed
        return 0, (0, 0), None
    meta = load_checkpoint(ckpt, model, opt, d.rank)
    logger.info("resuming from %s (step %d)", ckpt, meta["step"])
    changed = sorted(k for k, v in cfg.to_dict().items() if k in ORDER_KEYS and meta["config"].get(k) != v)
    if changed:
        logger.warning("resuming with other %s than the checkpoint's: the data order differs from the first run's",
                       ", ".join(changed))
    return meta["step"], tuple(meta["position"]), ckpt


def _steps(start: int, stop: int, show: bool) -> Iterator[int]:
    with tqdm(total=stop, initial=start, disable=not show, unit="step", desc="train") as bar:
        for step in range(start, stop):
            yield step
            bar.update(1)


def train(cfg: TrainConfig, progress: bool = False) -> TrainResult:
    """Train (or resume, when ``cfg.out_dir`` already holds checkpoints) up to ``cfg.max_steps``."""
    if not cfg.data or not cfg.out_dir:
        raise ValueError("TrainConfig needs data (a prepared directory) and out_dir")
    joined, threads = dist.is_initialized(), torch.get_num_threads()
    d, device = init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, d, device, progress)
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized() and not joined:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, device: torch.device, progress: bool) -> TrainResult:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = PreparedData(cfg.data, cache_prompts=cfg.cache_prompts)
    train_samples, eval_samples = split_samples(data, cfg)
    if cfg.batch_size < d.world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {d.world} processes")
    model = build_model(cfg, data).to(device)
    if cfg.parallel == "fsdp" and d.world > 1:
        shard(model)
    opt = make_optimizer(model, cfg, device)
    start, position, ckpt = _resume(cfg, model, opt, d)
    net = DistributedDataParallel(model) if cfg.parallel == "ddp" and d.world > 1 else model
    plan = BatchPlan(train_samples, cfg.task_weights, cfg.batch_size, cfg.bucket_batches, cfg.seed)
    amp = autocast_dtype(cfg, device)
    log = JsonlLog(out / LOG_FILE, d.main)
    meta = {"config": cfg.to_dict(), "model_config": model.config.to_dict(), "world_size": d.world,
            "data_tokenizer_sha256": data.meta["tokenizer_sha256"], "source_checkpoint": data.meta["checkpoint"]}
    result = TrainResult(start, ckpt)
    window = [0, 0.0]  # tokens and seconds since the last log line
    model.train()
    began = time.monotonic()
    for step in _steps(start, cfg.max_steps, progress and d.main):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        micro, position = plan.take(position, cfg.grad_accum)
        loss, norm = train_step(net, opt, data, train_samples, micro, cfg, d, device, amp)
        window[0] += sum(train_samples[i].length for batch in micro for i in batch)  # real tokens, no padding
        window[1] += time.perf_counter() - t0
        result.losses.append(loss)
        done = step + 1
        out_of_time = cfg.max_minutes > 0 and _all_reduce(
            torch.tensor(float(time.monotonic() - began > 60 * cfg.max_minutes), device=device)).item() > 0
        last = done == cfg.max_steps or out_of_time
        if done % cfg.log_every == 0 or last:
            speed = window[0] / window[1]
            log.write(step=done, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=speed)
            logger.info("step %d loss %.4f lr %.2e grad %.2f %.0f tok/s", done, loss, lr, norm, speed)
            window = [0, 0.0]
        if eval_samples and (last or (cfg.eval_every and done % cfg.eval_every == 0)):
            result.eval_losses = evaluate(model, data, eval_samples, cfg.batch_size, d, device, amp)
            log.write(step=done, eval=result.eval_losses)
            logger.info("step %d held-out loss %s", done, result.eval_losses)
        if done % cfg.save_every == 0 or last:
            result.checkpoint = save_checkpoint(out, done, model, opt, {**meta, "position": list(position)},
                                                d.rank, cfg.keep_checkpoints)
        result.step = done
        if out_of_time:
            logger.info("stopped at step %d: the %.1f-minute budget is spent", done, cfg.max_minutes)
            break
    return result
