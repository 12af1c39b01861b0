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
from boneage.cache import decode_batch
from boneage.config import Config, config_from_dict
from boneage.data import to_float
from boneage.errors import BoneAgeInputError
from boneage.models import build_model, freeze_all_but
from boneage.pretraining import make_datamodule

TASKS = ("regression", "classification")


class BoneAgeModule(L.LightningModule):
    """Loss, optimiser phases and metrics around ``BoneAgeNet``; the checkpoint keeps the whole config."""

    def __init__(self, config: dict[str, Any], age_mean: float = 127.0, age_std: float = 41.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = config_from_dict(config)
        if self.cfg.model.task not in TASKS:
            raise BoneAgeInputError(
                f"unknown model.task {self.cfg.model.task!r} (regression or classification)"
            )
        self.classification = self.cfg.model.task == "classification"
        if self.classification:  # the network's output is then the logit itself
            age_mean, age_std = 0.0, 1.0
        parse_layers(self.cfg.finetune.layers)
        self.model = build_model(self.cfg.model, age_mean, age_std)
        self.augment = Augment(self.cfg.augment)
        self._val_abs: list[torch.Tensor] = []
        # the phase the current optimiser was built for: 0 single phase, 1 head only, 2 fine-tuning
        self.phase = 0
        self.phase_log: list[dict[str, Any]] = []
        self._restored_phase: int | None = None

    # ---- fine-tuning phases --------------------------------------------------------------------------
    def phase_for_epoch(self, epoch: int) -> int:
        head = self.cfg.finetune.head_epochs
        if head <= 0:
            return 0
        return 1 if epoch < head else 2

    def apply_phase(self, phase: int) -> int:
        """Set ``requires_grad`` for a phase; returns the number of trainable parameters."""
        if phase == 1:
            self.model.requires_grad_(True)
            self.model.backbone.requires_grad_(False)
            return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return freeze_all_but(self.model, parse_layers(self.cfg.finetune.layers))

    def _set_batchnorm_modes(self) -> None:
        """BatchNorm layers whose weights are frozen also keep their running statistics (as Keras does);
        trainable ones update them (a layer unfrozen at the phase boundary goes back to training mode)."""
        for m in self.model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                params = list(m.parameters(recurse=False))
                if params:
                    m.train(any(p.requires_grad for p in params))

    def on_train_epoch_start(self) -> None:
        if self.phase_log and self.phase_log[-1]["from_epoch"] is None:  # the optimiser a resume restored
            self.phase_log[-1]["from_epoch"] = self.current_epoch
        want = self.phase_for_epoch(self.current_epoch)
        if want != self.phase:  # the phase boundary (also right after a resume that lands on it)
            self.trainer.strategy.setup_optimizers(self.trainer)
        self._set_batchnorm_modes()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["boneage_phase"] = self.phase  # the optimiser state saved with it belongs to this phase

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # called before configure_optimizers on resume, so the optimiser is rebuilt for the saved state
        saved = checkpoint.get("boneage_phase")
        self._restored_phase = int(saved) if saved is not None else self.phase_for_epoch(checkpoint["epoch"])

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        return self.model(image, male)

    def on_fit_start(self) -> None:
        # every rank starts from the same seed (identical weights); from here on ranks > 0 draw their own
        # augmentation parameters and dropout masks instead of repeating rank 0's on different images
        if self.trainer.world_size > 1 and self.trainer.global_rank > 0:
            torch.manual_seed(self.cfg.train.seed + 7919 * self.trainer.global_rank)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, male, age = batch
        # shard caches with data.decode=device hand over encoded JPEGs: nvJPEG decodes the batch on the GPU
        images = to_float(decode_batch(images, self.device))
        if self.trainer is not None and self.trainer.training:
            images = self.augment(images)
        return images.contiguous(memory_format=torch.channels_last), male, age

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, male, age = batch
        pred = self(images, male)
        if self.classification:  # age holds the 0/1 label; "MAE" is that of the predicted probability
            loss = torch.nn.functional.binary_cross_entropy_with_logits(pred, age)
            mae = (torch.sigmoid(pred.detach()) - age).abs().mean()
        else:
            # L1 on normalised targets: the same optimum as MAE in months, at a scale the optimiser likes
            loss = torch.nn.functional.l1_loss(pred, age) / self.model.age_std
            mae = (pred.detach() - age).abs().mean()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(age))
        self.log("train_mae", mae, on_step=False, on_epoch=True, batch_size=len(age))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, male, age = batch
        pred = self(images, male)
        if self.classification:
            prob = torch.sigmoid(pred.float())
            bce = torch.nn.functional.binary_cross_entropy_with_logits(pred.float(), age)
            acc = ((prob > 0.5).float() == age).float().mean()
            self.log("val_bce", bce, on_epoch=True, batch_size=len(age), sync_dist=True)
            self.log("val_acc", acc, on_epoch=True, batch_size=len(age), sync_dist=True)
            err = (prob - age).abs()
        else:
            err = (pred.float() - age).abs()
        self._val_abs.append(err.detach())  # val_mae is logged once per epoch, over all ranks' errors

    def on_validation_epoch_start(self) -> None:
        self._val_abs = []

    def on_validation_epoch_end(self) -> None:
        """The exact MAE over the whole validation set, however DDP split it: the ranks' error sums and counts
        are added up. (``sync_dist`` averages per-rank means with an integer batch-size count, which is wrong
        when the ranks hold different numbers of images, as they do without the sampler's padding.)"""
        errors = torch.cat(self._val_abs) if self._val_abs else torch.zeros(0, device=self.device)
        self._val_abs = []
        totals = torch.stack([errors.sum(), torch.tensor(float(errors.numel()), device=errors.device)])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        if float(totals[1]) > 0:  # equal on all ranks after the reduction; sync_dist keeps Lightning quiet
            self.log("val_mae", totals[0] / totals[1], prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        """The optimiser and LR decay of the current phase (Lightning calls this at the start of fit, and
        ``on_train_epoch_start`` calls it again through the strategy at the phase boundary)."""
        t, f = self.cfg.train, self.cfg.finetune
        resuming = self._restored_phase is not None
        if self._restored_phase is not None:
            phase, self._restored_phase = self._restored_phase, None
        else:
            phase = self.phase_for_epoch(self.current_epoch)
        trainable = self.apply_phase(phase)
        params = [p for p in self.parameters() if p.requires_grad]
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        steps_per_epoch = max(1, total // epochs)
        if phase == 1:
            name, lr, warmup_epochs = f.head_optimizer, f.head_lr, 0.0
            steps = min(f.head_epochs, epochs) * steps_per_epoch
        else:
            name, lr, warmup_epochs = t.optimizer, t.lr, t.warmup_epochs
            steps = total if phase == 0 else max(1, epochs - f.head_epochs) * steps_per_epoch
        opt = make_optimizer(name, params, lr, t.weight_decay, t.momentum)
        warmup = int(warmup_epochs * steps_per_epoch)
        schedule = lr_lambda(t.schedule, max(1, steps), warmup, t.final_lr_factor)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        self.phase = phase
        if not resuming and self.phase_log and self.phase_log[-1]["from_epoch"] == self.current_epoch:
            self.phase_log.pop()  # replaced before it trained an epoch (a resume that lands on the boundary)
        self.phase_log.append(
            {
                "phase": phase,
                "from_epoch": None if resuming else self.current_epoch,  # a resume fills it in at epoch start
                "optimizer": name,
                "lr": lr,
                "trainable_params": trainable,
            }
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def parse_layers(value: str | int) -> int | str:
    """``finetune.layers``: a positive whole number, or ``all``."""
    text = str(value).strip().lower()
    if text == "all":
        return "all"
    if not text.isdigit() or int(text) < 1:
        raise BoneAgeInputError(f"finetune.layers must be a positive whole number or 'all', got {value!r}")
    return int(text)


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, wd: float, momentum: float) -> Any:
    kind = name.lower()
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, nesterov=True)
    raise BoneAgeInputError(f"unknown optimizer {name!r} (adam, adamw or sgd)")


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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


def _launch_rank() -> int:
    """Global rank from the launcher's environment (torchrun RANK, SLURM_PROCID, Lightning's LOCAL_RANK),
    known before the Trainer exists; 0 for a single process."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def quiet_lightning() -> None:
    """Command-line training: keep Lightning's info lines and known-harmless warnings off the terminal."""
    import logging
    import warnings

    # this module imported lightning.pytorch, which sets these loggers to INFO: lower them afterwards
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


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
    if _launch_rank() == 0:  # DDP: every rank runs train(); one writes the run files
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
    if _launch_rank() == 0:
        (run / "run.json").write_text(json.dumps(facts, indent=2))

    dm = make_datamodule(cfg, progress=progress)
    dm.setup("fit")
    mean, std = dm.target_stats
    module = BoneAgeModule(cfg.to_dict(), age_mean=mean, age_std=std)
    module.model.to(memory_format=torch.channels_last)
    if cfg.trainer.compile:
        module.model.compile()  # in place: state_dict keys, and so checkpoints, stay those of the plain model

    checkpoint = ModelCheckpoint(
        dirpath=run,
        filename="best",
        monitor="val_mae",
        mode="min",
        save_top_k=1,
        enable_version_counter=False,
    )
    # Lightning's save_last writes last.ckpt only when the monitored metric improved; resuming after a kill
    # needs the newest epoch every time, so a second, unmonitored callback keeps it.
    latest = ModelCheckpoint(dirpath=run, filename="last", save_top_k=1, enable_version_counter=False)
    cbs: list[Callback] = [checkpoint, latest, EpochMetrics(run / "metrics.csv")]
    cbs.append(LearningRateMonitor("epoch"))
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
    previous = _read_json(run / "summary.json") if resume else {}
    started = time.time()
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    best = checkpoint.best_model_score
    fit_seconds = round(time.time() - started, 1)
    summary = {
        **facts,
        "resumed_from": resume,
        "interrupted": bool(trainer.interrupted),
        "epochs_completed": trainer.current_epoch,
        "finished": not trainer.interrupted and trainer.current_epoch >= cfg.train.epochs,
        "best_val_mae": float(best) if best is not None else None,
        "best_checkpoint": str(run / "best.ckpt"),
        "train_images": len(dm.train_set),
        "val_images": len(dm.val_set),
        "fit_seconds": fit_seconds,
        "total_fit_seconds": round(float(previous.get("total_fit_seconds") or 0) + fit_seconds, 1),
        "init": module.model.init_report,
        "phases": module.phase_log,
    }
    if trainer.is_global_zero:
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
