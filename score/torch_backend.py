"""The replay step driven by the PyTorch model: for validation against ONNX and as a speed baseline.

Computes what the exported evaluation graph computes (hidden_out, top-k, n_greater, n_equal) with
the training code's own `GRU4Rec.gru` and `score_rows`, so a difference between the two backends
is an export or runtime difference, not a replay one. State stays on the model's device.
"""

from __future__ import annotations

import numpy as np
import torch

from gru4rec.model import GRU4Rec
from gru4rec.score.replay import StepOutput


class TorchBackend:
    def __init__(self, model: GRU4Rec, top_k: int, device: str | torch.device = "cpu"):
        self.device_t = torch.device(device)
        self.model = model.to(self.device_t).eval()
        self.n_items = model.cfg.n_items
        self.top_k = int(top_k)
        self.name = f"torch-{self.device_t.type}"
        self.device = torch.cuda.get_device_name(self.device_t) if self.device_t.type == "cuda" else "cpu"
        self.hidden: list[torch.Tensor] = []

    def start(self, batch_size: int) -> None:
        self.hidden = self.model.init_hidden(batch_size, self.device_t)

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device_t)

    @torch.inference_mode()
    def step(
        self,
        item_idx: np.ndarray,
        target_idx: np.ndarray,
        src_rows: np.ndarray,
        reset_mask: np.ndarray,
        fetch_topk: bool,
    ) -> StepOutput:
        m = self.model
        x, tgt, src = self._to_device(item_idx), self._to_device(target_idx), self._to_device(src_rows)
        keep = self._to_device(~reset_mask).to(torch.float32).unsqueeze(1)
        state = [h.index_select(0, src) * keep for h in self.hidden]
        out, self.hidden = m.gru(m.input_table[x], state)
        scores = m.score_rows(out, m.Wy, m.By)
        target = scores.gather(1, tgt.unsqueeze(1))
        counts = torch.stack([(scores > target).sum(1), (scores == target).sum(1)]).cpu().numpy()
        if not fetch_topk:
            return StepOutput(counts[0], counts[1])
        top_scores, top_idx = torch.topk(scores, self.top_k, dim=1)
        return StepOutput(counts[0], counts[1], top_idx.cpu().numpy(), top_scores.cpu().numpy())
