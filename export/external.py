"""Weights in ONNX external data: one file beside the graphs, every tensor stored once.

A protobuf message holds at most 2 GiB, so a model whose weights take more cannot be one ONNX file.
Then both graphs are traced without their parameters (they come out as graph inputs), and each
parameter becomes an initializer whose bytes live in one data file, `<export id>.weights`, at a
page-aligned offset (ONNX Runtime maps aligned tensors instead of copying them). A tensor that
both graphs use (the item matrix, the GRU weights) is written once and both point at it.

The file is named by the export id, not by the model's path: a bundle copied or promoted to
another name still finds it, and a new export never overwrites a file that an installed graph
reads (a crash mid-install leaves the old bundle whole).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ALIGN = 4096
SUFFIX = ".weights"


def weights_name(export_id: str) -> str:
    return f"{export_id}{SUFFIX}"


class WeightsWriter:
    """Appends tensors to one file; a tensor equal to one already written (same name) is reused."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.location = self.path.name  # what the graphs record (written under a temporary name)
        self._file = open(path, "wb")
        self._written: dict[str, tuple[np.ndarray, int]] = {}
        self.size = 0

    def add(self, name: str, array: np.ndarray) -> tuple[int, int]:
        """(offset, length) of `array`'s bytes in the file."""
        array = np.ascontiguousarray(array)
        seen = self._written.get(name)
        if seen is not None and seen[0].dtype == array.dtype and seen[0].shape == array.shape:
            if seen[0] is array or np.array_equal(seen[0], array):
                return seen[1], array.nbytes
        offset = -(-self.size // ALIGN) * ALIGN
        self._file.seek(offset)
        self._file.write(memoryview(array).cast("B"))
        self.size = offset + array.nbytes
        self._written.setdefault(name, (array, offset))
        return offset, array.nbytes

    def close(self) -> None:
        self._file.flush()
        self._file.close()


def attach_weights(model, params: dict[str, np.ndarray], writer: WeightsWriter, location: str) -> None:
    """Graph inputs that are parameters (a trace without them) -> initializers in `writer`'s file."""
    import onnx

    for value in [i for i in model.graph.input if i.name in params]:
        array = params[value.name]
        offset, length = writer.add(value.name, array)
        tensor = onnx.TensorProto()
        tensor.name = value.name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, val
        model.graph.initializer.append(tensor)
        model.graph.input.remove(value)


def step_params(step) -> dict[str, np.ndarray]:
    """A traced step module's parameters by the names the exporter gives their graph inputs."""
    return {name: p.detach().cpu().numpy() for name, p in step.named_parameters()}
