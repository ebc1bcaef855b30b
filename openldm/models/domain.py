"""What a narrow model knows, and the one warning for prompts outside it.

A model trained on a closed vocabulary (the embedded shapes model) ships `domain.json` beside its
weights: a sentence saying what it draws and the words its training captions used. Its BPE
tokenizer can spell any word, so nothing fails on "cat"; the model has simply never seen it.
`Domain.warning` names those words, once for a whole run. It imports no torch: the server, the CLI
and the Python API all call it.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DOMAIN_FILE = "domain.json"
_TAGS = re.compile(r"<[^>]*>")  # <lora:name:1> and similar prompt tags are not words
_WORDS = re.compile(r"[^\W\d_]+")  # letters only: weights, numbers and punctuation are not words


class DomainWarning(UserWarning):
    """A prompt asks a narrow model for something outside what it was trained on."""


def prompt_words(prompts: Iterable[str]) -> frozenset[str]:
    """The words of prompts, in lower case, as the domain check counts them."""
    return frozenset(w for p in prompts for w in _WORDS.findall(_TAGS.sub(" ", p).lower()))


@dataclass(frozen=True)
class Domain:
    knows: str  # e.g. "the embedded model knows only simple coloured shapes"
    words: frozenset[str]

    def unknown(self, prompts: Iterable[str]) -> list[str]:
        """The words of the prompts that the model never saw in training, sorted, each once."""
        return sorted(prompt_words(prompts) - self.words - {"break"})  # BREAK is prompt syntax

    def warning(self, prompts: Iterable[str]) -> str:
        """One sentence naming every unknown word of the prompts, or "" when they are all known."""
        unknown = self.unknown(prompts)
        return f"{self.knows}; it does not know: {', '.join(unknown)}" if unknown else ""

    def to_json(self) -> str:
        return json.dumps({"knows": self.knows, "words": sorted(self.words)}, indent=1)


def warn_outside(domain: Domain | None, prompts: Iterable[str]) -> None:
    """One DomainWarning for prompts outside the model's words, at the first caller outside openldm."""
    if domain is None or not (message := domain.warning(prompts)):
        return
    package = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(1), 2
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DomainWarning, stacklevel=level)


def read_domain(model: Path) -> Domain | None:
    """The domain a model folder declares (None for a single file, or a folder without one)."""
    path = Path(model) / DOMAIN_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return Domain(str(data["knows"]), frozenset(str(w).lower() for w in data["words"]))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a domain file ({error})") from None
