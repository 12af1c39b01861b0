"""Is the hand whole and in one piece? (issue #43 item 5.) A wrist-only crop or a radiograph cut into
shuffled blocks still looks enough like a hand to pass the densities, and the network reads it as a much
younger child (32 and 38 months for hands of 10 years and more).

Neither the densities nor the orientation probe name the problem, but the probe doubts such images: they
do not look like an upright hand (upright probability median 0.02-0.03 on cut training copies). A doubt
alone also falls on a few real, upright hands (v0.3: 15 of the 1,001 held-out files), so, as for a turned
hand, the warning needs a second, independent signal. Here it is model-independent, read off the frame's
bright objects (``boneage.data.preprocess.bright_objects``, the ones the hand crop picks from):

- ``top_contact``: the longest run of the largest bright object (the hand) along the top three rows, as a
  fraction of the width. On a PA hand film the forearm leaves by the bottom edge and the fingers end inside
  the frame; a hand cut off above the wrist meets the top edge across its whole width.
- ``largest_share``: the largest bright object's share of all bright pixels. A hand is one object beside
  small markers; a hand cut into blocks and shuffled falls apart into several comparable pieces. It is the
  larger of the share read on the whole frame and on the frame without its edge bands (``EDGE_BAND``
  below): a thin film border is a bright object of its own and no piece of the hand.

Every limit was chosen on training ids (never the held-out hands), on the 299 px training copies as the
refusal check remakes an input, with altered copies as the cases to catch: wrist crops (the lower 38% of the
hand's box) and shuffles (blocks of 16% of the frame, 128 px of an 800 px file), of the 569 validation
split ids (outside the densities' and the probe's fit) and of 1,200 random training ids:

- ``TOP_CONTACT_LIMIT`` = 0.2: 99% of the validation wrist crops reach it (1% quantile 0.198); so do 2.5%
  of the real validation hands, which is why it only corroborates. Most of those span the whole width
  (a bright film border or collimator band joined to the hand), which a hand cut off above the wrist does
  not: ``TOP_CONTACT_MAX`` = 0.95 (99% quantile of the validation wrist crops: 0.93).
- ``LARGEST_SHARE_LIMIT`` = 0.6: below it on 95% of the validation shuffles (median 0.32); 0.5% of real
  validation hands (1% quantile 0.71).
- ``WHOLE_HAND_UPRIGHT_LIMIT`` = 0.9 (the probe's upright probability below which a cut frame is warned):
  the probe doubts cut images less than turned ones (the validation wrist crops that no other check flags
  have a median of 0.45). Newly warned real hands (not refused or warned otherwise): 1 of the 569
  validation ids and 2 of the 1,200 training ids (0.6: none, but 13 of 569 validation wrist crops and 21 of
  569 shuffles left unflagged; 0.9: 3 and 14; 0.99: 4 real hands of 569). A missed cut image prints a
  confident "delayed"; a warned real hand still gets its bone age, without the flag: 0.9.
- ``PIECES_ALONE_LIMIT`` = 0.3: a frame this fragmented is warned even when the probe does not doubt it (a
  shuffled held-out hand looked upright to it, 0.92). No real hand of the 1,769 above comes near: their
  smallest share is 0.38 (validation) and 0.50 (training); 41% of the validation shuffles are below it.
- Edge bands (2026-12-07, the same kinds of copies: 569 validation and 1,200 other training ids, shuffles in
  48 px blocks): real hands with a share below 0.6 fall from 0.53% to 0.18% (validation) and 0.42% to 0.08%
  (training); shuffles below 0.6 stay 92.1% and 91.9%, below 0.3 44.5% and 44.8%. The share on the trimmed
  frame alone would put one real training hand below 0.3 (a hand joined to a band): hence the larger of two.

The same frame also vetoes a turned-hand warning (``frame_upright``): the probe and the density of the
turned image can both prefer a turn for a real, upright hand (v0.12.0 warned 4 of the 1,001 held-out
files as turned, 3 of them upright),
but a turned hand cannot have its forearm leave by the bottom edge with nothing else meeting the frame.
Limits chosen on the 299 px copies of the same 569 validation and 1,200 training ids, each also turned
by 90, 180 and 270 degrees and upside down (7,076 turned copies):

- ``UPRIGHT_EXIT_MIN`` = 0.15: the largest object meets the bottom edge over at least this fraction of
  the width (upright copies: median 0.27, 5% quantile 0), below ``TOP_CONTACT_MAX`` (a border band).
- ``UPRIGHT_OTHER_MAX`` = 0.1: and meets the top, left and right edges over less than this.
- ``EDGE_BAND`` = 0.9: first, outer rows and columns this bright are trimmed (a film border or collimator
  band joined to the wrist is not the forearm's exit), up to a quarter of the frame per side.
- ``UPRIGHT_SOLIDITY_MAX`` = 0.9: and the object is hand-shaped, its area under 0.9 of its convex hull's.
  A grey film panel is convex (solidity about 1.0) and, turned, meets one edge as a forearm would: without
  this, 3 turned training copies (two files' panels, contacts 0.72-0.93) and 4 of 1,004 turned held-out
  copies passed. Upright copies that pass the contacts: solidity median 0.60, 99% quantile 0.78; the few
  above are panels. Any limit from 0.85 to 0.97 gives the same counts.
- Upright copies that pass: 87.8% (88.3% on contacts alone, 85.9% also without trimming). Turned copies
  that pass: 5 of 7,076, all copies of three training files that are themselves turned (two upside down,
  one by 90 degrees), so these copies are upright. An exit of 0.10 adds one turned copy; 0.20 passes fewer
  upright copies (84.8% on contacts alone).

The mirror image confirms a turn (``frame_sideways``): the probe can doubt a hand turned by a quarter
(upright probability 0.005-0.09) while the density scores it better as given than turned back, and v0.12.0
then gave a bone age with no caution (held-out 11838, 12329 turned by 90 degrees, 13189 by 270). A
hand-shaped object leaving by the left or right edge alone, with the veto's limits (``UPRIGHT_EXIT_MIN``,
``UPRIGHT_OTHER_MAX``, ``UPRIGHT_SOLIDITY_MAX``) but no upper limit on the exit, confirms a doubt as the
cut-frame rules take it (upright probability under ``WHOLE_HAND_UPRIGHT_LIMIT``). Measured 2026-12-07 on the
299 px copies of 2,000 random training ids outside the held-out sample: a sideways frame in 1 of 2,000
upright copies (1488, a hand tilted about 45 degrees, its forearm leaving by the right edge near the
corner), in 3,498 of 4,000 quarter-turned copies (87.5%), always on the side that matches the turn; without
an upper limit on the exit, one more turned copy and no upright one. Of the 1,001 held-out hands one
upright frame is sideways (10338), and the probe does not doubt it (1.00).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from boneage.data.preprocess import bright_objects

TOP_CONTACT_LIMIT = 0.2
TOP_CONTACT_MAX = 0.95
LARGEST_SHARE_LIMIT = 0.6
WHOLE_HAND_UPRIGHT_LIMIT = 0.9
PIECES_ALONE_LIMIT = 0.3
UPRIGHT_EXIT_MIN = 0.15
UPRIGHT_OTHER_MAX = 0.1
UPRIGHT_SOLIDITY_MAX = 0.9
EDGE_BAND = 0.9
_TOP_ROWS = 3  # the rows (or columns) read as one edge
#: The forearm's exit edge → the turn (``boneage.ood.density.ORIENTATIONS``) that puts it there.
SIDE_EXITS = {"right": "turned 90 degrees", "left": "turned 270 degrees"}


def _longest_run(flags: np.ndarray) -> int:
    """The longest run of True in a 1-D boolean array."""
    padded = np.concatenate([[0], np.asarray(flags, dtype=np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def _trim_edge_bands(objects: np.ndarray) -> np.ndarray:
    """The mask without the outer rows and columns that are bands (``EDGE_BAND`` bright: a film border, a
    collimator band), up to a quarter of the frame per side: a band joined to the hand is not its edge."""
    h, w = objects.shape
    top, bottom, left, right = 0, h, 0, w
    while top < h // 4 and objects[top, left:right].mean() >= EDGE_BAND:
        top += 1
    while h - bottom < h // 4 and objects[bottom - 1, left:right].mean() >= EDGE_BAND:
        bottom -= 1
    while left < w // 4 and objects[top:bottom, left].mean() >= EDGE_BAND:
        left += 1
    while w - right < w // 4 and objects[top:bottom, right - 1].mean() >= EDGE_BAND:
        right -= 1
    return objects[top:bottom, left:right]


def _largest_object(objects: np.ndarray) -> tuple[np.ndarray, float] | None:
    """The largest bright object's mask and its share of all bright pixels; None without objects."""
    labels, count = ndimage.label(objects)
    if count == 0:
        return None
    sizes = np.asarray(ndimage.sum(objects, labels, index=np.arange(1, count + 1)), dtype=np.float64)
    return labels == int(np.argmax(sizes)) + 1, float(sizes.max() / sizes.sum())


def _solidity(mask: np.ndarray) -> float:
    """The object's area over its convex hull's: about 1 for a film panel or any convex blob, 0.5-0.7 for a
    hand with its fingers apart."""
    points = np.argwhere(mask)
    try:
        return float(len(points) / ConvexHull(points).volume)  # in 2-D, the hull's "volume" is its area
    except (QhullError, ValueError):  # a line or a point: no hand
        return 1.0


def edge_contacts(pixels: np.ndarray) -> dict[str, float] | None:
    """The longest run of the largest bright object along each edge (top, bottom, left, right) once edge
    bands are trimmed, as a fraction of that edge, and its ``solidity``; None for a flat frame."""
    objects, _ = bright_objects(np.asarray(pixels, dtype=np.float32))
    found = None if objects is None else _largest_object(_trim_edge_bands(objects))
    if found is None:
        return None
    largest, _ = found
    k = _TOP_ROWS
    h, w = largest.shape
    return {
        "top": _longest_run(largest[:k].any(0)) / w,
        "bottom": _longest_run(largest[-k:].any(0)) / w,
        "left": _longest_run(largest[:, :k].any(1)) / h,
        "right": _longest_run(largest[:, -k:].any(1)) / h,
        "solidity": _solidity(largest),
    }


def frame_measures(pixels: np.ndarray) -> tuple[float, float] | None:
    """(top_contact, largest_share) of a frame's bright objects (the share: the larger of the whole frame's
    and the frame's without edge bands); None for a flat frame."""
    objects, _ = bright_objects(np.asarray(pixels, dtype=np.float32))
    found = None if objects is None else _largest_object(objects)
    if found is None:
        return None
    largest, share = found
    trimmed = _largest_object(_trim_edge_bands(objects))
    if trimmed is not None:
        share = max(share, trimmed[1])
    return _longest_run(largest[:_TOP_ROWS].any(0)) / largest.shape[1], share


def _exit_edge(contacts: dict[str, float] | None) -> str | None:
    """The one edge a hand-shaped object (not a film panel) leaves by, meeting over ``UPRIGHT_EXIT_MIN`` of
    it and every other edge under ``UPRIGHT_OTHER_MAX``; None when there is no such edge. The upright veto
    and the quarter-turn confirmation read the same exit, at the bottom or at a side."""
    if contacts is None or contacts["solidity"] >= UPRIGHT_SOLIDITY_MAX:
        return None
    edges = {k: contacts[k] for k in ("top", "bottom", "left", "right")}
    for edge, value in edges.items():
        if value >= UPRIGHT_EXIT_MIN and max(v for k, v in edges.items() if k != edge) < UPRIGHT_OTHER_MAX:
            return edge  # at most one: the others are under UPRIGHT_OTHER_MAX < UPRIGHT_EXIT_MIN
    return None


def frame_upright(pixels: np.ndarray) -> bool:
    """Does the frame show an upright hand: a hand-shaped object (not a film panel) leaving by the bottom
    edge and meeting no other? Vetoes a turned-hand warning (module docstring). An exit across the whole
    bottom edge is a border band, not a forearm (``TOP_CONTACT_MAX``)."""
    contacts = edge_contacts(pixels)
    return _exit_edge(contacts) == "bottom" and contacts is not None and contacts["bottom"] < TOP_CONTACT_MAX


def frame_sideways(pixels: np.ndarray) -> str | None:
    """The turn a frame shows when a hand-shaped object leaves by the left or right edge alone, as the
    forearm of a hand turned by a quarter does ("turned 90 degrees" for the right edge, as ``np.rot90``
    turns), else None; a whole side edge counts too. Confirms the probe's doubt where the density does not
    (module docstring)."""
    edge = _exit_edge(edge_contacts(pixels))
    return SIDE_EXITS.get(edge) if edge is not None else None


def cut_reasons(pixels: np.ndarray, upright: float | None) -> list[str]:
    """What says the frame holds no whole, one-piece hand, given the probe's ``upright`` probability (None:
    no probe, so only the signal that needs no doubt counts): reasons for the warning, or []."""
    measures = frame_measures(pixels)
    if measures is None:
        return []
    top, share = measures
    doubted = upright is not None and upright < WHOLE_HAND_UPRIGHT_LIMIT
    reasons = []
    if doubted and TOP_CONTACT_LIMIT <= top < TOP_CONTACT_MAX:
        reasons.append(
            f"the hand runs off the top edge of the image over {top:.0%} of its width: fingers cut off?"
        )
    if share < PIECES_ALONE_LIMIT or (doubted and share < LARGEST_SHARE_LIMIT):
        reasons.append(f"the image falls into pieces (the largest holds {share:.0%} of the bright area)")
    return reasons
