# SPDX-License-Identifier: Apache-2.0
"""DMS retrofit of the dense tiny model (the paper's recipe, at small scale), seeded and logged.

    python3 examples/mqar/train/train_dms.py --ratio 8 --aux-weight 5 --steps 1200   # model/dms_cr8.*

(the shipped checkpoints' commands are in README.md, "The tiny model"; 43-58 minutes each on one
thread of a shared 2-core machine).

The decision logit of token t for KV head g is read from the last channel of query head g*G
(the first of its group), l = 100 * q - 5 (dms::take_decision_logits), and that channel is zeroed
before attention. The decision applies to token t-1 (the shift rule). During training it is
relaxed with a Gumbel-sigmoid, alpha = sigmoid((l + logistic noise) / tau), and a key j older than
the window (t - j > w) enters every query's attention with log(1 - alpha_j) added to its logit
(delayed eviction). Loss: KL(teacher || student) of the next-token distributions against the frozen
dense model, at the answer positions (the dense model was trained only there; everywhere else it
predicts random filler, and distilling that noise drowned the answers' signal 34 to 1 in early
runs: see docs/accuracy.md), plus the compression term relu(kept - target): `kept` is the
expected fraction of a row's tokens still in memory at the end of the sequence (the window's w+1
newest tokens always are), averaged over layers, KV heads and sequences, i.e. 1 / the memory
compression the library reports; the target eviction rate 1 - kept rises linearly from 0 to
1 - 1/ratio over the first `--anneal` of the steps and then stays. At the end the checkpoint is
evaluated with hard decisions (l > 0 evicts, exactly the library's rule) and the accuracy and
compression recorded in model/records.json, which the C++ CI guard checks.

The decision channel's weights start at zero, so every logit starts at -5 (keep everything).
"""

import argparse
import copy
import json

import numpy as np
import torch
import torch.nn.functional as F

import common
import task
from model import DmsMode


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, required=True, help="target memory compression")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--anneal", type=float, default=0.8, help="fraction of the steps to reach the target")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--decision-lr", type=float, default=3e-5, help="learning rate of the decision rows")
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--kl-positions", choices=["answers", "all"], default="answers",
                    help="where to distill: the answer positions (the only ones the dense model was "
                         "trained on; elsewhere its predictions are of random filler) or all")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher", default=common.model_dir("dense.safetensors"))
    ap.add_argument("--name", default=None, help="output name (default dms_cr<ratio>[_w<window>])")
    ap.add_argument("--out", default=common.model_dir())
    args = ap.parse_args()
    name = args.name or f"dms_cr{args.ratio:g}" + ("" if args.window == 16 else f"_w{args.window}")
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "teacher")}

    common.setup_threads(args.threads)
    log = common.Log(f"{args.out}/{name}.log")
    log(f"train_dms {name}:", recipe, "|", common.python_version_line())
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    teacher, _ = common.load_model(args.teacher)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    c = student.c
    G = c.n_heads // c.n_kv_heads
    for p in student.parameters():
        p.requires_grad_(True)
    # The decision rows start silent (every logit is -offset = -5: keep everything) and train with
    # their own, smaller learning rate: Adam moves every weight by about lr per step, and a logit
    # is 100 x a dot product over d_model weights, so lr 1e-3 would swing logits by ~10 per step.
    decisions = []
    for layer in student.layers:
        layer.decision = torch.nn.Parameter(torch.zeros(c.n_kv_heads, c.d_model))
        decisions.append(layer.decision)
    base = [p for p in student.parameters() if all(p is not d for d in decisions)]
    opt = torch.optim.AdamW([{"params": [p for p in base if p.dim() == 2], "weight_decay": 0.1, "lr0": args.lr},
                             {"params": [p for p in base if p.dim() < 2], "weight_decay": 0.0, "lr0": args.lr},
                             {"params": decisions, "weight_decay": 0.0, "lr0": args.decision_lr}],
                            lr=args.lr, betas=(0.9, 0.98))
    dms_train = DmsMode(window=args.window, mode="train", tau=args.tau)
    C, N, Q = task.EVAL["C"], task.EVAL["N"], task.EVAL["Q"]
    T = 1 + C + 2 * Q
    final_kept = 1.0 / args.ratio

    for step in range(args.steps):
        progress = min(1.0, step / max(1.0, args.anneal * args.steps))
        target_kept = 1.0 - (1.0 - final_kept) * progress
        for g in opt.param_groups:
            g["lr"] = g["lr0"] * min(1.0, (step + 1) / 50)
        tok, qpos = task.sample(rng, args.batch, C, N, Q)
        x = torch.from_numpy(tok)
        with torch.no_grad():
            t_logits, _ = teacher(x)
        s_logits, alphas = student(x, dms_train)
        pos = torch.from_numpy(qpos) if args.kl_positions == "answers" else slice(None)
        kl = F.kl_div(F.log_softmax(s_logits[:, pos], -1), F.log_softmax(t_logits[:, pos], -1),
                      log_target=True, reduction="none").sum(-1).mean()
        kept = expected_kept(alphas, T, args.window)
        aux = F.relu(kept - target_kept)
        loss = kl + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            acc = (s_logits[:, qpos].argmax(-1) == x[:, qpos + 1]).float().mean().item()
            log(f"step {step} kl {kl.item():.4f} kept {kept.item():.3f} (target {target_kept:.3f}, "
                f"CR {1 / kept.item():.2f}) acc {acc:.3f} | {kept_by_kind(alphas, x)}")
    train_s = log.elapsed()
    for layer in student.layers:
        layer.fold_decision()  # the library reads the decision from the query channel

    dms_hard = DmsMode(window=args.window, mode="hard")
    tokens, qpos = task.eval_set()
    correct, cr = common.evaluate(student, tokens, qpos, dms_hard)
    sub = common.CI_SUBSET
    acc, mem = float(correct.mean()), float(1.0 / np.mean(1.0 / cr))
    sub_cr = float(1.0 / np.mean(1.0 / cr[:sub]))
    log(f"hard decisions, evaluation set: accuracy {acc:.4f} ({int(correct.sum())}/{correct.size}), "
        f"memory CR {mem:.3f}; first {sub} sequences: {correct[:sub].mean():.4f}, CR {sub_cr:.3f}")
    common.save_model(student, f"{args.out}/{name}.safetensors", {
        "trained_by": "train_dms.py", "args": recipe,
        "dms": {"window": args.window, "scale": dms_hard.scale, "offset": dms_hard.offset}})
    common.update_records(f"{args.out}/records.json", name, {
        "eval_accuracy": acc, "eval_correct": int(correct.sum()), "eval_answers": int(correct.size),
        "eval_memory_cr": mem, "ci_subset_sequences": sub, "ci_subset_correct": int(correct[:sub].sum()),
        "ci_subset_memory_cr": sub_cr, "window": args.window, "target_ratio": args.ratio,
        "train_steps": args.steps, "train_seconds": round(train_s), "seed": args.seed})
    log(f"wrote {name}.safetensors; total {log.elapsed():.0f} s")


def kept_by_kind(alphas, x):
    """Diagnostics: per layer and KV head, the mean keep probability (1 - alpha) of the key,
    value and filler tokens of the context."""
    kinds = {"k": (x >= task.KEYS[0]) & (x < task.KEYS[1]), "v": (x >= task.VALUES[0]) & (x < task.VALUES[1]),
             "f": x >= task.FILLER[0]}
    out = []
    for l, a in enumerate(alphas):
        for h in range(a.shape[1]):
            keep = 1 - a[:, h].detach()  # [B, T]
            out.append(f"L{l}h{h} " + " ".join(f"{k}{keep[m].mean().item():.2f}" for k, m in kinds.items()))
    return "; ".join(out)


def expected_kept(alphas, T, window):
    """Mean over rows (layer, sequence, KV head) of the expected fraction of the row's T tokens
    in memory at the end: tokens older than the window survive with 1 - alpha, the w+1 newest
    always. The hard-decision version of this is 1 / the library's memory compression."""
    old = max(T - window - 1, 0)
    fr = [((1 - a[:, :, :old]).sum(-1) + (T - old)) / T for a in alphas]  # [B, Hk] each
    return torch.stack(fr).mean()


if __name__ == "__main__":
    main()
