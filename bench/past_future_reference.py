"""A numpy version of the original Past-Future admission step, as the timing reference.

Written from the algorithm's description (not from LightLLM's code): keep the window of finished
output lengths sorted; for each running request draw its remaining length by interpolating a
uniform draw into the sorted lengths longer than what it has generated; then add the waiting
candidates one at a time, each time sorting remaining lengths descending and taking
max_j (j * b_j + cumsum(a)_j), and stop at the first candidate that would exceed capacity.
"""

from __future__ import annotations

import numpy as np


def reference_admit(
    history: np.ndarray,
    running_held: np.ndarray,
    running_generated: np.ndarray,
    running_max_new: np.ndarray,
    candidate_prompt: np.ndarray,
    candidate_max_new: np.ndarray,
    capacity: int,
    rng: np.random.Generator,
) -> int:
    window = np.sort(history)  # the original re-sorts its window each step

    def draw(generated: np.ndarray, max_new: np.ndarray) -> np.ndarray:
        out = np.empty(generated.shape[0], dtype=np.int64)
        for i, (g, m) in enumerate(zip(generated, max_new)):
            longer = window[np.searchsorted(window, g, side="right") :]
            if longer.size == 0:
                out[i] = m - g
                continue
            u = rng.random()
            total = np.interp(u * (longer.size - 1), np.arange(longer.size), longer)
            out[i] = min(m - g, int(total) - g)
        return out

    held = running_held.astype(np.int64)
    remaining = draw(running_generated, running_max_new)
    candidate_remaining = draw(np.zeros_like(candidate_max_new), candidate_max_new)
    admitted = 0
    for k in range(candidate_prompt.shape[0]):
        a = np.concatenate([held, candidate_prompt[: k + 1]])
        b = np.concatenate([remaining, candidate_remaining[: k + 1]])
        order = np.argsort(-b, kind="stable")
        peak = np.max(np.arange(1, b.size + 1) * b[order] + np.cumsum(a[order]))
        if peak > capacity:
            break
        admitted = k + 1
    return admitted
