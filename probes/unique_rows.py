"""The distinct rows of a 2-D numpy array, fast: each row hashed to one 64-bit integer and
those sorted (numpy's np.unique(axis=0) sorts rows as bytes, several times slower), the hash
checked against the rows. The one way every column path finds its distinct values (addresses,
commands, lifecycle shapes, groups of keys)."""
from __future__ import annotations

import numpy as np

_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9],
                dtype=np.uint64)


def unique_rows(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the first row of each distinct row of the 2-D array m, each row's distinct index):
    np.unique(m, axis=0, return_index=True, return_inverse=True) but in no particular order,
    found by a 64-bit hash of each row sorted as one integer (numpy sorts rows as bytes,
    several times slower); rows the hash would confuse are checked for and then found the
    exact way."""
    n = len(m)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    words = np.ascontiguousarray(m)
    width = words.shape[1] * words.dtype.itemsize
    if width % 8:  # pad each row to whole 64-bit words
        pad = np.zeros((n, 8 - width % 8), dtype=np.uint8)
        words = np.ascontiguousarray(np.concatenate([words.view(np.uint8).reshape(n, width), pad], axis=1))
    words = words.view(np.uint64).reshape(n, -1)
    with np.errstate(over="ignore"):
        h = np.zeros(n, dtype=np.uint64)
        for j in range(words.shape[1]):
            h ^= words[:, j] * _MIX[j % len(_MIX)] + np.uint64(j)
            h ^= h >> np.uint64(29)
            h *= _MIX[(j + 3) % len(_MIX)]
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not (words[first][inverse] == words).all():  # two distinct rows, one hash
        _, first, inverse = np.unique(words, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    return first, inverse
