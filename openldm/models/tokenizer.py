"""The CLIP tokenizer: byte-level BPE (Sennrich et al. 2016) as OpenAI's CLIP defines it.

Text is cleaned, split into words by CLIP's pattern, each word's UTF-8 bytes are spelled with 256
printable stand-in characters, and BPE merges them greedily, lowest merge rank first. The last
symbol of a word carries `</w>`, so "cat" at the end of a word and inside one are different tokens.

Two cleanings, one per reference an SD text encoder was trained with (docs/tokenizer.md lists every
case where they differ):
- "hf": transformers' `CLIPTokenizer` (5.x, tokenizers backend), used by SD1's CLIP-L and SDXL's
  first encoder: NFC, whitespace runs to one space, per-character lowercase. The literal
  `<|startoftext|>` / `<|endoftext|>` in the raw text are the special tokens.
- "openclip": OpenCLIP's `SimpleTokenizer`, used by SD2's ViT-H and SDXL's bigG: `ftfy.fix_text`,
  HTML unescape twice, whitespace collapse, lowercase. `<start_of_text>` / `<end_of_text>` are the
  special tokens, matched case-insensitively after cleaning.

CLIP's pattern uses `\\p{L}` / `\\p{N}` (the third-party `regex` package); we build the same classes
for the standard `re` from `unicodedata`, so a code point assigned after the running Python's
Unicode version counts as punctuation here (the references, on newer tables, may call it a letter).
"""

from __future__ import annotations

import gzip
import html
import itertools
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

from openldm.checkpoints.errors import CheckpointError
from openldm.config import CLIPTextConfig
from openldm.user_cache import remembered

Cleaning = Literal["hf", "openclip"]
START, END = "<|startoftext|>", "<|endoftext|>"
OPENCLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")  # OpenCLIP's spelling of START, END
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges: a 49408-token vocabulary
VOCAB_GZ = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_JSON = "tokenizer.json"  # what transformers 5 saves, often without vocab.json / merges.txt
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_CACHE_LIMIT = 100_000


@cache
def byte_symbols() -> dict[int, str]:
    """Byte -> the character that spells it; dict order is CLIP's vocabulary order (ids 0..255).

    Printable Latin-1 bytes stand for themselves; the others (space, controls, NBSP, soft hyphen)
    move to U+0100 onward, so no BPE symbol is whitespace or a control character.
    """
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {b: chr(b) for b in kept} | {b: chr(0x100 + i) for i, b in enumerate(moved)}


_RANGES = re.compile(r"(?:\\U[0-9a-f]{8}-\\U[0-9a-f]{8})+")  # what `_scan_classes` writes


@cache
def _classes() -> tuple[str, str, str]:
    """Bodies of `[...]` classes for \\p{L}, \\p{N} and \\s, read from `unicodedata`.

    \\s is Unicode White_Space (what `regex` and Oniguruma use): Python's `isspace` also counts the
    information separators U+001C..U+001F, which both references treat as punctuation.
    Scanning every code point takes 0.3 s, a tenth of a cold run of the embedded model, so the result
    is kept under `user_cache` "tokenizer", keyed by the Unicode version it was read from.
    """
    def valid(text: str) -> bool:
        try:
            classes = json.loads(text)
        except ValueError:
            return False
        return (isinstance(classes, list) and len(classes) == 3
                and all(isinstance(c, str) and _RANGES.fullmatch(c) for c in classes))

    name = f"classes-unicode-{unicodedata.unidata_version}.json"
    text = remembered("tokenizer", name, lambda: json.dumps(_scan_classes()), valid)
    return tuple(json.loads(text))


def _scan_classes() -> tuple[str, str, str]:
    def body(flags: list[bool]) -> str:
        parts, cp = [], 0
        for keep, run in itertools.groupby(flags):
            n = len(list(run))
            if keep:
                parts.append(f"\\U{cp:08x}-\\U{cp + n - 1:08x}")
            cp += n
        return "".join(parts)

    major = [unicodedata.category(chr(cp))[0] for cp in range(0x110000)]
    space = [chr(cp).isspace() and not 0x1C <= cp <= 0x1F for cp in range(0x110000)]
    return body([c == "L" for c in major]), body([c == "N" for c in major]), body(space)


@cache
def word_pattern(cleaning: Cleaning) -> re.Pattern:
    """CLIP's word-splitting pattern for one reference; both put the special-token spellings first.

    OpenCLIP compiles it case-insensitively. That changes the literals (`'ſ` matches `'s`) and the
    punctuation class, which then excludes U+0345 (its capital Ι is a letter), so OpenCLIP drops that
    character. `regex` keeps the letter class as it is, where `re` would admit U+0345 too: the flag
    is scoped to exactly the parts it changes.
    """
    letter, number, space = _classes()
    specials = OPENCLIP_SPECIALS if cleaning == "openclip" else (START, END)
    literals = "|".join([*map(re.escape, specials), *_CONTRACTIONS])
    other = f"[^{space}{letter}{number}]+"
    if cleaning == "openclip":
        literals, other = f"(?i:{literals})", f"(?i:{other})"
    return re.compile(f"{literals}|[{letter}]+|[{number}]|{other}")


@cache
def _whitespace_runs() -> re.Pattern:
    return re.compile(f"[{_classes()[2]}]+")


def clean_hf(text: str) -> str:
    """transformers' normalizer: NFC, each whitespace run to one space, lowercase char by char.

    Char by char: `str.lower` would turn a word-final capital sigma into ς; the Rust normalizer
    always gives σ.
    """
    text = _whitespace_runs().sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text) if "Σ" in text else text.lower()


def clean_openclip(text: str) -> str:
    """OpenCLIP's cleaning: ftfy, HTML unescape twice, whitespace collapse, lowercase."""
    try:
        import ftfy
    except ImportError:
        raise ImportError("the OpenCLIP tokenizer cleaning needs ftfy: pip install ftfy") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class CLIPTokenizer:
    """CLIP BPE over a vocabulary (token -> id) and ranked merges; see the module docstring."""

    def __init__(
        self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, cleaning: Cleaning = "hf",
        pad_token: int | None = None, max_length: int = 77,
    ) -> None:
        self.vocab = vocab
        self.merges = list(merges)
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.cleaning = cleaning
        self.start_id, self.end_id = vocab[START], vocab[END]
        self.pad_id = self.end_id if pad_token is None else pad_token
        self.max_length = max_length
        self.pattern = word_pattern(cleaning)
        self.cache: dict[str, tuple[int, ...]] = {}
        self.literal_words = self._literal_words()

    @classmethod
    def from_vocab_gz(cls, path: str | Path | None = None, **options) -> CLIPTokenizer:
        """From CLIP's `bpe_simple_vocab_16e6.txt.gz` (the copy shipped with openldm by default)."""
        source = Path(path) if path else resources.files("openldm.models") / VOCAB_GZ
        lines = gzip.decompress(source.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        symbols = list(byte_symbols().values())
        tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), START, END]
        return cls({t: i for i, t in enumerate(tokens)}, merges, **options)

    @classmethod
    def from_folder(cls, folder: str | Path, **options) -> CLIPTokenizer:
        """From a `tokenizer/` folder: `vocab.json` + `merges.txt`, else `tokenizer.json` (transformers 5)."""
        folder = Path(folder)
        if not (folder / "vocab.json").is_file():
            tokenizer = cls.from_tokenizer_json(folder / TOKENIZER_JSON, **options)
        else:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
            tokenizer = cls(vocab, merges, **options)
        pad = folder_pad_token(folder)
        if pad is not None:  # the folder says how its model pads: it knows better than the family default
            if pad not in tokenizer.vocab:
                raise CheckpointError(f"{folder}: the pad token {pad!r} of its tokenizer config is not in "
                                      "its vocabulary")
            tokenizer.pad_id = tokenizer.vocab[pad]
        return tokenizer

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, **options) -> CLIPTokenizer:
        """The BPE vocabulary and merges of a Hugging Face `tokenizer.json` (merges as pairs or "a b")."""
        try:
            model = json.loads(Path(path).read_text(encoding="utf-8"))["model"]
            if model.get("type") != "BPE":
                raise ValueError(f"a {model.get('type')} model, not BPE")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return cls(dict(model["vocab"]), merges, **options)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a CLIP BPE tokenizer.json ({e})") from None

    def check_fits(self, vocab_size: int, where: str) -> None:
        """A tokenizer whose ids run past the embedding table would fail mid-sampling: fail at load."""
        top = max(self.vocab.values()) + 1
        if top > vocab_size or self.pad_id >= vocab_size:
            raise CheckpointError(f"{where}: the tokenizer has {top} tokens but the text encoder's embedding "
                                  f"table {vocab_size}; put the model's own tokenizer (vocab.json + "
                                  "merges.txt, or tokenizer.json) in a tokenizer/ folder beside the weights")

    @classmethod
    def for_config(cls, cfg: CLIPTextConfig, folder: str | Path | None = None) -> CLIPTokenizer:
        """The tokenizer an encoder was trained with: OpenCLIP-trained ones clean as OpenCLIP did."""
        options = encoder_options(cfg)
        tokenizer = cls.from_folder(folder, **options) if folder else cls.from_vocab_gz(**options)
        tokenizer.check_fits(cfg.vocab_size, str(folder or "the standard CLIP tokenizer"))
        return tokenizer


    def bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-split word: merge the lowest-ranked adjacent pair everywhere, repeat."""
        if word in self.cache:
            return self.cache[word]
        spelled = "".join(byte_symbols()[b] for b in word.encode("utf-8"))
        symbols = [*spelled[:-1], spelled[-1] + "</w>"]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, NUM_MERGES + 1))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        if len(self.cache) >= _CACHE_LIMIT:
            self.cache.clear()
        ids = self.cache[word] = tuple(self.vocab[s] for s in symbols)
        return ids

    def _literal_words(self) -> dict[str, tuple[int, ...]]:
        """Ids of the special-token spellings when they are matched as words of cleaned text.

        OpenCLIP turns them into the special ids. transformers' byte-level step splits them again
        (`<|`, `endoftext`, `|>`): after cleaning they are ordinary text, only cut off from their
        neighbours (`<|endoftext|>:` gives `|>` and `:`, not `|>:`).
        """
        if self.cleaning == "openclip":
            return dict(zip(OPENCLIP_SPECIALS, ((self.start_id,), (self.end_id,))))
        return {s: self.bpe("<|") + self.bpe(s[2:-2]) + self.bpe("|>") for s in (START, END)}

    def _encode_clean(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self.pattern.findall(text):
            ids.extend(self.literal_words.get(word) or self.bpe(word))
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`: no start or end token, no truncation (long prompts are chunked later)."""
        if self.cleaning == "openclip":
            return self._encode_clean(clean_openclip(text))
        ids: list[int] = []
        for i, part in enumerate(re.split(f"({re.escape(START)}|{re.escape(END)})", text)):
            ids.extend([self.vocab[part]] if i % 2 else self._encode_clean(clean_hf(part)))
        return ids

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """(B, max_length) ids: start, the first max_length - 2 tokens, end, then padding."""
        texts = [texts] if isinstance(texts, str) else texts
        length = max_length or self.max_length
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text)[: length - 2], self.end_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def save(self, folder: str | Path) -> Path:
        """Write `vocab.json`, `merges.txt` and the configs transformers' `CLIPTokenizer` reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = dict(sorted(self.vocab.items(), key=lambda item: item[1]))
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self.merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        names = {v: k for k, v in vocab.items()}
        special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": names[self.pad_id]}
        config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length,
                  "do_lower_case": True, "add_prefix_space": False, "errors": "replace"}
        for name, data in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
            (folder / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tokenizer_json = json.dumps(self.tokenizer_json(), ensure_ascii=False, indent=2)
        (folder / TOKENIZER_JSON).write_text(tokenizer_json, encoding="utf-8")
        return folder

    def tokenizer_json(self) -> dict:
        """`tokenizer.json` as transformers 5 writes it for a `CLIPTokenizer` of this vocabulary."""
        def special(token: str) -> dict:
            return {"id": self.vocab[token], "content": token, "single_word": False, "lstrip": False,
                    "rstrip": False, "normalized": False, "special": True}

        words = "|".join([re.escape(START), re.escape(END), *_CONTRACTIONS])
        split = f"{words}|[\\p{{L}}]+|[\\p{{N}}]|[^\\s\\p{{L}}\\p{{N}}]+"
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": True}
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [special(START), special(END)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"}, {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": split}, "behavior": "Removed", "invert": True},
                byte_level]},
            "post_processor": {"type": "RobertaProcessing", "sep": [END, self.end_id],
                               "cls": [START, self.start_id], "trim_offsets": False,
                               "add_prefix_space": False},
            "decoder": byte_level | {"add_prefix_space": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": END, "continuing_subword_prefix": "",
                      "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1])),
                      "merges": [list(m) for m in self.merges]},
        }

    @property
    def is_standard(self) -> bool:
        """CLIP's own 49,408-token vocabulary (which every reader has; others must travel with the model)."""
        return len(self.vocab) == NUM_MERGES + 514 and len(self.merges) == NUM_MERGES


def folder_pad_token(folder: Path) -> str | None:
    """The pad token a tokenizer folder names (tokenizer_config.json, else special_tokens_map.json)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
        except (ValueError, AttributeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: not a readable tokenizer config") from None
        pad = pad.get("content") if isinstance(pad, dict) else pad  # transformers' AddedToken form
        if isinstance(pad, str):
            return pad
    return None


def encoder_options(cfg: CLIPTextConfig) -> dict:
    """How an encoder's tokenizer cleans, pads and cuts: OpenCLIP-trained ones clean as OpenCLIP did."""
    return dict(cleaning="openclip" if cfg.openclip_layout else "hf", pad_token=cfg.pad_token,
                max_length=cfg.max_length)


def has_tokenizer(folder: Path) -> bool:
    """Whether `folder` holds a tokenizer `CLIPTokenizer.from_folder` reads."""
    return (folder / "vocab.json").is_file() or (folder / TOKENIZER_JSON).is_file()


# --- where a model's tokenizers come from ---------------------------------------------------

META_TOKENIZER = "openldm.tokenizer"  # an own vocabulary in a single file's header ("_2": 2nd encoder)


def _meta_key(index: int) -> str:
    return META_TOKENIZER + (f"_{index + 1}" if index else "")


def tokenizer_metadata(tokenizers: Sequence[CLIPTokenizer]) -> dict[str, str]:
    """Header entries carrying each non-standard tokenizer, so a single file is the whole model."""
    return {_meta_key(i): json.dumps({"vocab": t.vocab, "merges": [" ".join(m) for m in t.merges]},
                                     ensure_ascii=False)
            for i, t in enumerate(tokenizers) if not t.is_standard}


def find_tokenizers(configs: Sequence[CLIPTextConfig], folder: Path | None,
                    metadata: Mapping[str, str]) -> list[CLIPTokenizer]:
    """Each encoder's tokenizer: `folder/tokenizer[_N]` (or `folder`), the header, else standard CLIP."""
    tokenizers = []
    for i, cfg in enumerate(configs):
        candidates = [] if folder is None else [folder / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}")]
        if folder is not None and i == 0:
            candidates.append(folder)  # a model folder may keep its one tokenizer beside the weights
        found = next((c for c in candidates if has_tokenizer(c)), None)
        if found is None and _meta_key(i) in metadata:
            stored = json.loads(metadata[_meta_key(i)])
            merges = [tuple(m.split(" ")) for m in stored["merges"]]
            tokenizer = CLIPTokenizer(stored["vocab"], merges, **encoder_options(cfg))
            tokenizer.check_fits(cfg.vocab_size, f"the header's {_meta_key(i)}")
        else:
            tokenizer = CLIPTokenizer.for_config(cfg, found)
        tokenizers.append(tokenizer)
    return tokenizers
