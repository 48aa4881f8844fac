# SPDX-License-Identifier: Apache-2.0
"""What the training scripts share: thread setup, logging, evaluation, the shipped files."""

import json
import os
import sys
import time

# OpenMP reads these when torch loads: passive waiting matters on a shared 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import safetensors_io  # noqa: E402
import task  # noqa: E402
from model import Config, DmsMode, TinyLlama, answers_correct  # noqa: E402

# How many sequences of the evaluation set the CI tests decode (512 answers).
CI_SUBSET = 32


class Log:
    """Prints and appends to a log file, each line stamped with seconds since start."""

    def __init__(self, path):
        self.t0 = time.time()
        self.f = open(path, "w") if path else None

    def __call__(self, *parts):
        line = f"[{time.time() - self.t0:7.1f}s] " + " ".join(str(p) for p in parts)
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()

    def elapsed(self):
        return time.time() - self.t0


def setup_threads(n):
    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)


@torch.no_grad()
def evaluate(model, tokens, qpos, dms: DmsMode = None, batch=32):
    """Per-answer correctness [n_seq, Q] and, with dms, per sequence the memory compression the
    library would report at the end of the sequence (1 / mean over layers and KV heads of
    live slots / tokens seen)."""
    model.eval()
    correct, cr = [], []
    T = tokens.shape[1]
    for b in range(0, tokens.shape[0], batch):
        x = torch.from_numpy(tokens[b:b + batch])
        logits, alphas = model(x, dms)
        correct.append(answers_correct(logits, x, torch.from_numpy(qpos)).numpy())
        if dms is not None:
            cr.append(hard_compression(alphas, T - 1, dms.window))  # the last token is never fed
    model.train()
    return np.concatenate(correct), (np.concatenate(cr) if cr else None)


def hard_compression(alphas, seen, window):
    """Library CR per sequence from hard decisions, for a cache that has seen `seen` tokens: a
    row keeps every token except the flagged ones older than the window, i.e.
    live = seen - #flagged among tokens 0 .. seen - window - 2."""
    per_row = []
    for a in alphas:  # [B, Hk, T]
        flagged = (a[:, :, : max(seen - window - 1, 0)] > 0.5).sum(-1).double()
        per_row.append((seen - flagged) / seen)
    frac = torch.cat(per_row, dim=1).mean(1)  # mean over layers x heads of live / seen
    return (1.0 / frac).numpy()


def load_model(path):
    tensors, meta = safetensors_io.load(path)
    cfg = Config(**json.loads(meta["config"]))
    m = TinyLlama(cfg)
    m.import_tensors(tensors)
    return m, meta


def save_model(model, path, extra_meta):
    meta = {"config": json.dumps(model.c.to_dict())}
    meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in extra_meta.items()})
    safetensors_io.save(path, model.export_tensors(), meta)


def update_records(path, key, value):
    rec = {}
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
    rec[key] = value
    with open(path, "w") as f:
        json.dump(rec, f, indent=2, sort_keys=True)
        f.write("\n")


def here(*p):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), *p)


def model_dir(*p):
    return os.path.normpath(here("..", "model", *p))


def python_version_line():
    return f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}"
