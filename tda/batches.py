"""Training batches that resume exactly: pure-numpy samplers, no TensorFlow.

Batch `step` is a pure function of (step, seed), so a resumed run sees exactly
the batches the uninterrupted run saw.
"""

from __future__ import annotations

import numpy as np


def batch_indices(*, n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Row indices of training batch `step`: a pure function of its arguments.

  The data stream is the concatenation of epochs, epoch e being a permutation
  of range(n) drawn from `np.random.default_rng([seed, e])` (a seed sequence,
  so (seed, e) pairs never alias the way `seed + e` would). Batch `step` is
  stream positions [step * B, (step + 1) * B), so each row is seen once per
  epoch, batches may straddle epochs, and n < B simply wraps around.

  Returns:
    int64 [batch_size] indices into range(n).
  """
  if n <= 0 or batch_size <= 0 or step < 0:
    raise ValueError(f"need n > 0, batch_size > 0, step >= 0; got n={n}, "
                     f"batch_size={batch_size}, step={step}.")
  pos = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epoch, within = pos // n, pos % n
  out = np.empty(batch_size, np.int64)
  for e in np.unique(epoch):
    perm = np.random.default_rng([seed, int(e)]).permutation(n)
    sel = epoch == e
    out[sel] = perm[within[sel]]
  return out


def length_grouped_indices(*, lengths_n: np.ndarray, step: int, batch_size: int, seed: int,
                           group: int = 8) -> np.ndarray:
  """Like `batch_indices`, but batches hold examples of similar length.

  Each epoch (a seeded permutation; the n % batch_size rows left over are a
  different few each epoch) is cut into mega-batches of `group` batches; within
  one, rows are sorted by length and cut into batches, whose order is shuffled
  again. Trailing padding then mostly disappears when a batch is trimmed to its
  longest row, at the cost of a little less randomness within a batch.
  A pure function of its arguments, so resuming at a step is exact.
  """
  n = len(lengths_n)
  nb = n // batch_size
  if nb < 1 or group < 1 or step < 0:
    raise ValueError(f"need n >= batch_size, group >= 1, step >= 0; got n={n}, "
                     f"batch_size={batch_size}, group={group}, step={step}.")
  epoch, j = divmod(step, nb)
  perm = np.random.default_rng([seed, epoch]).permutation(n)[:nb * batch_size]
  mega, within = divmod(j, group)
  size = min(group, nb - mega * group)
  rows = perm[mega * group * batch_size:(mega * group + size) * batch_size]
  rows = rows[np.argsort(np.asarray(lengths_n)[rows], kind="stable")]
  order = np.random.default_rng([seed, epoch, mega]).permutation(size)
  return rows[order[within] * batch_size:(order[within] + 1) * batch_size]


def batch_at(*, tokens_nt: np.ndarray, step: int, batch_size: int, seed: int,
             length_group: int = 0) -> np.ndarray:
  """Training batch `step`: int32 [batch_size, T].

  `length_group` > 0 groups examples of similar length (`length_grouped_indices`);
  0 draws batches uniformly (`batch_indices`).
  """
  if length_group:
    idx = length_grouped_indices(lengths_n=(tokens_nt != 0).sum(1), step=step,
                                 batch_size=batch_size, seed=seed, group=length_group)
  else:
    idx = batch_indices(n=tokens_nt.shape[0], step=step, batch_size=batch_size, seed=seed)
  return np.asarray(tokens_nt[idx], np.int32)
