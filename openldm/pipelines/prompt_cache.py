"""Recent prompt encodings of one loaded model, so that a repeated prompt skips the text encoders.

A server's queue, a prompt file, `batch_count`, a hires pass and a re-run from the web UI encode the
same text again and again. A `PromptCache` belongs to one `Pipeline` (there is no global cache) and
keeps its last `size` encodings, least recently used first out. `conditioning.PromptEncoder` makes
the keys: everything an encoder's output depends on (the text with its network tags taken out and its
prompt editing resolved, the chunk count it is padded to, clip skip, which encoder, its device and
dtype, and the networks merged into the encoders now: `Pipeline.text_weights`). Other encoders (new
embeddings, another model) empty the cache. Weights changed by any other road than
`Pipeline.merge_networks` need a `clear()`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from openldm.pipelines.conditioning import TextEncoder

Encoded = tuple[torch.Tensor, "torch.Tensor | None"]  # one encoder's (hidden states, pooled) of one prompt
DEFAULT_SIZE = 64


class PromptCache:
    """At most `size` encodings (0: none kept), valid for the text encoders they were made with."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 0:
            raise ValueError(f"prompt cache size {size}: must be 0 (off) or more")
        self.size = size
        self._entries: OrderedDict[Hashable, Encoded] = OrderedDict()
        self._encoders: tuple[TextEncoder, ...] = ()  # held, so that their ids cannot be reused

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, encoders: Sequence[TextEncoder], key: Hashable, encode: Callable[[], Encoded]) -> Encoded:
        """The encoding stored under `key` for these `encoders`, else `encode()`, kept as the newest."""
        if len(encoders) != len(self._encoders) or any(a is not b for a, b in zip(encoders, self._encoders)):
            self.clear()
            self._encoders = tuple(encoders)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = encode()
        if self.size:
            self._entries[key] = value
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value
