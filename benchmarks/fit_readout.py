"""A bundled model read with ``preprocess.fit: pad`` (as trained) and ``stretch``, on the validation split.

    python benchmarks/fit_readout.py --out docs/results/bundled-v0.16/fit_readout_v0.12.0.json   # ~10 min

Why: before v0.16 (``configs/bundled-v0.16.yaml``) grafted the stretched input onto v0.12.0, this measured how
far behind the graft starts. The validation split only (6-view TTA, torch engine), so no held-out id is read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("src/boneage/assets/model.safetensors"))
    ap.add_argument("--config", type=Path, default=Path("configs/bundled-v0.13.yaml"), help="gives the split")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from boneage.bundle import run_split
    from boneage.config import load_config
    from boneage.evaluation import evaluate
    from boneage.inference import Predictor

    cfg = load_config(args.config)
    table = run_split(cfg)[1]
    loaded = Predictor.load(args.model, runtime="torch")
    out = {}
    for fit in ("pad", "stretch"):
        predictor = loaded.with_preprocess(fit=fit)  # the same network, read with this fit
        t0 = time.perf_counter()
        rep = evaluate(predictor, table, cache_dir=cfg.data.cache_dir, progress=False)
        out[fit] = {
            "mae": float(rep.metrics["mae_months"]),
            "bias": float(rep.metrics.get("bias_months", float("nan"))),
            "s": round(time.perf_counter() - t0, 1),
        }
        print(fit, out[fit], flush=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
