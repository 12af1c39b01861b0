"""Two models' per-image prediction CSVs on the same ids, compared image by image.

    python benchmarks/paired_preds.py docs/results/bundled-v0.9/preds_val_split.csv \
        docs/results/bundled-v0.10/preds_val_split.csv --out docs/results/bundled-v0.10/paired_val_split.json

Why: a ship rule compares two MAEs on 569 validation images, whose noise is a few hundredths to a tenth of a
month; the paired difference |error|(B) - |error|(A) with its standard error over images says whether a
decision was within that noise. Reads any CSV with ``id``, ``boneage`` and ``predicted`` columns
(``ship_rule_check.py``'s ``preds_val_split.csv``, ``bundled_model_report.py``'s ``preds_native.csv``,
``boneage evaluate --out``). ``--column-a``/``--column-b`` name other prediction columns, so two members of
``ensemble_check.py``'s ``preds_<split>.csv`` (or a member and the mean) compare the same way. It only
records: no decision is taken from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paired_runs import difference  # a sibling script: the same paired arithmetic

from boneage.errors import BoneAgeInputError
from boneage.evaluation import align_predictions, read_predictions  # the ship rule's reader and check


def compare(a: Path, b: Path, column_a: str = "predicted", column_b: str = "predicted") -> dict:
    """The paired difference B - A over ids both answered; the files must agree on every shared reference."""
    try:
        ta, tb = read_predictions(a, column_a), read_predictions(b, column_b)
        ref, preds = align_predictions([(str(a), ta), (str(b), tb)])
    except BoneAgeInputError as exc:
        raise SystemExit(f"error: {exc}") from None
    errors = [preds[k].sub(ref).abs().dropna() for k in (0, 1)]
    names = {"a": str(a) if column_a == "predicted" else f"{a}:{column_a}"}
    names["b"] = str(b) if column_b == "predicted" else f"{b}:{column_b}"
    return {**names, **difference(*errors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="the incumbent's predictions")
    ap.add_argument("b", type=Path, help="the candidate's predictions")
    ap.add_argument("--column-a", default="predicted", help="A's prediction column")
    ap.add_argument("--column-b", default="predicted", help="B's prediction column")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = compare(args.a, args.b, args.column_a, args.column_b)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
