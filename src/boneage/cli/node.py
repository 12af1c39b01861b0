"""``boneage node``: run the DICOM node (see ``boneage.dicom`` and docs/dicom-node.md).

Every option is checked before the model loads or a port opens: a mistake is one line on stderr and exit
code 2, as for every other command. Logs go to stderr, one ``key=value`` line per step (systemd's journal
keeps them). SIGTERM and SIGINT drain the node (no new associations, finish what was received, send once
more) and exit 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from boneage.cli._common import exit_on_user_error
from boneage.errors import BoneAgeInputError


def _log_setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("boneage.node")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    # pynetdicom's own messages only when something is wrong (its debug dumps would print patient names)
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)


def _check_spool(spool: Path) -> Path:
    try:
        spool.mkdir(parents=True, exist_ok=True)
        probe = spool / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BoneAgeInputError(f"spool folder is not writable ({exc.strerror or exc})", spool) from None
    return spool


@exit_on_user_error
def node_command(
    destination: Annotated[
        str,
        typer.Option(
            help="where results go: AET@host:port for C-STORE (e.g. PACS@10.0.0.5:104), or a DICOMweb base "
            "URL for STOW-RS (e.g. http://pacs:8042/dicom-web)",
            show_default=False,
        ),
    ],
    spool: Annotated[
        Path, typer.Option(help="folder for received instances, results waiting to be sent, and the ledger")
    ],
    aet: Annotated[str, typer.Option(help="this node's AE title")] = "BONEAGE",
    port: Annotated[int, typer.Option(help="DICOM port to listen on")] = 11112,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "0.0.0.0",
    allow_aet: Annotated[
        list[str] | None, typer.Option(help="calling AE title allowed to connect (repeat; default: any)")
    ] = None,
    workers: Annotated[int, typer.Option(help="images assessed in parallel (0: one per core)")] = 0,
    checkpoint: Annotated[Path | None, typer.Option(help="model bundle (default: the bundled model)")] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="site calibration from `boneage calibrate`, applied to every result")
    ] = None,
    max_pending: Annotated[
        int, typer.Option(help="instances received but not yet sent before new ones are refused")
    ] = 1000,
    max_spool_mb: Annotated[int, typer.Option(help="bytes those may hold, in MiB")] = 4096,
    retry_max: Annotated[
        float, typer.Option(help="longest wait between sends to a destination that is down, s")
    ] = 300.0,
    drain_timeout: Annotated[float, typer.Option(help="seconds SIGTERM waits for work in progress")] = 30.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Run as a DICOM node: receive hand radiographs (C-STORE), send back a Secondary Capture and a
    Structured Report into the same study. Research use only, not a medical device."""
    from boneage.dicom.node import Node, NodeConfig, parse_destination

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise BoneAgeInputError(f"--log-level {log_level!r}: debug, info, warning or error")
    if max_spool_mb < 1:
        raise BoneAgeInputError("--max-spool-mb must be at least 1")
    if retry_max <= 0 or drain_timeout < 0:
        raise BoneAgeInputError("--retry-max must be positive and --drain-timeout not negative")
    if checkpoint is not None and not checkpoint.is_file():
        raise BoneAgeInputError("checkpoint not found", checkpoint)
    if calibration is not None:  # a damaged file fails here, before the node listens
        from boneage.growth import Calibration

        Calibration.load(calibration)
    config = NodeConfig(
        destination=parse_destination(destination),
        spool=_check_spool(spool),
        aet=aet,
        host=host,
        port=port,
        allow_aets=list(allow_aet or []),
        workers=workers,
        checkpoint=checkpoint,
        calibration=calibration,
        max_pending=max_pending,
        max_spool_bytes=max_spool_mb << 20,
        retry_max=retry_max,
        retry_base=min(2.0, retry_max),
        drain_timeout=drain_timeout,
    )
    _log_setup(log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node = Node(config)
    node.start()
    while not stop.wait(3600):
        pass
    node.stop()
