# SPDX-License-Identifier: Apache-2.0
"""Multi-query associative recall (MQAR, as in the Zoology paper), seeded and deterministic.

A sequence is BOS, a context of C tokens, then Q queries:

    BOS  f f k1 v1 f f f k2 v2 f ...  f  |  q1 a1  q2 a2 ... qQ aQ
         <----------- context C ------->    <---- query block 2Q --->

The context is uniform filler with N key->value pairs (the key immediately followed by its value)
at random non-overlapping offsets. Keys are distinct within a sequence; values are uniform (repeats
allowed). Each query is a key of the context drawn WITH replacement (so "a value not yet answered"
is no shortcut), followed by its value: the answer the model must produce. Token ranges are
disjoint: 0 = BOS, keys 1..64, values 65..128, filler 129..255.
"""

import numpy as np

BOS = 0
KEYS = (1, 65)  # [lo, hi)
VALUES = (65, 129)
FILLER = (129, 256)
VOCAB = 256


def sample(rng, n_seq, C, N, Q):
    """Returns (tokens [n_seq, 1 + C + 2Q] int64, answer positions [Q] int64).

    answers are predicted at the query-key positions: tokens[:, p + 1] is the answer to the
    query at p, for p in answer positions."""
    assert 2 * N <= C and N <= KEYS[1] - KEYS[0]
    T = 1 + C + 2 * Q
    tok = np.empty((n_seq, T), dtype=np.int64)
    tok[:, 0] = BOS
    tok[:, 1:1 + C] = rng.integers(FILLER[0], FILLER[1], size=(n_seq, C))
    qpos = 1 + C + 2 * np.arange(Q)
    for s in range(n_seq):
        keys = rng.choice(np.arange(*KEYS), size=N, replace=False)
        vals = rng.integers(*VALUES, size=N)
        # N non-overlapping 2-token slots among the C positions: choose N starts in C - N
        # "compressed" positions, then spread them out (the standard stars-and-bars trick).
        starts = np.sort(rng.choice(C - N, size=N, replace=False)) + np.arange(N)
        order = rng.permutation(N)
        for i, st in enumerate(starts):
            tok[s, 1 + st] = keys[order[i]]
            tok[s, 2 + st] = vals[order[i]]
        q = rng.integers(0, N, size=Q)
        tok[s, qpos] = keys[q]
        tok[s, qpos + 1] = vals[q]
    return tok, qpos


EVAL_SEED = 20261201
EVAL = dict(C=512, N=16, Q=16, n_seq=256)


def eval_set():
    """The fixed evaluation set shipped with the model: 256 sequences, 4096 answers."""
    rng = np.random.default_rng(EVAL_SEED)
    return sample(rng, EVAL["n_seq"], EVAL["C"], EVAL["N"], EVAL["Q"])
