"""Training on Lightning: MAE loss, the configured optimiser and LR decay, checkpoints, logs and resume.

``train(config, run_dir)`` is the whole job; the CLI and notebooks call it. A run folder holds the resolved
config, run facts (seed, git commit, versions), per-epoch metrics, best.ckpt and last.ckpt.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from boneage.augment import Augment
from boneage.config import Config, config_from_dict
from boneage.data import BoneAgeDataModule, to_float
from boneage.errors import BoneAgeInputError
from boneage.models import build_model


class BoneAgeModule(L.LightningModule):
    """Loss, optimiser phases and metrics around ``BoneAgeNet``; the checkpoint keeps the whole config."""

    def __init__(self, config: dict[str, Any], age_mean: float = 127.0, age_std: float = 41.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = config_from_dict(config)
        self.model = build_model(self.cfg.model, age_mean, age_std)
        self.augment = Augment(self.cfg.augment)
        self._val_abs: list[torch.Tensor] = []

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        return self.model(image, male)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, male, age = batch
        images = to_float(images)
        if self.trainer is not None and self.trainer.training:
            images = self.augment(images)
        return images.contiguous(memory_format=torch.channels_last), male, age

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, male, age = batch
        pred = self(images, male)
        # L1 on normalised targets: the same optimum as MAE in months, at a scale the optimiser likes
        loss = torch.nn.functional.l1_loss(pred, age) / self.model.age_std
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(age))
        self.log(
            "train_mae", (pred.detach() - age).abs().mean(), on_step=False, on_epoch=True, batch_size=len(age)
        )
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, male, age = batch
        pred = self(images, male)
        err = (pred.float() - age).abs()
        self.log("val_mae", err.mean(), prog_bar=True, on_epoch=True, batch_size=len(age), sync_dist=True)

    def configure_optimizers(self) -> Any:
        t = self.cfg.train
        params = [p for p in self.parameters() if p.requires_grad]
        name = t.optimizer.lower()
        if name == "adam":
            opt = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        elif name == "adamw":
            opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        elif name == "sgd":
            opt = torch.optim.SGD(
                params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True
            )
        else:
            raise BoneAgeInputError(f"unknown optimizer {t.optimizer!r} (adam, adamw or sgd)")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = int(t.warmup_epochs * steps_per_epoch)
        schedule = lr_lambda(t.schedule, total, warmup, t.final_lr_factor)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def lr_lambda(kind: str, total: int, warmup: int, final: float) -> Any:
    """LR factor per step: linear warm-up, then a decay from 1 to ``final`` (the talk decays to 0.01×)."""
    if kind not in {"cosine", "exponential", "constant"}:
        raise BoneAgeInputError(f"unknown LR schedule {kind!r} (cosine, exponential or constant)")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "exponential":
            return final**progress
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class EpochMetrics(Callback):
    """Appends one row per validated epoch to ``run_dir/metrics.csv``; appending survives a resume."""

    fields = ["epoch", "step", "train_loss", "train_mae", "val_mae", "lr", "elapsed_s"]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.time()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        m = trainer.callback_metrics
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "train_loss": _num(m.get("train_loss_epoch")),
            "train_mae": _num(m.get("train_mae")),
            "val_mae": _num(m.get("val_mae")),
            "lr": lr,
            "elapsed_s": round(time.time() - self.start, 1),
        }
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerow(row)


def _num(value: Any) -> float | str:
    return round(float(value), 4) if value is not None else ""


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _precision(cfg: Config) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def train(
    cfg: Config, run_dir: str | Path, *, progress: bool = True, callbacks: list[Callback] | None = None
) -> dict[str, Any]:
    """Train (or resume) into ``run_dir``; returns the summary also written to ``run_dir/summary.json``."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    cfg.save(run / "config.yaml")
    facts = {
        "name": cfg.name,
        "seed": cfg.train.seed,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (run / "run.json").write_text(json.dumps(facts, indent=2))

    dm = BoneAgeDataModule(cfg, progress=progress)
    dm.setup("fit")
    mean, std = dm.target_stats
    module = BoneAgeModule(cfg.to_dict(), age_mean=mean, age_std=std)
    module.model.to(memory_format=torch.channels_last)

    checkpoint = ModelCheckpoint(
        dirpath=run,
        filename="best",
        monitor="val_mae",
        mode="min",
        save_last=True,
        save_top_k=1,
        enable_version_counter=False,
    )
    cbs: list[Callback] = [checkpoint, EpochMetrics(run / "metrics.csv"), LearningRateMonitor("epoch")]
    if progress and cfg.trainer.progress_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        cbs.append(RichProgressBar())
    cbs += callbacks or []
    t = cfg.trainer
    trainer = L.Trainer(
        default_root_dir=run,
        max_epochs=cfg.train.epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=_precision(cfg),
        callbacks=cbs,
        logger=[
            TensorBoardLogger(run, name="tensorboard", version=""),
            CSVLogger(run, name="logs", version=""),
        ],
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        enable_progress_bar=progress and t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    last = run / "last.ckpt"
    resume = str(last) if cfg.train.resume and last.is_file() else None
    started = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    best = checkpoint.best_model_score
    summary = {
        **facts,
        "resumed_from": resume,
        "interrupted": bool(trainer.interrupted),
        "epochs_completed": trainer.current_epoch,
        "best_val_mae": float(best) if best is not None else None,
        "best_checkpoint": str(run / "best.ckpt"),
        "train_images": len(dm.train_set),
        "val_images": len(dm.val_set),
        "fit_seconds": round(time.time() - started, 1),
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
