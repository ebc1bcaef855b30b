"""`nn.Embedding` that skips its random init when built on `meta`, where the weights come from a file.

torch initialises an embedding with `normal_`, which on `meta` runs through its reference
implementation and imports `torch._dynamo` on first use: 1.4 s of a cold CLI run spent on values that
the checkpoint replaces. Built anywhere else (a model trained from scratch, a test's random model),
it initialises as torch's does.
"""

from __future__ import annotations

from torch import nn


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()
