"""Online serving: the exported one-step graph behind an HTTP API with per-session hidden state."""
