#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The torch peers of the GPU check (bench/gpu_check/run.sh), in one process so that torch is
imported once: torch_decode.py on the decode shapes of the benchmark subset, then
torch_prefill.py with SDPA (flash), then with FlexAttention and the DMS mask, whose compilation
takes longest, last. Each JSON is written as soon as its part is done, so a run cut short by its
timeout keeps what finished; the FlexAttention entries are appended to the prefill JSON.

Usage (from a pack, where torch_decode.py and torch_prefill.py sit beside this file):
  python3 peers/peers.py --decode-out torch_decode.json --prefill-out torch_prefill.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# In a pack the peer scripts are beside this file; in the repository they are in bench/peers.
sys.path[:0] = [HERE, os.path.join(HERE, "..", "peers")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--prefill-tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--decode-reps", type=int, default=20)
    p.add_argument("--prefill-reps", type=int, default=10)
    p.add_argument("--decode-out", default="torch_decode.json")
    p.add_argument("--prefill-out", default="torch_prefill.json")
    return p.parse_args()


def run(module: str, argv: list[str]) -> int:
    """Runs module.main() as if `python3 module.py argv...` had been called."""
    mod = importlib.import_module(module)
    saved = sys.argv
    sys.argv = [module + ".py"] + argv
    try:
        return int(mod.main() or 0)
    except SystemExit as e:  # argparse errors
        return int(e.code or 0)
    finally:
        sys.argv = saved


def main() -> int:
    args = parse_args()
    ints = lambda xs: [str(x) for x in xs]  # noqa: E731
    rc = run("torch_decode", ["--batches", *ints(args.decode_batches), "--contexts",
                              *ints(args.decode_contexts), "--reps", str(args.decode_reps),
                              "--warmup", "3", "--out", args.decode_out])
    prefill = ["--tokens", *ints(args.prefill_tokens), "--reps", str(args.prefill_reps), "--warmup", "2"]
    rc |= run("torch_prefill", prefill + ["--backends", "sdpa_flash", "--out", args.prefill_out])
    # FlexAttention last, into a scratch file, then appended: a timeout during its compilation
    # leaves the SDPA entries in place.
    fd, flex = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        flex_rc = run("torch_prefill", prefill + ["--backends", "flex_dms", "--out", flex])
        rc |= flex_rc
        if flex_rc == 0:
            entries = []
            if os.path.exists(args.prefill_out):
                with open(args.prefill_out) as f:
                    entries = json.load(f)
            with open(flex) as f:
                entries += json.load(f)
            with open(args.prefill_out, "w") as f:
                json.dump(entries, f, indent=1)
    finally:
        os.unlink(flex)
    return rc


if __name__ == "__main__":
    sys.exit(main())
