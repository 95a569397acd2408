"""Named hyperparameter presets: the official best parameters (spec §9.1) plus a small demo.

All official presets: shared embedding, n_sample 2048, 10 epochs. rsc15 is the shipped
paramfile row (the README table row differs: p_embed 0.1, p_hidden 0, lr 0.1, momentum 0, alpha
0.75). The ELU parameter 0 means a linear final activation.
"""

from __future__ import annotations

_XE = {"loss": "cross-entropy", "logq": 1.0, "bpreg": 0.0, "elu_param": 0.0}
_BPR = {"loss": "bpr-max", "logq": 0.0}

PRESETS: dict[str, dict] = {
    "rsc15": {
        **_XE,
        "layers": [100],
        "batch_size": 32,
        "dropout_p_embed": 0.0,
        "dropout_p_hidden": 0.4,
        "learning_rate": 0.2,
        "momentum": 0.2,
        "sample_alpha": 0.5,
    },
    "yoochoose": {
        **_XE,
        "layers": [480],
        "batch_size": 48,
        "dropout_p_embed": 0.0,
        "dropout_p_hidden": 0.2,
        "learning_rate": 0.07,
        "momentum": 0.0,
        "sample_alpha": 0.2,
    },
    "rees46": {
        **_XE,
        "layers": [512],
        "batch_size": 240,
        "dropout_p_embed": 0.45,
        "dropout_p_hidden": 0.0,
        "learning_rate": 0.065,
        "momentum": 0.0,
        "sample_alpha": 0.5,
    },
    "coveo": {
        **_BPR,
        "layers": [512],
        "batch_size": 144,
        "dropout_p_embed": 0.35,
        "dropout_p_hidden": 0.0,
        "learning_rate": 0.05,
        "momentum": 0.4,
        "sample_alpha": 0.2,
        "bpreg": 1.85,
        "elu_param": 1.0,
    },
    "retailrocket": {
        **_BPR,
        "layers": [224],
        "batch_size": 80,
        "dropout_p_embed": 0.5,
        "dropout_p_hidden": 0.05,
        "learning_rate": 0.05,
        "momentum": 0.4,
        "sample_alpha": 0.4,
        "bpreg": 1.95,
        "elu_param": 0.5,
    },
    "diginetica": {
        **_BPR,
        "layers": [512],
        "batch_size": 128,
        "dropout_p_embed": 0.5,
        "dropout_p_hidden": 0.3,
        "learning_rate": 0.05,
        "momentum": 0.15,
        "sample_alpha": 0.3,
        "bpreg": 0.9,
        "elu_param": 1.0,
    },
    # Built-in synthetic data (20k sessions, 2k items): small and quick on 2 CPU cores.
    "demo": {
        **_XE,
        "layers": [64],
        "batch_size": 64,
        "dropout_p_embed": 0.0,
        "dropout_p_hidden": 0.2,
        "learning_rate": 0.1,
        "momentum": 0.2,
        "sample_alpha": 0.5,
        "n_sample": 256,
        "n_epochs": 5,
    },
}
for _p in PRESETS.values():
    _p.setdefault("embedding", 0)
    _p.setdefault("constrained_embedding", True)
    _p.setdefault("n_sample", 2048)
    _p.setdefault("n_epochs", 10)
