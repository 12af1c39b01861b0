"""``boneage cache build`` and ``boneage cache verify``: the command line over :mod:`boneage.data.shards`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from boneage.cli._common import exit_on_user_error
from boneage.data.shards import DEFAULT_SHARD_MB, ShardCache, build_cache
from boneage.errors import BoneAgeInputError

cache_app = typer.Typer(
    no_args_is_help=True,
    help="Shard caches of preprocessed radiographs: build once, train anywhere from the cache alone.",
)


@cache_app.command("build")
@exit_on_user_error
def build_command(
    out: Annotated[Path, typer.Option(help="cache folder (created; re-running adds only new ids)")],
    images: Annotated[Path | None, typer.Option(help="radiographs (default: config data.images)")] = None,
    labels: Annotated[Path | None, typer.Option(help="label CSV (default: config data.labels)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config whose preprocess section to use")] = None,
    size: Annotated[int | None, typer.Option(help="output size in pixels (default 512)")] = None,
    crop: Annotated[bool | None, typer.Option("--crop/--no-crop", help="crop to the hand")] = None,
    contrast: Annotated[str | None, typer.Option(help="percentile, clahe or none")] = None,
    low_percentile: Annotated[float | None, typer.Option(help="percentile contrast: low end")] = None,
    high_percentile: Annotated[float | None, typer.Option(help="percentile contrast: high end")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jpeg (compact), png or raw (lossless)")] = "jpeg",
    quality: Annotated[int, typer.Option(help="JPEG quality 1-100")] = 95,
    workers: Annotated[int, typer.Option(help="parallel processes")] = max(1, (os.cpu_count() or 2) - 1),
    shard_mb: Annotated[float, typer.Option(help="start a new shard after this many MiB")] = DEFAULT_SHARD_MB,
    limit: Annotated[int, typer.Option(help="only the first N labelled images (0: all)")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Preprocess a labelled dataset (crop, contrast, letterbox) into compact, checksummed shards."""
    from boneage.config import load_config
    from boneage.data.preprocess import Preprocess

    cfg = load_config(config)
    p = cfg.preprocess
    given = {
        "size": size,
        "crop": crop,
        "contrast": contrast,
        "low_percentile": low_percentile,
        "high_percentile": high_percentile,
    }
    fields = {**{k: getattr(p, k) for k in given}, **{k: v for k, v in given.items() if v is not None}}
    try:
        prep = Preprocess(**fields)
    except ValueError as exc:
        raise BoneAgeInputError(str(exc)) from None
    images = images or Path(cfg.data.images)
    labels = labels or Path(cfg.data.labels)
    report = build_cache(
        out,
        prep,
        labels,
        images,
        fmt=fmt,
        quality=quality,
        workers=workers,
        shard_mb=shard_mb,
        limit=limit,
        progress=progress,
    )
    for image_id, message in report.failed:
        typer.echo(f"failed: {image_id}: {message}", err=True)
    typer.echo(
        f"{report.added} added, {report.already} already cached ({report.relabelled} relabelled), "
        f"{len(report.failed)} failed in {report.seconds:.1f} s; {out}: {report.count} images, "
        f"{report.bytes / 2**20:.1f} MiB in {len(ShardCache(out).manifest['shards'])} shard(s)"
    )
    if report.failed:
        raise typer.Exit(2)


@cache_app.command("verify")
@exit_on_user_error
def verify_command(
    cache: Annotated[Path, typer.Argument(help="cache folder")],
    drop_corrupt: Annotated[
        bool, typer.Option(help="forget and delete damaged shards so `cache build` re-adds their images")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Check every shard's size and sha256 against the manifest; exit 2 naming any damaged shard."""
    store = ShardCache(cache)
    problems = store.verify(full=True)
    info = {**store.describe(), "ok": not problems, "problems": problems}
    if drop_corrupt and problems:
        bad = [Path(p.split(": ", 1)[0]).name for p in problems]
        info["dropped"] = store.drop(bad)
        info["count_after_drop"] = store.count
    if as_json:
        typer.echo(json.dumps(info))
    else:
        state = "ok" if not problems else f"{len(problems)} problem(s)"
        typer.echo(
            f"{cache}: {info['count']} images, {info['mib']} MiB in {info['shards']} shard(s), "
            f"{info['size']} px {info['format']}; {state}"
        )
        for line in problems:
            typer.echo(f"  {line}", err=True)
        if info.get("dropped"):
            typer.echo(f"dropped {info['dropped']} shard(s); `boneage cache build` re-adds their images")
    if problems and not drop_corrupt:
        raise typer.Exit(2)
