"""Baselines scored by the same metric code as GRU4Rec."""
