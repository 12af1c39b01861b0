"""Training on Lightning: MAE loss, the configured optimiser and LR decay, checkpoints, logs and resume.

``train(config, run_dir)`` is the whole job; the CLI and notebooks call it. A run folder holds the resolved
config, run facts (seed, git commit, versions), per-epoch metrics, best.ckpt and last.ckpt.
"""

from __future__ import annotations

import csv
import logging
import math
import platform
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from boneage.config import AugmentConfig, Config, FinetuneConfig, TrainConfig
from boneage.data.augment import Augment
from boneage.data.datamodule import make_datamodule, to_float
from boneage.data.shards import decode_batch
from boneage.errors import BoneAgeInputError
from boneage.modelfile.format import rename_legacy_head
from boneage.models.init import build_model
from boneage.models.surgery import freeze_all_but
from boneage.spec import ModelSpec
from boneage.train.runs import RunDir

log = logging.getLogger(__name__)


class BoneAgeModule(L.LightningModule):
    """Loss, optimiser phases and metrics around ``BoneAgeNet``.

    Each part gets its own section: the network its ``ModelSpec`` (the only model record a checkpoint's
    consumers read), the loop the ``train`` and ``finetune`` sections, the augmentation its own.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        train: dict[str, Any] | None = None,
        finetune: dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
        pretrained: str = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.spec = ModelSpec.parse(spec)
        self.train_cfg = TrainConfig.model_validate(train or {})
        self.finetune_cfg = FinetuneConfig.model_validate(finetune or {})
        self.classification = self.spec.task == "classification"
        if self.classification:  # the network's output is then the logit itself
            self.spec.target_mean, self.spec.target_std = 0.0, 1.0
        self.model = build_model(self.spec, pretrained, self.train_cfg.label_sigma)
        self.augment = Augment(AugmentConfig.model_validate(augment or {}))
        self._val_abs: list[torch.Tensor] = []
        self._holdout_abs: list[torch.Tensor] = []
        # the phase the current optimiser was built for: 0 single phase, 1 head only, 2 fine-tuning
        self.phase = 0
        self.phase_log: list[dict[str, Any]] = []
        self._restored_phase: int | None = None

    @classmethod
    def from_config(cls, cfg: Config, target_mean: float = 127.0, target_std: float = 41.0) -> BoneAgeModule:
        """The module of a run config: each part gets its own section."""
        return cls(
            cfg.model_spec(target_mean, target_std).model_dump(),
            train=cfg.train.model_dump(),
            finetune=cfg.finetune.model_dump(),
            augment=cfg.augment.model_dump(),
            pretrained=cfg.model.pretrained,
        )

    # ---- fine-tuning phases --------------------------------------------------------------------------
    def phase_for_epoch(self, epoch: int) -> int:
        head = self.finetune_cfg.head_epochs
        if head <= 0:
            return 0
        return 1 if epoch < head else 2

    def apply_phase(self, phase: int) -> int:
        """Set ``requires_grad`` for a phase; returns the number of trainable parameters."""
        if phase == 1:
            self.model.requires_grad_(True)
            self.model.backbone.requires_grad_(False)
            return sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return freeze_all_but(self.model, self.finetune_cfg.layers)

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
        # the spec with this run's target statistics: what Predictor and bundling read
        checkpoint["boneage_spec"] = self.current_spec().model_dump()
        # a resumed run continues the same random stream (augmentation parameters, dropout, shuffling)
        checkpoint["boneage_rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def current_spec(self) -> ModelSpec:
        spec = self.spec.model_copy(deep=True)
        spec.target_mean = float(self.model.age_mean)
        spec.target_std = float(self.model.age_std)
        return spec

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # v0.1 checkpoints name head layers by Sequential index: rename them to this model's names
        for key in ("state_dict", "current_model_state"):
            if key in checkpoint:
                inner = {k[len("model.") :]: v for k, v in checkpoint[key].items() if k.startswith("model.")}
                other = {k: v for k, v in checkpoint[key].items() if not k.startswith("model.")}
                checkpoint[key] = {**other, **{f"model.{k}": v for k, v in rename_legacy_head(inner).items()}}
        rng = checkpoint.get("boneage_rng")
        if rng:  # now, before the resumed epoch's data loader draws its shuffling seed
            torch.set_rng_state(rng["torch"])
            np.random.set_state(_numpy_state_from_plain(rng["numpy"]))
            random.setstate(rng["python"])
            if rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        # called before configure_optimizers on resume, so the optimiser is rebuilt for the saved state
        saved = checkpoint.get("boneage_phase")
        self._restored_phase = int(saved) if saved is not None else self.phase_for_epoch(checkpoint["epoch"])

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        return self.model(image, male)

    def on_fit_start(self) -> None:
        # every rank starts from the same seed (identical weights); from here on ranks > 0 draw their own
        # augmentation parameters and dropout masks instead of repeating rank 0's on different images
        if self.trainer.world_size > 1 and self.trainer.global_rank > 0:
            torch.manual_seed(self.train_cfg.seed + 7919 * self.trainer.global_rank)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, male, age = batch
        # shard caches with data.decode=device hand over encoded JPEGs: nvJPEG decodes the batch on the GPU
        images = to_float(decode_batch(images, self.device))
        if self.trainer is not None and self.trainer.training:
            size = self.train_size(self.current_epoch, images.shape[-1])
            if size != images.shape[-1]:  # progressive resizing: an early epoch trains on smaller inputs
                images = torch.nn.functional.interpolate(
                    images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
                )
            images = self.augment(images)
        return images.contiguous(memory_format=torch.channels_last), male, age

    def train_size(self, epoch: int, full: int) -> int:
        """``train.size_schedule``'s input size for ``epoch`` (the latest entry at or before it)."""
        schedule = self.train_cfg.size_schedule
        starts = sorted(int(k) for k in schedule if int(k) <= epoch)
        return int(schedule[starts[-1]]) if starts else full

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, male, age = batch
        if self.model.age_bins:
            loss, pred = self.distribution_loss(images, male, age)
            mae = (pred.detach() - age).abs().mean()
        elif self.classification:  # age holds the 0/1 label; "MAE" is that of the predicted probability
            pred = self(images, male)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(pred, age)
            mae = (torch.sigmoid(pred.detach()) - age).abs().mean()
        else:
            pred = self(images, male)
            # L1 on normalised targets: the same optimum as MAE in months, at a scale the optimiser likes
            loss = torch.nn.functional.l1_loss(pred, age) / self.model.age_std
            mae = (pred.detach() - age).abs().mean()
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(age))
        self.log("train_mae", mae, on_step=False, on_epoch=True, batch_size=len(age))
        return loss

    def distribution_loss(
        self, images: torch.Tensor, male: torch.Tensor, age: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DLDL-v2: KL divergence from each age's Gaussian label distribution (``train.label_sigma``
        months) to the softmax over the bins, plus L1 of the expected age on the normalised scale (the L1
        alone is the plain model's loss); returns (loss, expected age in months)."""
        out, _ = self.model.head_output(images, male)
        log_p = torch.log_softmax(out.float(), dim=1)
        centres = self.model.age_centres
        target = torch.softmax(
            -((centres[None, :] - age.float()[:, None]) ** 2) / (2 * self.train_cfg.label_sigma**2), dim=1
        )
        kl = torch.nn.functional.kl_div(log_p, target, reduction="batchmean")
        months = self.model.to_months(out)
        return kl + torch.nn.functional.l1_loss(months, age.float()) / self.model.age_std, months

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
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
        # val_mae (and holdout_mae, the never-trained-on set of data.holdout_labels) is logged once per
        # epoch, over all ranks' errors
        (self._holdout_abs if dataloader_idx == 1 else self._val_abs).append(err.detach())

    def on_validation_epoch_start(self) -> None:
        self._val_abs = []
        self._holdout_abs = []

    def on_validation_epoch_end(self) -> None:
        """The exact MAE over the whole validation set, however DDP split it: the ranks' error sums and counts
        are added up. (``sync_dist`` averages per-rank means with an integer batch-size count, which is wrong
        when the ranks hold different numbers of images, as they do without the sampler's padding.)"""
        for name, parts in (("val_mae", self._val_abs), ("holdout_mae", self._holdout_abs)):
            errors = torch.cat(parts) if parts else torch.zeros(0, device=self.device)
            totals = torch.stack([errors.sum(), torch.tensor(float(errors.numel()), device=errors.device)])
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
            if float(totals[1]) > 0:  # equal on all ranks after the reduction; sync_dist keeps it quiet
                self.log(name, totals[0] / totals[1], prog_bar=name == "val_mae", sync_dist=True)
        self._val_abs, self._holdout_abs = [], []

    def configure_optimizers(self) -> Any:
        """The optimiser and LR decay of the current phase (Lightning calls this at the start of fit, and
        ``on_train_epoch_start`` calls it again through the strategy at the phase boundary)."""
        t, f = self.train_cfg, self.finetune_cfg
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


def _numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    """NumPy's RNG state as plain values: checkpoints stay loadable with ``torch.load(weights_only=True)``."""
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_plain(d: dict[str, Any]) -> tuple:
    keys = np.asarray(d["keys"].numpy(), dtype=np.uint32)
    return (d["name"], keys, d["pos"], d["has_gauss"], d["cached"])


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, wd: float, momentum: float) -> Any:
    """timm's optimizer factory (``sgd`` is Nesterov SGD there, as the talk's Keras SGD fine-tuning)."""
    from timm.optim import create_optimizer_v2

    kind = name.lower()
    if kind not in {"adam", "adamw", "sgd"}:
        raise BoneAgeInputError(f"unknown optimizer {name!r} (adam, adamw or sgd)")
    extra = {"momentum": momentum} if kind == "sgd" else {}
    return create_optimizer_v2(params, opt=kind, lr=lr, weight_decay=wd, **extra)


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

    fields = ["epoch", "step", "train_loss", "train_mae", "val_mae", "holdout_mae", "lr", "elapsed_s"]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = time.time() - self._elapsed_before(path)

    @staticmethod
    def _elapsed_before(path: Path) -> float:
        """A resumed run counts on from the last recorded epoch, so elapsed_s is the run's training time."""
        try:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            return float(rows[-1]["elapsed_s"]) if rows else 0.0
        except (OSError, KeyError, ValueError, IndexError):
            return 0.0

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
            "holdout_mae": _num(m.get("holdout_mae")),
            "lr": lr,
            "elapsed_s": round(time.time() - self.start, 3),
        }
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerow(row)


def _num(value: Any) -> float | str:
    return round(float(value), 4) if value is not None else ""


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


def train(
    cfg: Config, run_dir: str | Path, *, progress: bool = True, callbacks: list[Callback] | None = None
) -> dict[str, Any]:
    """Train (or resume) into ``run_dir``; returns the summary also written to ``run_dir/summary.json``.

    The summary is written however fit ends: ``finished``, ``interrupted`` (Ctrl-C, a killed session's
    SIGTERM) or ``failed`` (the exception is re-raised after it is recorded).
    """
    run = RunDir(run_dir).create()
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    rank0 = _launch_rank() == 0  # DDP: every rank runs train(); one writes the run files
    facts = {
        "name": cfg.name,
        "seed": cfg.train.seed,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else platform.processor() or "cpu",
    }
    if rank0:
        run.write_config(cfg)
        facts = run.write_facts(**facts)

    if cfg.data.source == "mura" and cfg.model.task != "classification":
        log.warning("data.source=mura has 0/1 labels; set model.task=classification to train with BCE")
    dm = make_datamodule(cfg.data, cfg.preprocess, cfg.train, cfg.trainer, progress=progress)
    dm.setup("fit")
    mean, std = dm.target_stats
    module = BoneAgeModule.from_config(cfg, mean, std)
    module.model.to(memory_format=torch.channels_last)
    if cfg.trainer.compile:
        module.model.compile()  # in place: state_dict keys, and so checkpoints, stay those of the plain model

    checkpoint = ModelCheckpoint(
        dirpath=run.path,
        filename="best",
        monitor="val_mae",
        mode="min",
        save_top_k=1,
        enable_version_counter=False,
    )
    # Lightning's save_last writes last.ckpt only when the monitored metric improved; resuming after a kill
    # needs the newest epoch every time, so a second, unmonitored callback keeps it.
    latest = ModelCheckpoint(dirpath=run.path, filename="last", save_top_k=1, enable_version_counter=False)
    cbs: list[Callback] = [checkpoint, latest, EpochMetrics(run / "metrics.csv")]
    cbs.append(LearningRateMonitor("epoch"))
    if cfg.train.ema_decay > 0:
        # Lightning's EMA callback validates with the averaged weights and saves them as the checkpoint's
        # state_dict (the raw weights ride along for resuming), so best.ckpt and the bundle are the EMA model
        from lightning.pytorch.callbacks import EMAWeightAveraging

        cbs.append(EMAWeightAveraging(decay=cfg.train.ema_decay))
    if progress and cfg.trainer.progress_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        cbs.append(RichProgressBar())
    cbs += callbacks or []
    t = cfg.trainer
    accelerator, precision = _device_settings(cfg)
    trainer = L.Trainer(
        default_root_dir=run.path,
        max_epochs=cfg.train.epochs,
        accelerator=accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        callbacks=cbs,
        logger=[
            TensorBoardLogger(run.path, name="tensorboard", version=""),
            CSVLogger(run.path, name="logs", version=""),
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
    parent = parent_seed(cfg.model.pretrained, cfg.train.seed) if rank0 else None  # DDP: warn once
    if parent is not None:
        module.model.init_report["parent_train_seed"] = parent
    previous = run.summary if resume else {}
    # a session killed outright (SIGKILL at its time limit) never writes summary.json; metrics.csv still
    # holds the training time up to its last finished epoch, so the total counts it either way
    before = (
        max(float(previous.get("total_fit_seconds") or 0), EpochMetrics._elapsed_before(run / "metrics.csv"))
        if resume
        else 0.0
    )
    started = time.time()
    status, error = "running", None

    def record() -> dict[str, Any]:
        best = checkpoint.best_model_score
        fit_seconds = round(time.time() - started, 1)
        summary = {
            **facts,
            "status": status,
            "error": error,
            "resumed_from": resume,
            "interrupted": status == "interrupted",
            "epochs_completed": trainer.current_epoch,
            "finished": status == "finished",
            "best_val_mae": float(best) if best is not None else None,
            "best_checkpoint": str(run / "best.ckpt"),
            "train_images": len(dm.train_set),
            "val_images": len(dm.val_set),
            "holdout_images": len(dm.holdout_set) if dm.holdout_set is not None else 0,
            "fit_seconds": fit_seconds,
            "total_fit_seconds": round(before + fit_seconds, 1),
            "init": module.model.init_report,
            "phases": module.phase_log,
        }
        if trainer.is_global_zero:
            run.write_summary(summary)
        return summary

    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
    except (KeyboardInterrupt, SystemExit):
        # Lightning turns Ctrl-C/SIGTERM into trainer.interrupted (and may exit): record it either way
        status = "interrupted"
        record()
        raise
    except BaseException as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        record()
        raise
    status = "interrupted" if trainer.interrupted or trainer.current_epoch < cfg.train.epochs else "finished"
    return record()


def parent_seed(pretrained: str | None, seed: int) -> int | None:
    """The ``train.seed`` of the run whose Lightning checkpoint ``pretrained`` names (None for ImageNet, a
    bundle or a foreign file), with a warning when it equals ``seed``. Why: training here is deterministic,
    so a cycle started from its parent's checkpoint with the parent's seed draws the parent's first-epoch
    order and augmentation again, views the weights partly memorised: v0.13's last weights scored 5.89
    months on the first quarter of that stream and 6.33 on seed 7's (``docs/research-log.md``, replay check),
    so the new cycle's training MAE falls at once without the model generalising better."""
    init = str(pretrained or "").strip()
    path = Path(init).expanduser()
    if path.suffix != ".ckpt" or not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        found = int(blob["hyper_parameters"]["train"]["seed"])
    except Exception:  # not one of this project's checkpoints: nothing to compare
        return None
    if found == seed:
        log.warning(
            "model.pretrained=%s was trained with train.seed=%d, this run's seed: its first epoch replays "
            "the parent's order and augmentation draws; set a train.seed the parent did not use",
            init,
            seed,
        )
    return found


def _device_settings(cfg: Config) -> tuple[str, str]:
    """Accelerator and precision, falling back cleanly on a CPU-only machine: a GPU-only precision on the
    CPU becomes 32-bit (with a log line); asking for a GPU that is not there is one readable error."""
    t = cfg.trainer
    has_cuda = torch.cuda.is_available()
    if t.accelerator in {"gpu", "cuda"} and not has_cuda:
        raise BoneAgeInputError(
            f"trainer.accelerator={t.accelerator} but no CUDA device is visible; use trainer.accelerator=cpu "
            "or auto"
        )
    on_cpu = t.accelerator == "cpu" or not has_cuda
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if not on_cpu or cpu_has_bf16() else "32-true"
    elif on_cpu and precision in {"16-mixed", "16-true"}:
        log.warning("trainer.precision=%s needs a GPU; training in 32-bit on the CPU", precision)
        precision = "32-true"
    elif on_cpu and precision.startswith("bf16") and not cpu_has_bf16():
        log.warning(
            "trainer.precision=%s: this CPU has no native bf16 (AVX512-BF16/AMX), where it is slower than "
            "32-bit; training in 32-bit",
            precision,
        )
        precision = "32-true"
    return t.accelerator, precision


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units: there, bf16 autocast trained EfficientNet-Lite0 ~1.7x faster than fp32
    (docs/research-log.md); without them it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))
