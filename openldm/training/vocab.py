"""Learn a small CLIP BPE vocabulary from training captions.

A model trained from scratch on a narrow domain needs only the words its captions use. The
vocabulary is built the way CLIP's is laid out (256 byte symbols, the same 256 with the
end-of-word mark, then one token per learned merge, then start and end) and merges are learned by
standard BPE (most frequent adjacent pair first), so the ordinary `CLIPTokenizer` reads it, any
word outside the domain still tokenizes (into bytes), and every caption word becomes one token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import torch

from openldm.models.tokenizer import END, START, CLIPTokenizer, byte_symbols, clean_hf, word_pattern


def _spell(word: str) -> tuple[str, ...]:
    symbols = byte_symbols()
    spelled = [symbols[b] for b in word.encode("utf-8")]
    return (*spelled[:-1], spelled[-1] + "</w>")


def learn_merges(word_counts: Counter[str],
                 spell: Callable[[str], tuple[str, ...]] = _spell) -> list[tuple[str, str]]:
    """Merges, in rank order, until every word is a single symbol (ties broken by the pair's text).

    `spell` gives each word's symbols to start from: its bytes, or what an existing tokenizer makes of it.
    """
    words = {spell(w): n for w, n in word_counts.items() if w}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged_words: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged_words[tuple(out)] = merged_words.get(tuple(out), 0) + count
        words = merged_words


def caption_words(captions: Iterable[str]) -> Counter[str]:
    """Words as the tokenizer splits them (CLIP cleaning, lower case)."""
    pattern = word_pattern("hf")
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(pattern.findall(clean_hf(caption)))
    return counts


def build_tokenizer(captions: Iterable[str], max_length: int = 77) -> CLIPTokenizer:
    """A `CLIPTokenizer` whose merges make each caption word one token; pads with the end token."""
    merges = learn_merges(caption_words(captions))
    symbols = list(byte_symbols().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), START, END]
    return CLIPTokenizer({t: i for i, t in enumerate(tokens)}, merges, max_length=max_length)


def extend_tokenizer(tokenizer: CLIPTokenizer, captions: Iterable[str]) -> CLIPTokenizer:
    """The tokenizer with merges appended until every caption word is one token.

    Every token keeps its id except start and end, which stay the last two (CLIP's layout), so a
    word the tokenizer already knew is tokenized as before; `carry_embedding` moves the rows over.
    """
    names = {i: t for t, i in tokenizer.vocab.items()}
    added = learn_merges(caption_words(captions), lambda w: tuple(names[i] for i in tokenizer.bpe(w)))
    if not added:
        return tokenizer
    kept = [t for t, _ in sorted(tokenizer.vocab.items(), key=lambda item: item[1]) if t not in (START, END)]
    tokens = [*kept, *("".join(m) for m in added), START, END]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab, [*tokenizer.merges, *added], pad_token=vocab[names[tokenizer.pad_id]],
                         max_length=tokenizer.max_length)


def carry_embedding(weight: torch.Tensor, old: CLIPTokenizer, new: CLIPTokenizer) -> torch.Tensor:
    """Token-embedding rows for `new`'s ids: a token `old` has keeps its row; a new one starts as the
    mean of the rows `old` spelt it with (training then makes it its own)."""
    text_of = {symbol: byte for byte, symbol in byte_symbols().items()}
    rows = weight.new_empty(len(new.vocab), weight.shape[1])
    for token, i in new.vocab.items():
        if token in old.vocab:
            rows[i] = weight[old.vocab[token]]
        else:
            word = bytes(text_of[c] for c in token.removesuffix("</w>")).decode("utf-8", errors="replace")
            rows[i] = weight[list(old.bpe(word))].mean(dim=0)
    return rows
