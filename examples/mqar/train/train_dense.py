# SPDX-License-Identifier: Apache-2.0
"""Trains the dense tiny model on MQAR from scratch (seeded, logged), then writes the shipped files.

    python3 examples/mqar/train/train_dense.py --threads 1   # 545 s measured, one thread, shared 2-core VM

Writes, into examples/mqar/model/: dense.safetensors (weights + config in its metadata),
eval.safetensors (the fixed evaluation set), parity.safetensors (this model's logits on three
evaluation sequences, for the C++ parity test), records.json (accuracies measured here), and
dense.log (this run's log).

Recipe (measured on this kind of machine: ../../../docs/accuracy.md and shared notes): AdamW
(0.9, 0.98), lr 1e-3 after a 100-step warmup, weight decay 0.1 on matrices, grad clip 1.0, loss on
the answers only, fresh samples every step, and a curriculum that advances when the moving average
of training accuracy passes 0.9:  (C, N, Q, batch) = (8, 4, 4, 256) -> (64, 8, 8, 64) ->
(512, 16, 16, 16); the last stage runs until the average passes `--target` (or `--max-steps`).
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import common
import safetensors_io
import task
from model import Config, TinyLlama

STAGES = [(8, 4, 4, 256), (64, 8, 8, 64), (512, 16, 16, 16)]


def make_optimizer(model, lr):
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--target", type=float, default=0.995, help="EMA train accuracy that ends the last stage")
    ap.add_argument("--min-final-steps", type=int, default=150)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--out", default=common.model_dir())
    args = ap.parse_args()

    common.setup_threads(args.threads)
    log = common.Log(f"{args.out}/dense.log")
    recipe = {k: v for k, v in vars(args).items() if k != "out"}  # no machine paths in shipped files
    log("train_dense:", recipe, "|", common.python_version_line())
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    model = TinyLlama(Config())
    model.init_weights(0.06)
    log("parameters:", sum(p.numel() for p in model.parameters()))
    opt = make_optimizer(model, args.lr)

    stage, in_stage, ema, step = 0, 0, 0.0, 0
    while step < args.max_steps:
        C, N, Q, B = STAGES[stage]
        tok, qpos = task.sample(rng, B, C, N, Q)
        x = torch.from_numpy(tok)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 100)
        logits, _ = model(x)
        target = x[:, qpos + 1]
        loss = F.cross_entropy(logits[:, qpos].reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc = (logits[:, qpos].argmax(-1) == target).float().mean().item()
        ema = 0.9 * ema + 0.1 * acc
        step += 1
        in_stage += 1
        if step % 25 == 0:
            log(f"step {step} stage {stage} C={C} loss {loss.item():.4f} acc {acc:.3f} ema {ema:.3f}")
        last = stage == len(STAGES) - 1
        if not last and ema > 0.9 and in_stage >= 50:
            log(f"stage {stage} done at step {step} (ema {ema:.3f})")
            stage, in_stage, ema = stage + 1, 0, 0.0
        elif last and ema > args.target and in_stage >= args.min_final_steps:
            log(f"last stage reached ema {ema:.4f} at step {step}")
            break
    train_s = log.elapsed()
    log(f"training done: {step} steps, {train_s:.0f} s")

    tokens, qpos = task.eval_set()
    correct, _ = common.evaluate(model, tokens, qpos)
    acc = float(correct.mean())
    sub = float(correct[: common.CI_SUBSET].mean())
    log(f"evaluation set: accuracy {acc:.4f} ({int(correct.sum())}/{correct.size}); "
        f"first {common.CI_SUBSET} sequences: {sub:.4f}")

    common.save_model(model, f"{args.out}/dense.safetensors",
                      {"trained_by": "train_dense.py", "args": recipe})
    safetensors_io.save(f"{args.out}/eval.safetensors",
                        {"tokens": tokens.astype(np.uint8), "answer_positions": qpos.astype(np.int32)},
                        {"task": "MQAR", "seed": str(task.EVAL_SEED), **{k: str(v) for k, v in task.EVAL.items()},
                         "layout": "BOS, context of C tokens, Q x (query key, value); answers at answer_positions + 1"})
    write_parity(model, tokens, f"{args.out}/parity.safetensors")
    common.update_records(f"{args.out}/records.json", "dense", {
        "eval_accuracy": acc, "eval_correct": int(correct.sum()), "eval_answers": int(correct.size),
        "ci_subset_sequences": common.CI_SUBSET, "ci_subset_correct": int(correct[: common.CI_SUBSET].sum()),
        "train_steps": step, "train_seconds": round(train_s), "threads": args.threads, "seed": args.seed})
    log(f"wrote the model files; total {log.elapsed():.0f} s")


@torch.no_grad()
def write_parity(model, tokens, path, seqs=(0, 1, 2)):
    """Logits of `seqs` at every 8th position and at every query-block position."""
    model.eval()
    x = torch.from_numpy(tokens[list(seqs)])
    logits, _ = model(x)
    T = x.shape[1]
    C = task.EVAL["C"]
    pos = sorted(set(range(0, 1 + C, 8)) | set(range(1 + C, T)))
    safetensors_io.save(path, {"tokens": x.numpy().astype(np.int32),
                               "positions": np.array(pos, dtype=np.int32),
                               "logits": logits[:, pos].numpy().astype(np.float32)},
                        {"model": "dense.safetensors", "sequences": ",".join(map(str, seqs))})


if __name__ == "__main__":
    main()
