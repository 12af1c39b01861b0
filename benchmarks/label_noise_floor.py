"""What a model could score against single-report labels: an estimate from published figures, not measured.

    python benchmarks/label_noise_floor.py --out benchmarks/results/label_noise_floor.json

Why: issue #10 asks for <= 6.0 months on held-out ids whose labels are clinical reports, one reading each,
while the reference figures it quotes (winner 4.27, Deeplasia 3.87) are scored against the 200-image test
set's reference, a mean of several readers. The 2017 winner (4.265 on the test set) was also re-evaluated on
the challenge's validation set (6.8 months: Beheshtian et al., Radiology 2023; Santomartino et al., Radiology:
AI 2024). One model scored against both kinds of label separates the label's own noise from the model's.

Assumptions, each stated because the estimate rests on it: every error (model against the truth, one reading
against the truth) is independent and Gaussian with mean zero, so mean absolute errors add in quadrature
like standard deviations; the validation labels are as noisy as our held-out labels. Bracketed: the 6.8 is
rounded (6.75 and 6.85 are run too), and the test reference's own noise is either that of a mean of
``readers`` readings each as noisy as a report (n / sqrt(readers)) or none at all (``readers`` = 0).
Inputs default to the published figures; ``--ours`` is v0.12.0's measured 6.880 on the 1,001 held-out
native PNGs (docs/results/bundled-v0.12/).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def label_noise(mad_single: float, mad_reference: float, readers: int) -> float:
    """A single reading's mean absolute error against the truth, from one model scored both ways.

    single^2 = m^2 + n^2 and reference^2 = m^2 + n^2 / k, so n^2 = (single^2 - reference^2) * k / (k - 1);
    ``readers`` = 0 takes the reference as exact (n^2 = single^2 - reference^2)."""
    if mad_single <= mad_reference:
        raise ValueError("the single-reading MAE must exceed the reference MAE")
    if readers == 1 or readers < 0:
        raise ValueError("readers must be 0 (an exact reference) or at least 2: one reading is a report")
    factor = 1.0 if readers == 0 else readers / (readers - 1)
    return math.sqrt((mad_single**2 - mad_reference**2) * factor)


def reference_noise(noise: float, readers: int) -> float:
    """The reference's own error: the mean of ``readers`` readings, or none (``readers`` = 0)."""
    return 0.0 if readers == 0 else noise / math.sqrt(readers)


def truth_error(mad: float, noise: float) -> float:
    """A model's implied error against the truth, given the noise of the labels it was scored on (NaN if
    the labels' noise alone exceeds the measured MAE: the assumptions then do not hold for that figure)."""
    return math.sqrt(mad**2 - noise**2) if mad >= noise else math.nan


def against_labels(truth: float, noise: float) -> float:
    """The MAE a model with error ``truth`` against the truth would show against labels of noise ``noise``."""
    return math.hypot(truth, noise)


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 2)


def estimate(
    single: float, reference: float, readers: int, ours: float, target: float, others: dict[str, float]
) -> dict:
    """Every figure of the estimate under one assumption about the reference's noise."""
    n = label_noise(single, reference, readers)
    ref_noise = reference_noise(n, readers)
    winner = truth_error(reference, ref_noise)
    rows = {}
    for name, mad in others.items():
        truth = truth_error(mad, ref_noise)
        rows[name] = {
            "mad_vs_reference": mad,
            "implied_error_vs_truth": _r(truth),
            "expected_mad_vs_single_reports": _r(against_labels(truth, n)),
        }
    return {
        "readers_in_reference": readers,
        "single_report_noise": round(n, 2),
        "reference_noise": round(ref_noise, 2),
        "winner_error_vs_truth": _r(winner),
        "ours_mad_vs_single_reports": ours,
        "ours_implied_error_vs_truth": _r(truth_error(ours, n)),
        "target": target,
        "error_vs_truth_needed_for_target": _r(truth_error(target, n)),
        "other_models": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--single", type=float, nargs="+", default=[6.8, 6.75, 6.85],
                    help="a model's MAE against single-report labels (published, and its rounding)")
    ap.add_argument("--reference", type=float, default=4.265, help="its MAE against the test set")
    ap.add_argument("--readers", type=int, nargs="+", default=[6, 0],
                    help="readers in the test reference; 0: exact")
    ap.add_argument("--ours", type=float, default=6.880, help="our MAE against single-report labels")
    ap.add_argument("--target", type=float, default=6.0)
    ap.add_argument("--other", action="append", default=[], metavar="NAME=MAD",
                    help="another model's MAE against the reference; default Deeplasia=3.87")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    mads = {name: float(mad) for name, mad in (o.split("=", 1) for o in args.other)} or {"Deeplasia": 3.87}
    result = {
        "inputs": {"reference": args.reference, "ours": args.ours, "target": args.target, "others": mads},
        "note": "an estimate from published figures under the assumptions in this script's docstring",
        "estimates": [
            {"single": single, **estimate(single, args.reference, k, args.ours, args.target, mads)}
            for single in args.single
            for k in args.readers
        ],
    }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
