"""boneage as a DICOM node: receive hand radiographs by C-STORE, return a Secondary Capture and a Structured
Report into the same study (``boneage node``).

``spool``: the durable spool, outbox and ledger (nothing acknowledged is lost, nothing is assessed or sent
twice); ``sc`` and ``sr``: the result objects; ``worker``: one received instance in, its result objects out;
``node``: the pynetdicom application entity that ties them together. This package imports only ``errors``,
``io``, ``runtime``, ``assessment``, ``report`` and ``clinical`` (never the CLI or the web app) and never
torch: it runs in the light install.
"""

from __future__ import annotations

__all__ = ["ACCEPTED_SOP_CLASSES", "Destination", "Node", "NodeConfig", "parse_destination"]


def __getattr__(name: str):  # lazy: `import boneage.dicom` must not pull pynetdicom in for nothing
    if name in __all__:
        from boneage.dicom import node

        return getattr(node, name)
    raise AttributeError(name)
