"""The training loop: plain PyTorch, deterministic, optionally data-parallel (DDP, gloo on CPU).

Determinism: one seed fixes the split, the weight initialisation and the shuffling (a seeded
``torch.Generator``, or ``DistributedSampler``'s seed under DDP); torch's deterministic algorithms
and a fixed thread count keep the arithmetic in the same order. Same config, same weights.

Under DDP every rank evaluates the whole (small) validation split on the synchronised weights
(and rank 0's BatchNorm statistics), so all ranks reach the same early-stopping decision.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgesmith.toolchain.errors import UserError, first_line
from edgesmith.toolchain.train.config import TrainConfig
from edgesmith.toolchain.train.data import Splits

DUMP_ENV = "EDGESMITH_TRAIN_DUMP"  # a directory: each rank writes its weights' checksum and samples there (tests)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float


@dataclass
class TrainResult:
    model: object  # torch.nn.Module, best validation weights, eval mode
    history: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    @property
    def best_val_accuracy(self) -> float:
        return self.history[self.best_epoch - 1].val_accuracy if self.history else 0.0


def world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def make_deterministic(config: TrainConfig) -> None:
    import torch

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)


def build_model(config: TrainConfig, classes: int | None = None):
    """Call the config's ``module:callable`` with torch seeded, so initial weights repeat.

    One probe forward pass on zeros of ``input_shape`` (eval mode, no gradients: weights, BatchNorm
    statistics and the random stream stay untouched) checks the model takes that shape and, given
    the dataset's class count, gives one logit per class, so a mismatch is one sentence, not a
    traceback from the first training batch."""
    import torch

    from edgesmith.toolchain.sources import make_module

    torch.manual_seed(config.seed)
    model, _ = make_module(config.model)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(*config.input_shape))
    except Exception as e:
        raise UserError(f"{config.model} fails on an input of shape {config.input_shape} ({type(e).__name__}: {first_line(e)}); "
                        "check input_shape in the config") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != config.input_shape[0]:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{config.model} returns {shape} for input_shape {config.input_shape}; a classifier must return "
                        "one row of class logits per input (batch, classes)")
    if classes is not None and out.shape[1] < classes:
        raise UserError(f"{config.model} gives {out.shape[1]} outputs but the dataset has {classes} classes "
                        f"(labels 0..{classes - 1}); give the model at least {classes} outputs or fix the labels")
    model.train()
    return model


def evaluate(model, x: np.ndarray, y: np.ndarray, batch: int = 512) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, predicted labels) on one split."""
    import torch
    import torch.nn.functional as F

    model.eval()
    losses, preds = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            logits = model(torch.from_numpy(x[start:start + batch]))
            losses.append(F.cross_entropy(logits, torch.from_numpy(y[start:start + batch]), reduction="sum").item())
            preds.append(logits.argmax(1).numpy())
    pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
    return sum(losses) / max(len(x), 1), float((pred == y).mean()) if len(y) else 0.0, pred


def _optimiser(config: TrainConfig, params):
    import torch

    if config.optimiser == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimiser == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def train(config: TrainConfig, splits: Splits, on_epoch: Callable[[EpochMetrics], None] = lambda m: None) -> TrainResult:
    """Train with the config's optimiser and early stopping; return the best-validation weights.

    ``on_epoch`` runs after every epoch on every rank (it may raise, e.g. to prune a search trial).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    make_deterministic(config)
    rank, size = world()
    model = build_model(config, len(splits.classes))
    net = model
    data = TensorDataset(torch.from_numpy(splits.train[0]), torch.from_numpy(splits.train[1]))
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        # drop_last: each epoch's shards are disjoint (no sample padded in twice); a different one
        # or so is left out each epoch, as the shuffle changes
        sampler = DistributedSampler(data, num_replicas=size, rank=rank, shuffle=True, seed=config.seed, drop_last=True)
        loader = DataLoader(data, batch_size=config.batch_size, sampler=sampler)
        net = DistributedDataParallel(model)
    else:
        sampler = None
        loader = DataLoader(data, batch_size=config.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(config.seed))
    optimiser = _optimiser(config, net.parameters())
    result = TrainResult(model=model)
    best_state, best_acc, waited = copy.deepcopy(model.state_dict()), -1.0, 0
    stopping = config.early_stopping
    seen: list[int] = []  # the first epoch's sample indices on this rank (EDGESMITH_TRAIN_DUMP)
    for epoch in range(1, config.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
            if epoch == 1:
                seen = list(sampler)
        net.train()
        total, correct, loss_sum = 0, 0, 0.0
        for xb, yb in loader:
            optimiser.zero_grad(set_to_none=True)
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            optimiser.step()
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(yb)
        if size > 1:  # the last step's BatchNorm statistics are rank-local: take rank 0's everywhere
            import torch.distributed as dist

            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        val_loss, val_acc, _ = evaluate(model, *splits.val)
        metrics = EpochMetrics(epoch, loss_sum / total, correct / total, val_loss, val_acc)
        result.history.append(metrics)
        if val_acc > best_acc + (stopping.min_delta if stopping else 0.0):
            best_state, best_acc, waited, result.best_epoch = copy.deepcopy(model.state_dict()), val_acc, 0, epoch
        else:
            waited += 1
        on_epoch(metrics)
        if stopping and waited >= stopping.patience:
            result.stopped_early = True
            break
    model.load_state_dict(best_state)
    model.eval()
    if os.environ.get(DUMP_ENV):
        _dump(Path(os.environ[DUMP_ENV]), rank, size, model, seen if sampler is not None else list(range(len(data))))
    return result


def _dump(directory: Path, rank: int, size: int, model, indices: list[int]) -> None:
    """``rank-<r>.json``: this rank's final weights' SHA-256 and the training samples it saw in
    epoch 1, so a test can check that DDP ranks end with the same weights on disjoint shards."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": size, "weights_sha256": h.hexdigest(), "samples": len(indices),
         "indices": sorted(int(i) for i in indices)}))
