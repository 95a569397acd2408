"""GRU4Rec session-based recommenders: train on GPU, export to ONNX, score and evaluate offline."""

__version__ = "0.1.0"

from gru4rec import allocator as _allocator

_allocator.configure()  # before any stage imports Polars: chunked reading stays flat in memory
