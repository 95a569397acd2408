"""The one-step graphs that are exported (spec §2.7): plain ops only, every shape constant but batch.

`ServingStep(item_idx [B], hidden [L,B,H]) -> scores [B,N], hidden_out [L,B,H], topk_scores,
topk_idx [B,K]`, H = max(layer sizes): with unequal layers (e.g. 64,32) the state is padded, layer l
reads columns [0, H_l) of hidden[l] (the rest is ignored) and writes zeros beyond H_l in hidden_out,
so the state stays one tensor (one input, one output, one Gather in the scorer) whatever the layers;
equal layers need no Split/Pad at all; `EvalStep` adds `target_idx [B]` and returns the counts the tie modes need
(n_greater = #scores > target score, n_equal = #scores == target score, target included) instead
of the [B,N] matrix, so evaluation never moves scores off the device.

The GRU is written out gate by gate (Gather, Gemm, Sigmoid, Tanh, Add/Mul) rather than through
`GRU4Rec.gru`: that code splits gates with `chunk`, which traces to Shape/Slice arithmetic on the
batch dimension (CPU-side nodes under the CUDA EP), and the ONNX `GRU` op is avoided altogether
(gate order and `linear_before_reset` pitfalls, cuDNN fallbacks; spec §2.7). The same maths as
`gru4rec.model`, rearranged: h' = n + z (h - n) is (1 - z) n + z h with one op fewer.
Export verification (`verify.py`) replays the real `GRU4Rec.forward` against this graph.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gru4rec.errors import UserError
from gru4rec.model import GRU4Rec


def _frozen(t: Tensor, dtype: torch.dtype) -> nn.Parameter:
    # Shares storage with the model's weights when no cast is needed: the step never writes them.
    return nn.Parameter(t.detach().to(dtype).contiguous(), requires_grad=False)


class ServingStep(nn.Module):
    """Inference step over a trained model's weights; `dtype` float16 halves weights and compute.

    Inputs and outputs stay float32 whatever `dtype` is (casts at the graph edges), so a scorer
    works with either file unchanged.
    """

    def __init__(self, model: GRU4Rec, top_k: int, dtype: torch.dtype = torch.float32, topk_chunks: int = 0):
        super().__init__()
        cfg = model.cfg
        if not 1 <= top_k <= cfg.n_items:
            raise UserError(f"--top-k must be between 1 and the number of items ({cfg.n_items}), got {top_k}")
        if cfg.n_items >= 2**24:
            raise UserError(
                f"{cfg.n_items} items: counts are summed in float32, exact only below 2**24 items"
            )
        if topk_chunks < 0 or topk_chunks > cfg.n_items:
            raise UserError(
                f"--topk-chunks must be between 0 (off) and the number of items, got {topk_chunks}"
            )
        self.mode, self.top_k, self.dtype, self.topk_chunks = cfg.mode, top_k, dtype, topk_chunks
        self.n_items = self.n_cols = cfg.n_items  # n_cols: score columns, padded in EvalStep
        self.H, self.L = max(cfg.layers), len(cfg.layers)  # H: width of the (padded) state tensor
        self.sizes = list(cfg.layers)
        self.cell_sizes = self.sizes[1:] if self.mode == "onehot" else self.sizes  # torch-cell layers
        self.Wy = _frozen(model.Wy, dtype)
        self.By = _frozen(model.By.view(-1), dtype)
        if self.mode == "separate":
            self.E = _frozen(model.E, dtype)
        if self.mode == "onehot":
            # Bias folded into the gathered rows: x W_x + b is one table lookup (spec §2.2, original cell).
            self.Wx0 = _frozen(model.Wx0 + model.Bx0, dtype)
            self.Wrz0 = _frozen(model.Wrz0, dtype)
            self.Wh0 = _frozen(model.Wh0, dtype)
        self.W_ih = nn.ParameterList([_frozen(w, dtype) for w in model.W_ih])
        self.W_hh = nn.ParameterList([_frozen(w, dtype) for w in model.W_hh])
        self.b_ih = nn.ParameterList([_frozen(b, dtype) for b in model.b_ih])
        self.b_hh = nn.ParameterList([_frozen(b, dtype) for b in model.b_hh])

    def _onehot_layer(self, item_idx: Tensor, h: Tensor) -> Tensor:
        H = self.sizes[0]
        c_in, rz_in = self.Wx0[item_idx].split([H, 2 * H], 1)  # blocks [c, r, z]
        r, z = torch.sigmoid(rz_in + h @ self.Wrz0).split([H, H], 1)
        c = torch.tanh(c_in + (r * h) @ self.Wh0)
        return h + z * (c - h)

    def _torch_cell(self, layer: int, x: Tensor, h: Tensor) -> Tensor:
        H = self.cell_sizes[layer]  # a Python int: a traced `.shape` would turn Split into Slice arithmetic
        gi_rz, gi_n = nn.functional.linear(x, self.W_ih[layer], self.b_ih[layer]).split([2 * H, H], 1)
        gh_rz, gh_n = nn.functional.linear(h, self.W_hh[layer], self.b_hh[layer]).split([2 * H, H], 1)
        r, z = torch.sigmoid(gi_rz + gh_rz).split([H, H], 1)  # rows [r, z, n] as nn.GRUCell
        n = torch.tanh(gi_n + r * gh_n)
        return n + z * (h - n)

    def recur(self, item_idx: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """-> (last layer's output [B, H] in `dtype`, hidden_out [L, B, H] float32)."""
        half = self.dtype != torch.float32
        states = list((hidden.to(self.dtype) if half else hidden).unbind(0))
        # each layer's own columns of the padded state (a Split; nothing when all layers are H wide)
        states = [h if n == self.H else h.split([n, self.H - n], 1)[0] for h, n in zip(states, self.sizes)]
        new_states: list[Tensor] = []
        if self.mode == "onehot":
            x = self._onehot_layer(item_idx, states[0])
            new_states.append(x)
            states = states[1:]
        else:
            x = (self.Wy if self.mode == "shared" else self.E)[item_idx]
        for layer, h in enumerate(states):
            x = self._torch_cell(layer, x, h)
            new_states.append(x)
        # zeros beyond each layer's size (a Pad; pad widths from the config, so constants in the graph)
        hidden_out = torch.stack(
            [
                h if n == self.H else nn.functional.pad(h, (0, self.H - n))
                for h, n in zip(new_states, self.sizes)
            ]
        )
        return x, (hidden_out.float() if half else hidden_out)

    def step(self, item_idx: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """-> (scores [B, N] float32, hidden_out [L, B, H] float32)."""
        x, hidden_out = self.recur(item_idx, hidden)
        return nn.functional.linear(x, self.Wy, self.By).float(), hidden_out

    def topk(self, scores: Tensor, k: int = 0) -> tuple[Tensor, Tensor]:
        """Top-k per row; with `topk_chunks` C in two stages: top-k of each of C column chunks, then
        top-k of the C*k survivors. Same items (ties aside), but many small sorts instead of one wide
        one, which is what GPU TopK kernels are fast at. Shapes stay constants: Pad, Reshape, TopK."""
        k = k or self.top_k
        if not self.topk_chunks:
            return torch.topk(scores, k, dim=1)
        C = self.topk_chunks
        M = -(-self.n_cols // C)  # chunk width; the last chunk is padded with -inf
        k1 = min(k, M)
        padded = scores  # no Pad node (a pass over [B, N]) where the columns split evenly
        if C * M != self.n_cols:
            padded = nn.functional.pad(scores, (0, C * M - self.n_cols), value=float("-inf"))
        val1, idx1 = torch.topk(padded.reshape(-1, C, M), k1, dim=2)
        idx1 = idx1 + torch.arange(0, C * M, M, dtype=torch.int64).view(C, 1)  # chunk-local -> global
        val, pos = torch.topk(val1.reshape(-1, C * k1), k, dim=1)
        return val, idx1.reshape(-1, C * k1).gather(1, pos)

    def forward(self, item_idx: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        scores, hidden_out = self.step(item_idx, hidden)
        topk_scores, topk_idx = self.topk(scores)
        return scores, hidden_out, topk_scores, topk_idx


class EvalStep(ServingStep):
    """Serving step plus the target's tie counts; no [B, N] output.

    `count_block` M > 0 (at most 2048) makes the counts cheaper, still exact: the item matrix gets
    zero rows with a -inf bias up to a multiple of M (and of `topk_chunks`), so the GEMM itself
    writes padded scores, which are never in the top-k and never counted; each comparison is cast to
    float16 (half the bytes of float32) and summed per block of M columns, exact because every
    partial sum is an integer <= 2048; the block sums are added in float32. A float16 model keeps
    its scores in float16 here (same order and counts as their float32 casts, half the traffic).

    Approximate speed options (benchmarks only; agreement is measured, not guaranteed):
    `score_half` keeps the GRU in `dtype` but scores with a float16 copy of the item matrix (scores,
    top-k and counts from float16 scores); `rerank` R > top_k then takes the float16 top-R and
    re-scores those R items with the full-precision rows to order the top-k.
    """

    def __init__(
        self, model: GRU4Rec, top_k: int, dtype: torch.dtype = torch.float32, topk_chunks: int = 0,
        count_block: int = 0, score_half: bool = False, rerank: int = 0,
    ):  # fmt: skip
        super().__init__(model, top_k, dtype, topk_chunks)
        if not 0 <= count_block <= 2048:
            raise UserError(f"--count-block must be between 0 (off) and 2048, got {count_block}")
        if rerank and not top_k < rerank <= self.n_items:
            raise UserError(f"rerank must be between top_k and the number of items, got {rerank}")
        self.count_block, self.rerank = count_block, rerank
        pad = 0
        if count_block:
            step = math.lcm(count_block, topk_chunks or 1)
            pad = -self.n_items % step
            if pad > max(self.n_items // 10, count_block):
                raise UserError(
                    f"--count-block {count_block} with --topk-chunks {topk_chunks} pads {self.n_items} items "
                    f"by {pad} columns; pick a block that is a multiple of the chunk count"
                )
        self.n_cols = self.n_items + pad
        out_dtype = torch.float16 if score_half else dtype
        # The scoring matrix: the input table too in shared mode, unless scores get their own copy.
        self.score_half = score_half and dtype != torch.float16
        wy, by = self.Wy, self.By  # (a cat would copy the item matrix even with nothing to pad)
        if pad:
            wy = torch.cat([self.Wy, self.Wy.new_zeros(pad, self.Wy.shape[1])])
            by = torch.cat([self.By, self.By.new_full((pad,), float("-inf"))])
        if self.score_half:
            self.Wy_out, self.By_out = _frozen(wy, out_dtype), _frozen(by, out_dtype)
        else:
            self.Wy, self.By = _frozen(wy, dtype), _frozen(by, dtype)
            self.Wy_out, self.By_out = self.Wy, self.By

    def _count(self, hits: Tensor) -> Tensor:
        if not self.count_block:  # float32 sums: exact below 2**24 items, ReduceSum on every EP
            return hits.float().sum(1).long()
        blocks = hits.to(torch.float16).reshape(-1, self.n_cols // self.count_block, self.count_block)
        return blocks.sum(2).float().sum(1).long()

    def _rerank(self, x: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
        _, cand = self.topk(scores, self.rerank)  # [B, R], never a padded column
        exact = (self.Wy[cand] @ x.unsqueeze(2)).squeeze(2) + self.By[cand]
        val, pos = torch.topk(exact, self.top_k, dim=1)
        return val, cand.gather(1, pos)

    def forward(  # type: ignore[override]
        self, item_idx: Tensor, hidden: Tensor, target_idx: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        x, hidden_out = self.recur(item_idx, hidden)
        xs = x.half() if self.score_half else x
        scores = nn.functional.linear(xs, self.Wy_out, self.By_out)
        topk_scores, topk_idx = self._rerank(x, scores) if self.rerank else self.topk(scores)
        target = scores.gather(1, target_idx.unsqueeze(1))
        n_greater, n_equal = self._count(scores > target), self._count(scores == target)
        return hidden_out, topk_scores.float(), topk_idx, n_greater, n_equal


SERVING_IO = (["item_idx", "hidden"], ["scores", "hidden_out", "topk_scores", "topk_idx"])
EVAL_IO = (
    ["item_idx", "hidden", "target_idx"],
    ["hidden_out", "topk_scores", "topk_idx", "n_greater", "n_equal"],
)
