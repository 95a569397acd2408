"""The training step on the CPU: forward and hand-written backward, no autograd graph (spec §2-§6).

Same maths as the trainer's autograd step (`Trainer._reference_step`, which the GPU runs), laid out
for a CPU, where every small op and every pass over gathered rows costs:

- Sampled negatives are scored once per distinct item: the S drawn samples become U distinct
  columns, each weighted by how often it was drawn (`losses.row_loss_sum(col_weight=...)`), which is
  the same loss over fewer, exact columns; the output GEMMs and the item-row traffic shrink by S/U.
  With bpr-max, a sampled item that is also a target gets no column of its own: its draws join the
  target's column (`Columns`' merge), so there are fewer columns still.
- Gradients are written out: cross-entropy's closed form (softmax minus the one-hot target), the
  output layer's two GEMMs, the GRU cell's backward. The ranking losses take their score gradient
  from autograd over the small R x C loss graph only.
- Layouts MKL is fastest with at these shapes: the GRU weights column-major (`column_major_`,
  before the optimiser makes its state like them), so the forward products x W^T are plain GEMMs
  (the weight gradients, written in the same layout, give a little of that back); the scores as
  [C, R] = W_rows out^T + b, the losses' closed forms working down the columns.
- A row whose session starts this step has a zero state, so the products with h (forward, and the
  W_hh gradient) run over the other rows only, exactly: a good share of the rows start a session at
  each step.
- Dropout masks come from `gru4rec.dropout.mask`, as in the model's own training forward, in the
  same order, so a seed gives the same masks as the autograd step.
- Item-table gradient rows go to the optimiser's `step_parts` as they are; Adagrad sums duplicates
  and updates each touched row in one numba loop (train/cpu_kernels.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gru4rec.allocator import keep_freed_memory
from gru4rec.dropout import mask as dropout_mask
from gru4rec.model import GRU4Rec
from gru4rec.train.cpu_kernels import Columns, bpr_max_grad, gru_cell_backward, warm_up
from gru4rec.train.losses import _FLOOR, row_loss_sum
from gru4rec.train.params import TrainConfig


def column_major_(model: GRU4Rec) -> None:
    """Re-lays the GRU weight matrices [3H, n] column-major in place: same values, same shapes,
    W^T contiguous. Called before the optimiser is built (its state copies the layout)."""
    for w in (*model.W_ih, *model.W_hh):
        w.data = w.data.T.contiguous().T


def _hidden_product(h_live: Tensor, live: Tensor | None, b: Tensor, w: Tensor, rows: int) -> Tensor:
    """h w^T + b over all rows from the live rows of h: a reset row is zero, its product is b.
    A third of the rows start a session at each step with the official presets on rsc15, so this
    saves a third of the two GEMMs with h (forward and weight gradient)."""
    if live is None:
        return torch.addmm(b, h_live, w.T)
    out = b.expand(rows, -1).contiguous()
    return out.index_copy_(0, live, torch.addmm(b, h_live, w.T))


class CpuStep:
    """Callable: (inp, tgt, keep, smp, hidden) -> (sum of row losses, new states), updating in place."""

    def __init__(self, model: GRU4Rec, cfg: TrainConfig, opt, dense: list[Tensor], log_q_in, log_q_smp):
        self.model, self.cfg, self.opt, self.dense = model, cfg, opt, dense
        self.mode = model.cfg.mode
        self.table_pos = {id(t): k for k, t in enumerate(opt.tables)}
        self.scale = 1.0 / cfg.batch_size  # the autograd step differentiates loss / batch_size
        keep_freed_memory()  # the step's MB-sized temporaries are reused, not re-faulted (gru4rec/allocator.py)
        warm_up(model.Wy.dtype)  # compile or load the numba loops before the first epoch
        self.xe = cfg.loss == "cross-entropy"
        self.columns = Columns(model.By, log_q_in, log_q_smp, cfg.logq, self.xe, merge=cfg.loss == "bpr-max")
        # each GRU layer's (W_ih, W_hh, b_ih, b_hh), looked up once (nn.Module attribute and
        # ParameterList lookups are ~40 Python calls a step); parameters are updated in place
        self.cells = list(zip(model.W_ih, model.W_hh, model.b_ih, model.b_hh))
        self.in_table = model.input_table

    # -- forward -------------------------------------------------------------------------------
    def _forward(
        self, x: Tensor, hidden: list[Tensor], live: Tensor | None
    ) -> tuple[Tensor, list[Tensor], list]:
        """GRU layers with dropout; returns (output, new states, what the backward needs). live: the
        rows whose state was kept (None: all); the others are zero."""
        m, cfg = self.model, self.model.cfg
        saved, new_hidden = [], []
        rest = hidden
        if self.mode == "onehot":
            h = hidden[0]
            H = cfg.layers[0]
            gx = x + m.Bx0  # x is the row lookup x W_x
            grz = h @ m.Wrz0
            r = torch.sigmoid(gx[:, H : 2 * H] + grz[:, :H])
            z = torch.sigmoid(gx[:, 2 * H :] + grz[:, H:])
            rh = r * h
            c = torch.tanh(gx[:, :H] + rh @ m.Wh0)
            x = (1.0 - z) * h + z * c
            mask = dropout_mask(x, cfg.dropout_p_embed)  # [quirk] p_embed on the one-hot layer (spec §2.4)
            if mask is not None:
                x = x * mask
            saved.append(("onehot", h, r, z, c, rh, mask))
            new_hidden.append(x)
            rest = hidden[1:]
            in_mask = None
        else:
            in_mask = dropout_mask(x, cfg.dropout_p_embed)
            if in_mask is not None:
                x = x * in_mask
        for i, h in enumerate(rest):
            H = h.shape[1]
            w_ih, w_hh, b_ih, b_hh = self.cells[i]
            gi = torch.addmm(b_ih, x, w_ih.T)
            h_live = h if live is None else h.index_select(0, live)
            gh = _hidden_product(h_live, live, b_hh, w_hh, len(h))
            # in place in gi (not kept for the backward): 5 ops, no temporaries, instead of 10 and 9
            rz = gi[:, : 2 * H].add_(gh[:, : 2 * H]).sigmoid_()
            r, z = rz[:, :H], rz[:, H:]
            gh_n = gh[:, 2 * H :]
            n = gi[:, 2 * H :].addcmul_(r, gh_n).tanh_()
            y = torch.lerp(n, h, z)  # (1 - z) n + z h
            mask = dropout_mask(y, cfg.dropout_p_hidden)
            if mask is not None:
                y.mul_(mask)
            saved.append(("cell", i, x, h, r, z, n, gh_n, mask, h_live, live))
            new_hidden.append(y)
            x = y
        return x, new_hidden, saved + [in_mask]

    # -- backward ------------------------------------------------------------------------------
    def _backward(self, dy: Tensor, saved: list, grads: dict) -> Tensor:
        """From d(output) to the dense weight gradients (into `grads`) and d(input rows)."""
        m = self.model
        in_mask = saved.pop()
        for entry in reversed(saved):
            if entry[0] == "cell":
                _, i, x, h, r, z, n, gh_n, mask, h_live, live = entry
                w_ih, w_hh, b_ih, b_hh = self.cells[i]
                dgi, dgh = gru_cell_backward(dy, mask, h, r, z, n, gh_n)
                grads[id(w_ih)] = (x.T @ dgi).T  # dgiᵀ x, column-major like the weight
                grads[id(b_ih)] = dgi.sum(0)
                dgh_live = dgh if live is None else dgh.index_select(0, live)
                grads[id(w_hh)] = (h_live.T @ dgh_live).T
                grads[id(b_hh)] = dgh.sum(0)
                dy = dgi @ w_ih
            else:
                _, h, r, z, c, rh, mask = entry
                if mask is not None:
                    dy = dy * mask
                dpre_c = dy * z * (1.0 - c * c)
                dpre_z = dy * (c - h) * z * (1.0 - z)
                grads[id(m.Wh0)] = rh.T @ dpre_c
                dpre_r = (dpre_c @ m.Wh0.T) * h * r * (1.0 - r)
                drz = torch.cat([dpre_r, dpre_z], 1)
                grads[id(m.Wrz0)] = h.T @ drz
                dy = torch.cat([dpre_c, drz], 1)  # d(x W_x + b_x): the W_x row gradient
                grads[id(m.Bx0)] = dy.sum(0)
        if in_mask is not None:
            dy = dy * in_mask
        return dy

    def _xe_grad(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy's closed form from the shifted logits [C, R]: softmax minus the one-hot target."""
        mx = z.amax(0, keepdim=True)
        diag = torch.diagonal(z).sum()
        p = z.sub_(mx).exp_()  # in place: z is this step's own buffer; one exp serves loss and grad
        total = p.sum(0, keepdim=True)
        loss = total.log().add_(mx).sum() - diag
        p.mul_(total.reciprocal_().mul_(self.scale))  # softmax x 1/batch in one pass
        torch.diagonal(p).sub_(self.scale)
        return loss, p

    def _score_grad(self, scores_t: Tensor, w: Tensor | None):
        """(sum of row losses, d loss / d scores_t) for the [R + U, R] scores (ranking losses)."""
        cfg = self.cfg
        if cfg.loss == "bpr-max":  # written out: its autograd graph is the diginetica preset's largest cost
            return bpr_max_grad(scores_t, w, cfg.bpreg, cfg.elu_param, self.scale, _FLOOR)
        with torch.enable_grad():
            s = scores_t.T.detach().requires_grad_()
            loss = row_loss_sum(cfg.loss, s, bpreg=cfg.bpreg, elu_param=cfg.elu_param, col_weight=w)
            (ds,) = torch.autograd.grad(loss * self.scale, s)
        return loss.detach(), ds.T

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, inp: Tensor, tgt: Tensor, keep: Tensor, smp: Tensor | None, hidden: list[Tensor]):
        m, in_table = self.model, self.in_table
        # distinct sampled items, each weighted by its count: the same loss over fewer columns
        # col_b: By of each column, with XE's shift; without samples the columns are the targets
        cols, w, col_b = self.columns(tgt, smp if smp is not None else tgt[:0])

        x_rows = in_table.index_select(0, inp)
        w_rows = m.Wy.index_select(0, cols)
        live = keep.reshape(-1).nonzero().view(-1)  # rows that go on with their session's state
        live = None if len(live) == len(keep) else live
        out, new_hidden, saved = self._forward(x_rows, [h * keep for h in hidden], live)
        # scores as [C, R], W out^T: MKL's fastest layout for this product (a few rows by many columns)
        scores_t = torch.addmm(col_b.unsqueeze(1), w_rows, out.T)
        loss, ds_t = self._xe_grad(scores_t) if self.xe else self._score_grad(scores_t, w)

        grads: dict[int, Tensor] = {}
        d_out = ds_t.T @ w_rows
        d_wrows = ds_t @ out
        d_brows = ds_t.sum(1, keepdim=True)
        d_x = self._backward(d_out, saved, grads)

        # item tables: each table's gradient rows as parts, summed per row inside the update
        rows: list = [None] * len(self.opt.tables)
        rows[self.table_pos[id(m.By)]] = [(cols, d_brows)]
        if self.mode == "shared":  # input and output roles of a W_y row are summed
            rows[self.table_pos[id(m.Wy)]] = [(cols, d_wrows), (inp, d_x)]
        else:
            rows[self.table_pos[id(m.Wy)]] = [(cols, d_wrows)]
            rows[self.table_pos[id(in_table)]] = [(inp, d_x)]
        self.opt.step_parts([grads[id(p)] for p in self.dense], rows)
        return loss, new_hidden
