"""GRU4Rec session-based recommenders: train on GPU, export to ONNX, score and evaluate offline."""

__version__ = "0.1.0"
