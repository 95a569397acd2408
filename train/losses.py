"""Training losses over the sampled score matrix (spec §5).

`scores` is O [R, R + S]: row j's positive is column j (the diagonal), every other column is a
negative for it. Each function returns the SUM over rows; the trainer divides by the configured
batch size. Ranking losses (bpr-max, top1-max, bpr, top1) apply ELU(elu_param) first
(elu_param = 0: linear); cross-entropy applies the (logq-corrected) softmax.

`col_weight` [C] (optional, > 0): column c stands for col_weight[c] identical columns, so the CPU
step can score each distinct sampled item once and weigh it by how often it was drawn. With it,
every sum over columns is the weighted sum (the same loss as on the expanded columns); without it
the code is the plain form the GPU step runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gru4rec.train.params import LOSSES

_FLOOR = 1e-24  # keeps log() finite when a probability underflows (official)


def cross_entropy(scores: Tensor, logq_cols: Tensor | None, w: Tensor | None = None) -> Tensor:
    """-log softmax(o_j - logq*log q)_jj; log-softmax form (spec allows it; more stable than exp/sum)."""
    if logq_cols is not None:
        scores = scores - logq_cols
    if w is not None:  # k copies of a column add log k to its logit in the normaliser
        scores = scores + torch.log(w)
    return -torch.diagonal(F.log_softmax(scores, dim=1)).sum()


def _negative_softmax(scores: Tensor, w: Tensor | None = None) -> Tensor:
    """Softmax over the negatives of each row: the diagonal is zeroed before the max and masked out."""
    off = 1.0 - torch.eye(scores.shape[0], scores.shape[1], dtype=scores.dtype, device=scores.device)
    x = scores * off
    e = torch.exp(x - x.max(dim=1, keepdim=True).values) * (off if w is None else off * w)
    return e / e.sum(dim=1, keepdim=True)


def _activate(scores: Tensor, elu_param: float) -> Tensor:
    return F.elu(scores, alpha=elu_param) if elu_param > 0 else scores


def bpr_max(scores: Tensor, bpreg: float, elu_param: float, w: Tensor | None = None) -> Tensor:
    o = _activate(scores, elu_param)
    s = _negative_softmax(o, w)
    t = torch.diagonal(o).unsqueeze(1)
    rank = -torch.log((s * torch.sigmoid(t - o)).sum(1) + _FLOOR)
    return (rank + bpreg * (s * o * o).sum(1)).sum()


def top1_max(scores: Tensor, elu_param: float, w: Tensor | None = None) -> Tensor:
    o = _activate(scores, elu_param)
    s = _negative_softmax(o, w)
    t = torch.diagonal(o).unsqueeze(1)
    return (s * (torch.sigmoid(o - t) + torch.sigmoid(o * o))).sum()


def bpr(scores: Tensor, elu_param: float, w: Tensor | None = None) -> Tensor:
    """Theano form: summed over all columns, diagonal included (a constant log 2 per row)."""
    o = _activate(scores, elu_param)
    t = torch.diagonal(o).unsqueeze(1)
    if w is None:
        return -F.logsigmoid(t - o).sum()
    return -(F.logsigmoid(t - o) * w).sum()


def top1(scores: Tensor, elu_param: float, w: Tensor | None = None) -> Tensor:
    """Theano form: mean over all columns, minus the positive's own regulariser term."""
    o = _activate(scores, elu_param)
    t = torch.diagonal(o)
    terms = torch.sigmoid(o - t.unsqueeze(1)) + torch.sigmoid(o * o)
    if w is None:
        n_cols = o.shape[1]
        per_row = terms.mean(1) - torch.sigmoid(t * t) / n_cols
    else:
        n_cols = w.sum()
        per_row = ((terms * w).sum(1) - torch.sigmoid(t * t)) / n_cols
    return per_row.sum()


def row_loss_sum(
    name: str,
    scores: Tensor,
    *,
    logq_cols: Tensor | None = None,
    bpreg: float = 1.0,
    elu_param: float = 0.0,
    col_weight: Tensor | None = None,
) -> Tensor:
    """Dispatch by loss name; sum over rows."""
    w = col_weight
    if name == "cross-entropy":
        return cross_entropy(scores, logq_cols, w)
    if name == "bpr-max":
        return bpr_max(scores, bpreg, elu_param, w)
    if name == "top1-max":
        return top1_max(scores, elu_param, w)
    if name == "bpr":
        return bpr(scores, elu_param, w)
    if name == "top1":
        return top1(scores, elu_param, w)
    raise ValueError(f"unknown loss {name!r}; use one of {', '.join(LOSSES)}")
