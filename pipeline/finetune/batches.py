"""How a fine-tune's training rows are cut into batches. Plain shuffled batches need nothing here; the two
length-aware arrangements do (`group_by_length`, `sort_micro_batches`), each fed the epoch's shuffled rows and
each a function of them alone, so a resumed run meets the very batches the interrupted one would have.

- `length_grouped_batches` (`group_by_length: true`, the default for audio): shuffle; sort by length within
  mega-batches of `MEGA_BATCH` batches; shuffle the batches, the one holding the longest input first so that a
  batch too big for memory fails at the first step (as transformers' `LengthGroupedSampler`). Far less
  padding, so shorter epochs (bench/finetune_meld.py), at a different gradient: batches hold similar lengths.
- `length_sorted_micro_batches` (`sort_micro_batches: true`, needs grad_accum > 1): each step holds the rows
  a shuffled batch of batch_size x grad_accum holds, sorted by length before it is cut into its micro-batches:
  the step's gradient is the shuffle's, each micro-batch padded only to its own longest input.
"""
from __future__ import annotations

import numpy as np

MEGA_BATCH = 50   # group_by_length: batches per mega-batch sorted by length (as transformers' LengthGroupedSampler)


def sorted_within(rows: np.ndarray, lengths: np.ndarray, group: int, batch_size: int) -> list[np.ndarray]:
    """`rows` cut into consecutive groups of `group` rows, each sorted by `lengths[row]` (longest first) and
    cut into batches of `batch_size`, in order."""
    batches = []
    for s in range(0, len(rows), group):
        chunk = rows[s:s + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return batches


def length_grouped_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int,
                           rng: np.random.Generator, mega_batch: int = MEGA_BATCH) -> list[np.ndarray]:
    """Batches of `rows` (already shuffled) of similar `lengths[row]`: each mega-batch of `mega_batch`
    batches is sorted by length, longest first, and cut into batches; the batches are shuffled, and the
    one with the longest input goes first (a batch too big for memory fails at once, not hours later)."""
    batches = sorted_within(rows, lengths, mega_batch * batch_size, batch_size)
    batches = [batches[i] for i in rng.permutation(len(batches))]
    if batches:
        first = int(np.argmax([lengths[b].max() for b in batches]))
        batches.insert(0, batches.pop(first))
    return batches


def length_sorted_micro_batches(rows: np.ndarray, lengths: np.ndarray, batch_size: int,
                                grad_accum: int) -> list[np.ndarray]:
    """`rows` (already shuffled) cut into steps of batch_size x grad_accum rows, as shuffled batches of that size
    are cut; each step's rows sorted by `lengths[row]`, longest first, and cut into its micro-batches of
    batch_size. A step computes the gradient of the rows a shuffled batch holds, with less padding."""
    return sorted_within(rows, lengths, batch_size * grad_accum, batch_size)
