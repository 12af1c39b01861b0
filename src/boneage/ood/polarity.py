"""Is this radiograph a negative? (issue #43 item 5.) A hand shown inverted (bone dark, air bright), or a
MONOCHROME1 DICOM whose pixels were stored the other way round, still looks enough like a hand to pass the
densities now and then, and the network reads it as a much older or younger child.

The rule compares the input with a transformed version of itself, like the orientation check: the image
(remade as a training copy, as the refusal densities see it) and its inverse are scored by both densities,
and ``polarity_log_ratio`` = log(pooled / pooled of the inverse) + log(texture / texture of the inverse).
A radiograph scores far better than its own negative (log ratio well below 0); a negative far worse.
Grey-framed, low-contrast films sit near 0: there the evidence is weak either way.

Both limits were chosen on training ids only (v0.12.0 densities; never on the 1,001 held-out hands), with
the inverse of every training image as the altered case. Inverting an image negates its log ratio, so the
negatives' distribution is the mirror image of the radiographs' and one set of measurements serves both:

- 1,500 random training copies (ids outside the held-out sample): median -3.7, 99.5% quantile -0.46,
  largest 1.20 (id 3740: a small, dim hand inside a grey frame) and 0.50. The 569-id validation split
  (outside the densities' fit): 99% quantile -0.69, largest 1.22 (id 2312, refused by the texture density
  anyway), so the doubt band refuses none of them that the densities accept.
- ``POLARITY_DOUBT_LOG_RATIO`` = 0.5: above it the polarity is in doubt and the image is refused; 1 of those
  1,500 radiographs is above it (0.07%), and 99.7% of their negatives are (they are refused or corrected).
- ``POLARITY_CORRECT_LOG_RATIO`` = 2.0: above it the image is a negative beyond reasonable doubt and is
  assessed inverted back, with a note. No radiograph of the 1,500 comes within 0.8 of it; 88% of their
  negatives are past it (the rest fall in the doubt band and are refused, never silently assessed).

Those figures are with the ``blocks[2]`` texture density of v0.12.0 as first bundled. Re-measured on
2026-12-07 with the ``blocks[1]`` one it ships now, on 1,500 calibration ids outside the densities' fit:
largest 0.49 (none in the doubt band), 95.1% of their negatives past 2.0; validation split 1 of 569 above
0.5 (id 2312, 0.63).
"""

from __future__ import annotations

import math

POLARITY_DOUBT_LOG_RATIO = 0.5
POLARITY_CORRECT_LOG_RATIO = 2.0

#: the note a corrected image carries (the flag stays: the corrected image passed every check on its own)
POLARITY_CORRECTED_NOTE = (
    "the image looked inverted (a negative: bone dark, air bright, e.g. MONOCHROME1 pixels stored the other "
    "way round; polarity evidence {ratio:.1f}, limit {limit:.1f}); it was assessed inverted back: check the "
    "file's photometric interpretation"
)


def polarity_log_ratio(
    pooled: float | None,
    pooled_inverse: float | None,
    texture: float | None = None,
    texture_inverse: float | None = None,
) -> float | None:
    """log(score / score of the inverse), summed over the densities that scored both; None without any.
    Positive: the inverse looks more like the training radiographs than the image as given."""
    total, terms = 0.0, 0
    for given, inverse in ((pooled, pooled_inverse), (texture, texture_inverse)):
        if given is None or inverse is None or not (math.isfinite(given) and math.isfinite(inverse)):
            continue
        total += math.log(max(given, 1e-9) / max(inverse, 1e-9))
        terms += 1
    return total if terms else None


def polarity_verdict(log_ratio: float | None) -> str:
    """ "as given", "in doubt" (refuse) or "inverted" (assess the inverse, with a note)."""
    if log_ratio is None or log_ratio <= POLARITY_DOUBT_LOG_RATIO:
        return "as given"
    return "inverted" if log_ratio > POLARITY_CORRECT_LOG_RATIO else "in doubt"
