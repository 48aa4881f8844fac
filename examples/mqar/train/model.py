# SPDX-License-Identifier: Apache-2.0
"""The tiny Llama-style decoder, in PyTorch: RMSNorm (pre-norm), RoPE (rotate-half), GQA, SwiGLU,
tied embeddings, no biases. The C++ runner (examples/mqar/model.hpp) computes exactly this.

With a `dms` argument the model also produces DMS decision logits the way the library reads them
(dms::take_decision_logits): for every KV head g, the last channel of query head g*G, taken before
RoPE as scale * q - offset, then zeroed before and after RoPE. The decision of token t applies to
token t-1 (the shift rule), and a key j older than the window (t - j > w) is
  * "train": kept with weight 1 - alpha_j, alpha_j = sigmoid((l + logistic noise) / tau)
    (a Gumbel-sigmoid), added to the attention logit as log(1 - alpha_j);
  * "hard":  dropped iff l > 0, exactly the library's visibility rule (spec "DMS", rule 4).
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    mlp_hidden: int = 128
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def to_dict(self):
        return asdict(self)


@dataclass
class DmsMode:
    window: int = 16
    mode: str = "hard"  # "train" (Gumbel-sigmoid, soft mask) or "hard" (library semantics)
    tau: float = 0.1
    scale: float = 100.0  # dms::decision_readout defaults (Qwen3-8B-DMS-8x)
    offset: float = 5.0


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(T, head_dim, base):
    """cos, sin [T, head_dim], computed in float64 and rounded once, as the C++ runner does."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x, cos, sin):  # x [B, heads, T, D]
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos + rot * sin


class Layer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.wq = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.w_gate = nn.Linear(c.d_model, c.mlp_hidden, bias=False)
        self.w_up = nn.Linear(c.d_model, c.mlp_hidden, bias=False)
        self.w_down = nn.Linear(c.mlp_hidden, c.d_model, bias=False)
        # During a DMS retrofit, the decision rows of wq (the last channel of the first query head
        # of each group) live here as their own parameter, so the optimizer can give them their
        # own learning rate (a logit is 100 x that channel). fold_decision() writes them back.
        self.decision = None  # [n_kv_heads, d_model] or None

    def fold_decision(self):
        if self.decision is None:
            return
        c, G = self.c, self.c.n_heads // self.c.n_kv_heads
        with torch.no_grad():
            for g in range(c.n_kv_heads):
                self.wq.weight[(g * G + 1) * c.head_dim - 1] = self.decision[g]
        self.decision = None

    def forward(self, x, cos, sin, dms: DmsMode = None):
        c = self.c
        B, T, _ = x.shape
        G = c.n_heads // c.n_kv_heads
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, c.n_heads, c.head_dim)
        k = self.wk(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.wv(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
        logit = None
        if dms is not None:
            first = torch.arange(c.n_kv_heads) * G  # the first query head of each group
            channel = q[:, :, first, c.head_dim - 1] if self.decision is None else h @ self.decision.t()
            logit = dms.scale * channel - dms.offset  # [B, T, Hk]
            keep = torch.ones(c.n_heads, c.head_dim)
            keep[first, c.head_dim - 1] = 0.0  # zeroed before and after RoPE
            q = q * keep
        q = apply_rope(q.transpose(1, 2), cos, sin)
        if dms is not None:
            q = q * keep[None, :, None, :]
        k = apply_rope(k, cos, sin)

        s = (q.view(B, c.n_kv_heads, G, T, c.head_dim) @ k[:, :, None].transpose(-1, -2))
        s = s * (1.0 / math.sqrt(c.head_dim))  # [B, Hk, G, T(query), T(key)]
        t = torch.arange(T)
        causal = t[None, :] <= t[:, None]  # [query, key]
        alpha = None
        if dms is not None:
            # The logit of token j+1 decides token j; the newest token is "keep".
            z = torch.cat([logit[:, 1:], torch.full_like(logit[:, :1], -1e4)], dim=1)  # [B, T, Hk]
            z = z.transpose(1, 2)  # [B, Hk, T(key)]
            old = (t[:, None] - t[None, :]) > dms.window  # [query, key]
            if dms.mode == "train":
                u = torch.rand_like(z).clamp(1e-6, 1 - 1e-6)
                zz = (z + torch.log(u) - torch.log1p(-u)) / dms.tau
                alpha = torch.sigmoid(zz)
                log_keep = F.logsigmoid(-zz)  # log(1 - alpha), stable
                s = s + torch.where(old, log_keep[:, :, None, None, :], torch.zeros(()))
            else:
                alpha = (z > 0).float()
                dropped = old & (z > 0)[:, :, None, :]  # [B, Hk, query, key]
                s = s.masked_fill(dropped[:, :, None], float("-inf"))
        s = s.masked_fill(~causal, float("-inf"))
        o = torch.softmax(s, dim=-1) @ v[:, :, None]  # [B, Hk, G, T, D]
        o = o.reshape(B, c.n_heads, T, c.head_dim).transpose(1, 2).reshape(B, T, -1)
        x = x + self.wo(o)
        h = self.mlp_norm(x)
        x = x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))
        return x, alpha


class TinyLlama(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.d_model)
        self.layers = nn.ModuleList([Layer(c) for _ in range(c.n_layers)])
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self._rope = {}

    def init_weights(self, std=0.06):
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * self.c.n_layers) if name.endswith(("wo.weight", "w_down.weight")) else std
                nn.init.normal_(p, 0.0, s)

    def rope(self, T):
        if T not in self._rope:
            self._rope[T] = rope_tables(T, self.c.head_dim, self.c.rope_base)
        return self._rope[T]

    def forward(self, tokens, dms: DmsMode = None):
        """tokens [B, T] -> logits [B, T, vocab], and per layer the decisions alpha [B, Hk, T]
        (token j's eviction weight; the last token's is 0) when dms is given."""
        cos, sin = self.rope(tokens.shape[1])
        x = self.embed(tokens)
        alphas = []
        for layer in self.layers:
            x, a = layer(x, cos, sin, dms)
            alphas.append(a)
        return self.norm(x) @ self.embed.weight.t(), alphas

    # ---- the shipped format: safetensors names, as examples/mqar/model.hpp reads them ----------
    def export_tensors(self):
        return {k: v.detach().float().contiguous().numpy() for k, v in self.state_dict().items()}

    def import_tensors(self, tensors):
        self.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})


def answers_correct(logits, tokens, qpos):
    """[B, Q] bool: the argmax at each query-key position equals the value that follows it."""
    pred = logits[:, qpos].argmax(-1)
    return pred == tokens[:, qpos + 1]
