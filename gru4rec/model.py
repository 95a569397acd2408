"""The GRU4Rec network (spec §2): item input -> GRU layer(s) -> scores over items.

Input modes (exactly one):
  shared    (`constrained_embedding=True`): the input vector of item i is row i of the output
            matrix W_y, so layer 1 takes H_L inputs;
  separate  (`embedding=D`): its own table E [N, D];
  one-hot   (`embedding=0`, not constrained): layer 1 is the original GRU4Rec cell whose input
            product x W_x is a row lookup of W_x [N, 3H_1] (the one-hot vector is never built).
Every other layer is the torch `nn.GRUCell` variant, written out as explicit matrix products so
the same maths trains, exports to plain ONNX ops and captures in CUDA graphs.

Item tables (W_y, b_y, E, W_x) are accessed by row. `forward` gathers rows with plain indexing;
the trainer gathers the rows itself (`gru` / `score_rows`) so it can update only touched rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gru4rec.dropout import dropout


@dataclass
class ModelConfig:
    n_items: int
    layers: list[int] = field(default_factory=lambda: [100])
    embedding: int = 0  # 0: none; D > 0: separate embedding of size D (ignored when constrained)
    constrained_embedding: bool = True
    dropout_p_embed: float = 0.0
    dropout_p_hidden: float = 0.0

    @property
    def mode(self) -> str:
        if self.constrained_embedding:
            return "shared"
        return "separate" if self.embedding > 0 else "onehot"

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform_(t: Tensor, rows: int, cols: int, gen: torch.Generator | None) -> Tensor:
    a = math.sqrt(6.0 / (rows + cols))  # Glorot on one gate block (spec §2.5)
    with torch.no_grad():
        return t.uniform_(-a, a, generator=gen)


class GRU4Rec(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int | None = 42):
        super().__init__()
        if not cfg.layers or any(h <= 0 for h in cfg.layers):
            raise ValueError("layers must be a non-empty list of positive sizes")
        self.cfg = cfg
        n, hs = cfg.n_items, cfg.layers
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        self.Wy = nn.Parameter(_uniform_(torch.empty(n, hs[-1]), n, hs[-1], gen))
        self.By = nn.Parameter(torch.zeros(n, 1))
        mode = cfg.mode
        if mode == "separate":
            self.E = nn.Parameter(_uniform_(torch.empty(n, cfg.embedding), n, cfg.embedding, gen))
        if mode == "onehot":
            h = hs[0]
            self.Wx0 = nn.Parameter(torch.cat([_uniform_(torch.empty(n, h), n, h, gen) for _ in range(3)], 1))
            self.Bx0 = nn.Parameter(torch.zeros(3 * h))
            self.Wrz0 = nn.Parameter(
                torch.cat([_uniform_(torch.empty(h, h), h, h, gen) for _ in range(2)], 1)
            )
            self.Wh0 = nn.Parameter(_uniform_(torch.empty(h, h), h, h, gen))
        n_in = {"shared": hs[-1], "separate": cfg.embedding, "onehot": hs[0]}[mode]
        self.W_ih, self.W_hh = nn.ParameterList(), nn.ParameterList()
        self.b_ih, self.b_hh = nn.ParameterList(), nn.ParameterList()
        first_torch_layer = 1 if mode == "onehot" else 0
        for h in hs[first_torch_layer:]:
            # nn.GRUCell layout: rows [r, z, n] of 3H, applied as x @ W.T
            self.W_ih.append(
                nn.Parameter(torch.cat([_uniform_(torch.empty(h, n_in), n_in, h, gen) for _ in range(3)]))
            )
            self.W_hh.append(
                nn.Parameter(torch.cat([_uniform_(torch.empty(h, h), h, h, gen) for _ in range(3)]))
            )
            self.b_ih.append(nn.Parameter(torch.zeros(3 * h)))
            self.b_hh.append(nn.Parameter(torch.zeros(3 * h)))
            n_in = h

    # ----------------------------------------------------------------------------------------------
    @property
    def input_table(self) -> Tensor:
        """The table whose rows are the step input: W_y (shared), E (separate) or W_x (one-hot)."""
        return {
            "shared": self.Wy,
            "separate": getattr(self, "E", None),
            "onehot": getattr(self, "Wx0", None),
        }[self.cfg.mode]

    def sparse_parameters(self) -> list[Tensor]:
        """Item tables: updated row-wise by the official optimiser."""
        return [
            p
            for p in (self.Wy, self.By, getattr(self, "E", None), getattr(self, "Wx0", None))
            if p is not None
        ]

    def init_hidden(self, batch: int, device=None) -> list[Tensor]:
        dev = device if device is not None else self.Wy.device
        return [torch.zeros(batch, h, device=dev) for h in self.cfg.layers]

    # ----------------------------------------------------------------------------------------------
    def gru(self, inp: Tensor, hidden: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Run every layer for one step from gathered input rows; returns (output, new states).

        Dropout (training only) is applied to layer outputs and the dropped output is stored as
        the state, as the official code does.
        """
        cfg, drop = self.cfg, self.training
        new_hidden: list[Tensor] = []
        x = inp
        if cfg.mode == "onehot":
            h = hidden[0]
            H = cfg.layers[0]
            gx = x + self.Bx0  # x already is the row lookup x W_x
            grz = h @ self.Wrz0
            r = torch.sigmoid(gx[:, H : 2 * H] + grz[:, :H])
            z = torch.sigmoid(gx[:, 2 * H :] + grz[:, H:])
            c = torch.tanh(gx[:, :H] + (r * h) @ self.Wh0)
            x = (1.0 - z) * h + z * c
            x = dropout(x, cfg.dropout_p_embed, drop)  # [quirk] PyTorch one-hot uses p_embed here
            new_hidden.append(x)
            rest = hidden[1:]
        else:
            x = dropout(x, cfg.dropout_p_embed, drop)
            rest = hidden
        for i, h in enumerate(rest):
            gi = F.linear(x, self.W_ih[i], self.b_ih[i])
            gh = F.linear(h, self.W_hh[i], self.b_hh[i])
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r = torch.sigmoid(i_r + h_r)
            z = torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            x = (1.0 - z) * n + z * h
            x = dropout(x, cfg.dropout_p_hidden, drop)
            new_hidden.append(x)
        return x, new_hidden

    @staticmethod
    def score_rows(out: Tensor, wy_rows: Tensor, by_rows: Tensor) -> Tensor:
        """Raw scores of `out` [B, H] against gathered output rows [C, H] and biases [C, 1]."""
        return torch.addmm(by_rows.T, out, wy_rows.T)

    def forward(
        self, x: Tensor, hidden: list[Tensor], cols: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """One step: item indices [B] -> (scores [B, C] over `cols` or all items, new states)."""
        out, new_hidden = self.gru(self.input_table[x], hidden)
        if cols is None:
            return self.score_rows(out, self.Wy, self.By), new_hidden
        return self.score_rows(out, self.Wy[cols], self.By[cols]), new_hidden
