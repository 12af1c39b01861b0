"""``boneage node``: a DICOM application entity that assesses hand radiographs as a PACS forwards them.

Three kinds of threads share one :class:`~boneage.dicom.spool.Spool`:

- **associations** (pynetdicom, one thread each): C-ECHO, and C-STORE of CR, DX and Secondary Capture
  images. A C-STORE is acknowledged only after the instance is written durably; the same SOP Instance
  received again is acknowledged and skipped; a full spool answers "out of resources" (0xA700) and refuses
  new associations (A-ASSOCIATE-RJ, transient, local limit exceeded) instead of accepting and dropping.
- **workers** (``workers``, default one per core): assess each received instance once
  (:func:`boneage.dicom.worker.process`) and put its result objects in the outbox.
- **sender** (one): sends what is in the outbox to the destination by C-STORE, retrying with exponential
  backoff while the destination is down; the outbox survives restarts.

Every step logs one ``key=value`` line on the ``boneage.node`` logger (received, duplicate, assessed,
refused, sent, retry, ...), with UIDs, never patient names. No exception from an image, a peer or the
destination ends the node.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boneage.errors import BoneAgeInputError

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "RESULT_SOP_CLASSES",
    "Destination",
    "Node",
    "NodeConfig",
    "accepted_transfer_syntaxes",
    "kv",
    "parse_destination",
]

LOG = logging.getLogger("boneage.node")

#: The storage SOP classes a hand radiograph arrives in.
ACCEPTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
#: What the node sends: the result page and the structured report.
RESULT_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
}
_UNCOMPRESSED = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)
_COMPRESSED = (
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Process 14, Selection Value 1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
_OK_STATUSES = {
    0x0000,
    0xB000,
    0xB006,
    0xB007,
}  # success and the storage warnings (coerced, elements dropped)
_OUT_OF_RESOURCES = 0xA700
_CANNOT_UNDERSTAND = 0xC000
_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash, no control chars


def _stow_failures(answer: bytes) -> int:
    """How many objects a STOW-RS response lists in its Failed SOP Sequence (0008,1198); an answer that is
    not the DICOM JSON we asked for counts as one failure."""
    import json

    try:
        body = json.loads(answer or b"{}")
        return len((body.get("00081198") or {}).get("Value") or [])
    except (ValueError, AttributeError):
        return 1


def accepted_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes, and each compressed one that an installed pydicom pixel-data plugin decodes:
    accepting an image we could not decode would only turn into a "not assessed" result."""
    from pydicom.pixels import get_decoder

    out = list(_UNCOMPRESSED)
    for uid in _COMPRESSED:
        try:
            if get_decoder(uid).is_available:
                out.append(uid)
        except Exception:
            continue
    return out


def kv(**fields: Any) -> str:
    """``key=value`` pairs for one log line; values with spaces or quotes are quoted, None is left out."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c in text for c in ' "=\n\t'):
            text = '"' + " ".join(text.replace('"', "'").split()) + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    LOG.log(level, kv(event=event, **fields))


def check_aet(value: str, what: str) -> str:
    text = str(value).strip()
    if not _AET.match(text):
        raise BoneAgeInputError(
            f"{what} {value!r} is not a DICOM AE title (1 to 16 characters, no backslash)"
        )
    return text


@dataclass(frozen=True)
class Destination:
    """Where results go: a C-STORE SCP (the PACS), or a DICOMweb server's STOW-RS endpoint (``url``)."""

    aet: str = ""
    host: str = ""
    port: int = 0
    url: str | None = None  # DICOMweb base URL, e.g. http://pacs:8042/dicom-web

    def __str__(self) -> str:
        return self.url if self.url else f"{self.aet}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """``AET@host:port`` (e.g. ``ORTHANC@127.0.0.1:4242``) for C-STORE, or an ``http(s)://`` DICOMweb base
    URL for STOW-RS; anything else is a one-line error."""
    text = str(text).strip()
    if text.lower().startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        parts = urlsplit(text)
        if not parts.hostname or parts.query or parts.fragment:
            raise BoneAgeInputError(
                f"--destination {text!r}: expected a DICOMweb base URL, e.g. http://pacs/dicom-web"
            )
        return Destination(url=text.rstrip("/"))
    match = re.fullmatch(r"([^@]+)@(\[[^\]]+\]|[^:@]+):(\d{1,5})", str(text).strip())
    if not match:
        raise BoneAgeInputError(
            f"--destination {text!r}: expected AET@host:port, e.g. ORTHANC@127.0.0.1:4242"
        )
    aet = check_aet(match.group(1), "--destination AE title")
    port = int(match.group(3))
    if not 1 <= port <= 65535:
        raise BoneAgeInputError(f"--destination {text!r}: port must be 1 to 65535")
    return Destination(aet, match.group(2).strip("[]"), port)


@dataclass
class NodeConfig:
    """Everything ``boneage node`` is told; defaults are what a department would run."""

    destination: Destination
    spool: Path
    aet: str = "BONEAGE"
    host: str = "0.0.0.0"
    port: int = 11112
    allow_aets: list[str] = field(default_factory=list)  # empty: any calling AE title
    workers: int = 0  # 0: one per core
    checkpoint: Path | None = None
    calibration: Path | None = None  # a site calibration (boneage calibrate), applied to every result
    max_pending: int = 1000
    max_spool_bytes: int = 4 << 30
    min_free_bytes: int = 256 << 20
    retry_base: float = 2.0
    retry_max: float = 300.0
    drain_timeout: float = 30.0
    network_timeout: float = 30.0

    def __post_init__(self) -> None:
        self.aet = check_aet(self.aet, "--aet")
        self.allow_aets = [check_aet(a, "--allow-aet") for a in self.allow_aets]
        if not 1 <= int(self.port) <= 65535:
            raise BoneAgeInputError(f"--port {self.port}: must be 1 to 65535")
        if self.workers < 0:
            raise BoneAgeInputError("--workers must be 0 (one per core) or more")
        if self.max_pending < 1:
            raise BoneAgeInputError("--max-pending must be at least 1")
        if not self.workers:
            self.workers = max(1, os.cpu_count() or 1)


class Node:
    """The application entity, its workers and its sender. ``start`` returns once it listens; ``stop``
    drains (no new associations, finish what was received, one last send) within ``drain_timeout``."""

    def __init__(self, config: NodeConfig, predictor: Any | None = None) -> None:
        from boneage.dicom.spool import Spool

        self.config = config
        self.spool = Spool(
            config.spool,
            max_pending=config.max_pending,
            max_bytes=config.max_spool_bytes,
            min_free_bytes=config.min_free_bytes,
        )
        self.predictor = predictor
        self.calibration: Any = None  # loaded with the model, when the config names one
        self._queue: queue.Queue[str] = queue.Queue()
        self._wake_sender = threading.Event()
        self._stopping = threading.Event()
        self._stop_workers = threading.Event()
        self._stop_sender = threading.Event()
        self._threads: list[threading.Thread] = []
        self._full_logged = False
        self._server: Any = None
        self._ae: Any = None
        self.transfer_syntaxes = accepted_transfer_syntaxes()

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Recover the spool, load the model, start the workers and the sender, then listen."""
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        import boneage.dicom.worker  # noqa: F401  (highdicom and the page renderer: not on the first image)

        todo = self.spool.recover()
        if self.predictor is None:
            from boneage.predict import load_predictor

            threads = max(1, (os.cpu_count() or 1) // self.config.workers)
            self.predictor = load_predictor(self.config.checkpoint, engine="onnx", threads=threads)
        if self.config.calibration is not None and self.calibration is None:
            from boneage.growth import Calibration

            self.calibration = Calibration.load(self.config.calibration)
            self.calibration.check_model(self.predictor.info, self.config.calibration)
        for uid in todo["assess"]:
            self._queue.put(uid)
        for i in range(self.config.workers):
            self._spawn(self._work, f"boneage-worker-{i}")
        self._spawn(self._send_loop, "boneage-sender")

        ae = AE(ae_title=self.config.aet)
        ae.maximum_associations = 16
        ae.network_timeout = self.config.network_timeout
        ae.acse_timeout = self.config.network_timeout
        ae.dimse_timeout = self.config.network_timeout
        ae.maximum_pdu_size = 0  # no limit on what we receive
        if self.config.allow_aets:
            ae.require_calling_aet = list(self.config.allow_aets)
        ae.add_supported_context(Verification)
        for sop in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop, self.transfer_syntaxes)
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        try:
            self._server = ae.start_server(
                (self.config.host, self.config.port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            self._halt_threads()
            raise BoneAgeInputError(
                f"cannot listen on {self.config.host}:{self.config.port} ({exc.strerror or exc})"
            ) from None
        self._ae = ae
        counts = self.spool.counts()
        log_event(
            "listening",
            aet=self.config.aet,
            host=self.config.host,
            port=self.config.port,
            destination=self.config.destination,
            workers=self.config.workers,
            model=self.predictor.facts.model_version,
            allow=",".join(self.config.allow_aets) or "any",
            to_assess=len(todo["assess"]),
            to_send=len(todo["send"]),
            sent_before=counts.get("sent", 0),
            transfer_syntaxes=len(self.transfer_syntaxes),
        )

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop: refuse new associations, let open ones finish, assess what was received, send
        once more. Returns True when nothing acknowledged is left unassessed (unsent results stay in the
        outbox for the next start either way)."""
        timeout = self.config.drain_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._stopping.set()
        log_event("draining", pending=self.spool.pending, timeout_s=timeout)
        if self._server is not None:
            self._server.shutdown()  # no new associations; open ones go on
            while self._server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in list(self._server.active_associations):
                assoc.abort()
        # unfinished_tasks counts queued and in-progress instances (task_done comes after the outbox write)
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        drained = not self._queue.unfinished_tasks
        self._stop_workers.set()
        # one last send of what is due, bounded by the deadline
        while self.spool.due() and time.monotonic() < deadline and self._sender_alive():
            self._wake_sender.set()
            time.sleep(0.05)
        self._halt_threads()
        counts = self.spool.counts()
        log_event(
            "stopped",
            drained=drained,
            to_assess=counts.get("received", 0),
            to_send=counts.get("assessed", 0),
        )
        self.spool.close()
        return drained

    def _sender_alive(self) -> bool:
        return any(t.name == "boneage-sender" and t.is_alive() for t in self._threads)

    def _halt_threads(self) -> None:
        self._stop_workers.set()
        self._stop_sender.set()
        self._wake_sender.set()
        for thread in self._threads:
            thread.join(timeout=10)

    # ---- association handlers ------------------------------------------------------------------------
    def _on_requested(self, event: Any) -> None:
        """Refuse an association before it starts when no work can be taken (full spool, shutting down)."""
        try:
            reason = "shutting down" if self._stopping.is_set() else self.spool.full_reason()
            if reason is None:
                self._full_logged = False
                return
            primitive = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ (not negotiated yet)
            log_event(
                "association_refused",
                logging.WARNING,
                calling=str(getattr(primitive, "calling_ae_title", "") or "").strip() or None,
                address=event.assoc.requestor.address,
                reason=f"spool full: {reason}" if reason != "shutting down" else reason,
            )
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, local limit exceeded
            event.assoc.kill()  # as pynetdicom's own rejections do: the A-ASSOCIATE-RJ is sent, then closed
        except Exception as exc:  # never let a handler error take the association thread with a traceback
            log_event("error", logging.ERROR, step="associate", error=type(exc).__name__)

    def _on_rejected(self, event: Any) -> None:
        try:
            requestor = event.assoc.requestor
            allowed = self.config.allow_aets
            reason = (
                "calling AE title not allowed"
                if allowed and requestor.ae_title not in allowed
                else "rejected"
            )
            log_event(
                "association_rejected",
                logging.WARNING,
                calling=requestor.ae_title,
                address=requestor.address,
                reason=reason,
            )
        except Exception:
            pass

    def _on_echo(self, event: Any) -> int:
        log_event("echo", logging.DEBUG, calling=event.assoc.requestor.ae_title)
        return 0x0000

    def _on_store(self, event: Any) -> int:
        """Acknowledge only what is written whole to the spool; a duplicate is acknowledged and skipped."""
        from boneage.dicom.spool import valid_uid

        uid = ""
        try:
            uid = str(event.request.AffectedSOPInstanceUID or "").strip()
            calling = event.assoc.requestor.ae_title
            if not valid_uid(uid):
                log_event("store_failed", logging.WARNING, calling=calling, reason="invalid SOP Instance UID")
                return _CANNOT_UNDERSTAND
            if self._stopping.is_set():
                log_event("store_deferred", sop=uid, calling=calling, reason="node shutting down")
                return _OUT_OF_RESOURCES
            if self.spool.state(uid) is not None:
                log_event("duplicate", sop=uid, calling=calling, state=self.spool.state(uid))
                return 0x0000
            data = event.encoded_dataset(include_meta=True)
            full = self.spool.full_reason(len(data))
            if full:
                if not self._full_logged:
                    log_event("spool_full", logging.WARNING, reason=full, action="refusing new instances")
                    self._full_logged = True
                log_event("store_deferred", sop=uid, calling=calling, reason="spool full")
                return _OUT_OF_RESOURCES
            claim = self.spool.claim(uid)
            if claim == "duplicate":
                log_event("duplicate", sop=uid, calling=calling)
                return 0x0000
            if claim is not None:  # the same instance is arriving on another association right now
                log_event("store_deferred", sop=uid, calling=calling, reason=claim)
                return _OUT_OF_RESOURCES
            study = None
            try:
                study = event.dataset.get("StudyInstanceUID")
            except Exception:
                pass
            self.spool.store(uid, data, study=study, calling=calling)
            self._queue.put(uid)
            log_event(
                "received",
                sop=uid,
                study=study,
                calling=calling,
                sop_class=ACCEPTED_SOP_CLASSES.get(str(event.request.AffectedSOPClassUID), "other"),
                transfer_syntax=event.context.transfer_syntax,
                bytes=len(data),
                pending=self.spool.pending,
            )
            return 0x0000
        except Exception as exc:
            log_event("store_failed", logging.ERROR, sop=uid or None, error=f"{type(exc).__name__}: {exc}")
            return _OUT_OF_RESOURCES

    # ---- workers -------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                uid = self._queue.get(timeout=0.25)
            except queue.Empty:
                if self._stop_workers.is_set():
                    return
                continue
            if self._stop_workers.is_set():  # past the drain deadline: it stays in the spool for next time
                self._queue.task_done()
                return
            try:
                self._assess(uid)
            except Exception as exc:  # disk full while writing results, ...: try again later
                log_event(
                    "error", logging.ERROR, step="assess", sop=uid, error=f"{type(exc).__name__}: {exc}"
                )
                if not self._stop_workers.is_set():
                    timer = threading.Timer(30.0, self._queue.put, args=(uid,))
                    timer.daemon = True
                    timer.start()
            finally:
                self._queue.task_done()

    def _assess(self, uid: str) -> None:
        from boneage.dicom.worker import process

        if self.spool.state(uid) != "received":
            return  # queued twice (recovery and a retry): done already
        attempts = self.spool.begin_assessment(uid)
        start = time.monotonic()
        outcome = process(
            self.spool.incoming_path(uid),
            self.predictor,
            attempts=attempts,
            station=self.config.aet,
            calibration=self.calibration,
        )
        seconds = round(time.monotonic() - start, 3)
        if outcome.files:
            self.spool.put_results(uid, outcome.files, outcome=outcome.kind, detail=outcome.detail)
            self._wake_sender.set()
        else:
            self.spool.finish_without_results(uid, outcome=outcome.kind, detail=outcome.detail)
        if outcome.kind == "assessed":
            log_event("assessed", sop=uid, seconds=seconds, **outcome.log)
        elif outcome.kind == "refused":
            log_event("refused", sop=uid, seconds=seconds, reason=outcome.detail, **outcome.log)
        else:
            log_event("ignored", sop=uid, reason=outcome.detail)

    # ---- sender --------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stop_sender.is_set():
            try:
                due = self.spool.due(limit=20)
                if due:
                    self._send(due)
                    continue
                nxt = self.spool.next_due()
                wait = 1.0 if nxt is None else max(0.02, min(1.0, nxt - time.time()))
                self._wake_sender.wait(wait)
                self._wake_sender.clear()
            except Exception as exc:
                log_event("error", logging.ERROR, step="send", error=f"{type(exc).__name__}: {exc}")
                self._stop_sender.wait(1.0)

    def _backoff(self, attempts: int) -> float:
        return min(self.config.retry_max, self.config.retry_base * (2 ** max(0, attempts)))

    def _retry(self, uid: str, attempts: int, error: str) -> None:
        delay = self._backoff(attempts)
        failed = self.spool.mark_retry(uid, delay)
        # a destination down for a day must not flood the log: the first attempts, then every tenth
        level = logging.WARNING if failed <= 3 or failed % 10 == 0 else logging.DEBUG
        log_event(
            "retry",
            level,
            sop=uid,
            attempt=failed,
            next_in_s=round(delay, 1),
            destination=self.config.destination,
            error=error,
        )

    def _sent(self, item: Any, files: list[Path], dest: Destination) -> None:
        self.spool.mark_sent(item.uid)
        log_event(
            "sent",
            sop=item.uid,
            study=item.study,
            destination=dest,
            objects=",".join(p.stem for p in files),
            attempts=item.send_attempts + 1,
        )

    def _send(self, items: list[Any]) -> None:
        if self.config.destination.url:
            self._stow(items)
        else:
            self._c_store(items)

    def _stow(self, items: list[Any]) -> None:
        """STOW-RS: one POST of ``multipart/related; type="application/dicom"`` per instance's results to
        ``{url}/studies``; 200 with no failed SOP instance is stored, anything else waits for a retry."""
        import urllib.error
        import urllib.request
        import uuid

        dest = self.config.destination
        for item in items:
            files = self.spool.result_files(item.uid)
            if not files:
                missing = "outbox folder missing"
                log_event("error", logging.ERROR, step="send", sop=item.uid, error=missing)
                self.spool.finish_without_results(item.uid, outcome="lost", detail=missing)
                continue
            boundary = uuid.uuid4().hex
            body = (
                b"".join(
                    f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + p.read_bytes()
                    + b"\r\n"
                    for p in files
                )
                + f"--{boundary}--\r\n".encode()
            )
            request = urllib.request.Request(
                f"{dest.url}/studies",
                data=body,
                method="POST",
                headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                    "Accept": "application/dicom+json",
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=self.config.network_timeout) as response:
                    status, answer = response.status, response.read()
            except urllib.error.HTTPError as exc:
                self._retry(item.uid, item.send_attempts, f"STOW-RS answered HTTP {exc.code}")
                continue
            except Exception as exc:
                self._retry(item.uid, item.send_attempts, f"{type(exc).__name__}: {exc}")
                continue
            failed = _stow_failures(answer)
            if status != 200 or failed:
                self._retry(item.uid, item.send_attempts, f"STOW-RS answered HTTP {status}, {failed} failed")
                continue
            self._sent(item, files, dest)

    def _c_store(self, items: list[Any]) -> None:
        """One association for a batch of due results; each instance is done when all its objects are
        accepted, else it waits for its next attempt."""
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        dest = self.config.destination
        ae = AE(ae_title=self.config.aet)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.config.network_timeout
        ae.connection_timeout = min(10.0, self.config.network_timeout)
        for sop in RESULT_SOP_CLASSES:
            ae.add_requested_context(sop, ExplicitVRLittleEndian)
            ae.add_requested_context(sop, ImplicitVRLittleEndian)
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.aet)
        except Exception as exc:
            assoc = None
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = "association rejected" if assoc.is_rejected else "association failed"
        if assoc is None or not assoc.is_established:
            for item in items:
                self._retry(item.uid, item.send_attempts, error)
            return
        try:
            for item in items:
                if not assoc.is_established:
                    self._retry(item.uid, item.send_attempts, "association aborted")
                    continue
                files = self.spool.result_files(item.uid)
                if not files:  # cannot happen after recover(); never report a send that did not happen
                    missing = "outbox folder missing"
                    log_event("error", logging.ERROR, step="send", sop=item.uid, error=missing)
                    self.spool.finish_without_results(item.uid, outcome="lost", detail=missing)
                    continue
                problem = None
                for path in files:
                    try:
                        status = assoc.send_c_store(path)
                    except Exception as exc:  # an unreadable outbox file must not block the others
                        problem = f"{path.name}: {type(exc).__name__}: {exc}"
                        break
                    code = getattr(status, "Status", None)
                    if code not in _OK_STATUSES:
                        problem = (
                            f"C-STORE of {path.name} answered {code:#06x}"
                            if code is not None
                            else f"no answer to the C-STORE of {path.name}"
                        )
                        break
                if problem:
                    self._retry(item.uid, item.send_attempts, problem)
                else:
                    self._sent(item, files, dest)
        finally:
            if assoc.is_established:
                assoc.release()
