"""How a clinic's file reaches the bundled model's input: squash size and input size, inference only.

    .venv/bin/python benchmarks/native_geometry.py --out docs/results/native-geometry

Why: the bundled model squashes a clinic's radiograph to 299 x 299 before cropping the hand, as the training
copies were made, so the detail a clinic's file has above those copies never reaches the network. This
scores the same weights with a larger squash (``preprocess.squash_size``) and a larger input
(``preprocess.size``) on the 1,001 held-out native PNGs, split by id parity into a half that chooses and a
half that confirms, and on the validation split (299 px copies); the rule is in
``docs/results/native-geometry/RULE.md``, fixed before any figure. Every arm runs on ONNX Runtime, as the
bundle does, from a graph exported at its own input size, so arms differ only in the two settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
from paired_runs import difference, paired  # a sibling script: the same paired arithmetic

INCUMBENT = (299, 299)
CANDIDATES = [(384, 299), (512, 299), (299, 352), (384, 352), (512, 352)]


def arm_name(arm: tuple[int, int]) -> str:
    return f"squash{arm[0]}_in{arm[1]}"


def abs_errors(preds: pd.DataFrame) -> pd.Series:
    """|error| by string id from ``evaluate``'s predictions (or their CSV)."""
    return preds["error"].abs().set_axis(preds["id"].astype(str))


def halves(ids: pd.Index) -> tuple[pd.Index, pd.Index]:
    """Half A (even ids) chooses, half B (odd ids) confirms: fixed in the rule before any figure."""
    even = pd.Index([i for i in ids if int(i) % 2 == 0])
    return even, ids.difference(even)


def decide(errors: dict[tuple[int, int], dict[str, pd.Series]]) -> dict:
    """The rule applied to per-image absolute errors (``errors[arm][split]``, split ``native`` for every arm
    and ``val_split`` for the incumbent and the chosen arm): choose on half A, confirm on half B and the
    validation split. Decides on unrounded paired means and standard errors (``mean_and_se``, as the ship
    rule does); the rounded ``difference`` figures are for the record."""
    inc = errors[INCUMBENT]
    half_a, half_b = halves(inc["native"].index)
    chosen = choose(errors, half_a)
    arms = {}
    for arm in CANDIDATES:
        e = errors[arm]
        arms[arm_name(arm)] = {
            "half_a": difference(inc["native"][half_a], e["native"][half_a]),
            "half_b": difference(inc["native"][half_b], e["native"][half_b]),
            "all_native": difference(inc["native"], e["native"]),
        }
    arms[arm_name(chosen)]["val_split"] = difference(inc["val_split"], errors[chosen]["val_split"])

    b_diff, b_se = paired(inc["native"][half_b], errors[chosen]["native"][half_b])
    v_diff, v_se = paired(inc["val_split"], errors[chosen]["val_split"])
    b_ok, v_ok = b_diff < 0 and b_diff <= -b_se, v_diff <= v_se
    return {
        "incumbent": arm_name(INCUMBENT),
        "incumbent_mae": {
            "half_a": round(float(inc["native"][half_a].mean()), 3),
            "half_b": round(float(inc["native"][half_b].mean()), 3),
            "all_native": round(float(inc["native"].mean()), 3),
            "val_split": round(float(inc["val_split"].mean()), 3),
        },
        "n": {"half_a": len(half_a), "half_b": len(half_b), "val_split": len(inc["val_split"])},
        "arms (paired: a = incumbent, b = arm)": arms,
        "chosen_on_half_a": arm_name(chosen),
        "half_b_confirms": bool(b_ok),
        "val_split_not_worse_by_1se": bool(v_ok),
        "decision": f"ship {arm_name(chosen)} as v0.12.1" if b_ok and v_ok else "v0.12.0 stays as it is",
    }


def choose(errors: dict[tuple[int, int], dict[str, pd.Series]], half_a: pd.Index) -> tuple[int, int]:
    return min(CANDIDATES, key=lambda a: float(errors[a]["native"][half_a].mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("src/boneage/assets/model.safetensors"))
    ap.add_argument("--config", type=Path, default=Path("configs/bundled-v0.12.yaml"), help="gives the split")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=Path("~/.cache/boneage/native-geometry").expanduser())
    args = ap.parse_args()

    from boneage.bundle import holdout_tables, run_split
    from boneage.config import load_config
    from boneage.evaluation import evaluate
    from boneage.inference import Predictor, export_onnx
    from boneage.runtime import file_digest

    cfg = load_config(args.config)
    val = run_split(cfg)[1]
    native = holdout_tables(cfg, None)[1]
    if native is None:
        raise SystemExit("error: no held-out native PNGs (../shared/data/rsna-bone-age-sample/images)")
    loaded = Predictor.load(args.model, runtime="torch")  # each arm then runs its own ONNX export
    digest = file_digest(args.model)
    args.out.mkdir(parents=True, exist_ok=True)

    errors: dict[tuple[int, int], dict[str, pd.Series]] = {}
    seconds: dict[str, float] = {}

    def score(arm: tuple[int, int], split: str, table: pd.DataFrame) -> None:
        predictor = loaded.with_preprocess(squash_size=arm[0], size=arm[1])  # this arm's input, same network
        # the graph's input size is fixed: one per arm, and per weights file (another --model never reuses it)
        graph = args.cache / "onnx" / f"{digest[:16]}-{arm_name(arm)}.onnx"
        if not graph.is_file():
            export_onnx(predictor, graph)
        predictor.use_onnx(graph)
        t0 = time.perf_counter()
        preds = evaluate(predictor, table, cache_dir=args.cache / split, progress=False).predictions
        seconds[f"{arm_name(arm)}_{split}"] = round(time.perf_counter() - t0, 1)
        preds.to_csv(args.out / f"preds_{split}_{arm_name(arm)}.csv", index=False)
        errors.setdefault(arm, {})[split] = abs_errors(preds)
        print(arm_name(arm), split, round(float(errors[arm][split].mean()), 3), flush=True)

    # the validation split judges only the chosen arm (the rule): only it and the incumbent are scored there
    for arm in [INCUMBENT, *CANDIDATES]:
        score(arm, "native", native)
    chosen = choose(errors, halves(errors[INCUMBENT]["native"].index)[0])
    for arm in (INCUMBENT, chosen):
        score(arm, "val_split", val)

    result = {
        "model": str(args.model),
        "engine": "onnxruntime (the bundle's weights exported at each arm's input size), 6-view TTA",
        **decide(errors),
        "seconds": seconds,
    }
    (args.out / "native_geometry.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("chosen_on_half_a", "half_b_confirms", "decision")}, indent=2))


if __name__ == "__main__":
    main()
