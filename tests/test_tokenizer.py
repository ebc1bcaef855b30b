"""The CLIP tokenizer against its two references, on every prompt of a >1,000-prompt corpus.

"hf" cleaning is compared with transformers' `CLIPTokenizer`, built offline from a vocab.json and
merges.txt this file writes from open_clip's tables (not from our code); "openclip" cleaning with
open_clip's `SimpleTokenizer`. Both on the full 77-token rows.
"""

import json
import random
import unicodedata
from pathlib import Path

import pytest
import torch
from oracles import openclip_tokenizer

from openldm.config import TINY_SD1, TINY_SD2, TINY_SDXL
from openldm.models import tokenizer as tk
from openldm.models.tokenizer import END, START, CLIPTokenizer, byte_symbols, word_pattern

DATA = Path(__file__).parent / "data"
SEPARATORS = [" ", ", ", ",", "  ", "\n", "\t", "", " | ", ". ", " (", ":1.2) "]


def hard_prompts() -> list[str]:
    """Hand-written hard cases, one JSON string per line (file iteration: U+2028 stays inside)."""
    with open(DATA / "prompts.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def generated_prompts(n: int = 1000, seed: int = 0) -> list[str]:
    """Random mixes of words from the hard cases and plain words, with random joints and casing."""
    rng = random.Random(seed)
    words = sorted({w for p in hard_prompts() for w in p.split()})
    words += (DATA / "words.txt").read_text(encoding="utf-8").split()
    cases = [str, str, str.upper, str.title, str.capitalize]
    prompts = []
    for _ in range(n):
        pieces = [rng.choice(cases)(rng.choice(words)) for _ in range(rng.randint(1, 60))]
        prompts.append("".join(p + rng.choice(SEPARATORS) for p in pieces).strip(rng.choice(["", " "])))
    return prompts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return hard_prompts() + generated_prompts()


@pytest.fixture(scope="module")
def open_clip():
    return openclip_tokenizer().SimpleTokenizer()


@pytest.fixture(scope="module")
def transformers_tok(open_clip, tmp_path_factory):
    """transformers' tokenizer from files written out of open_clip's tables (specials renamed)."""
    from transformers import CLIPTokenizer as HFTokenizer

    folder = tmp_path_factory.mktemp("hf_tokenizer")
    names = {"<start_of_text>": START, "<end_of_text>": END}
    vocab = {names.get(token, token): i for token, i in open_clip.encoder.items()}
    merges = sorted(open_clip.bpe_ranks, key=open_clip.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return HFTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def ours_hf() -> CLIPTokenizer:
    return CLIPTokenizer.for_config(TINY_SD1.text_encoders[0])


@pytest.fixture(scope="module")
def ours_openclip() -> CLIPTokenizer:
    return CLIPTokenizer.for_config(TINY_SD2.text_encoders[0])


def _hf_rows(tok, texts) -> torch.Tensor:
    return torch.tensor(tok(texts, padding="max_length", max_length=77, truncation=True)["input_ids"])


def _mismatches(ours: torch.Tensor, reference: torch.Tensor, texts: list[str]) -> list[str]:
    return [repr(t) for t, a, b in zip(texts, ours, reference) if not torch.equal(a, b)]


def test_corpus_is_large_and_varied(corpus, ours_hf):
    long = sum(len(ours_hf.encode(t)) > 75 for t in corpus[:200])
    assert len(corpus) >= 1000 and len(set(corpus)) >= 1000, f"{len(corpus)} prompts"
    assert long >= 10, f"only {long} of the first 200 prompts exceed 75 tokens"


def test_hf_cleaning_equals_transformers_on_corpus(corpus, ours_hf, transformers_tok):
    bad = _mismatches(ours_hf(corpus), _hf_rows(transformers_tok, corpus), corpus)
    print(f"hf mode: {len(corpus) - len(bad)}/{len(corpus)} prompts identical to transformers")
    assert not bad, f"{len(bad)}/{len(corpus)} prompts differ from transformers, e.g. {bad[:5]}"


def test_openclip_cleaning_equals_open_clip_on_corpus(corpus, ours_openclip, open_clip):
    bad = _mismatches(ours_openclip(corpus), open_clip(corpus), corpus)
    print(f"openclip mode: {len(corpus) - len(bad)}/{len(corpus)} prompts identical to open_clip")
    assert not bad, f"{len(bad)}/{len(corpus)} prompts differ from open_clip, e.g. {bad[:5]}"


# Blocks for random strings: ASCII, Latin, combining marks, Greek/Cyrillic, punctuation, CJK, Hangul
# syllables and jamo, full-width forms, emoji, variation selectors.
BLOCKS = [(0, 0x7F), (0x80, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x2000, 0x206F), (0x3000, 0x30FF),
          (0x4E00, 0x4E80), (0xAC00, 0xAC40), (0x1100, 0x11FF), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F),
          (0xFE00, 0xFE0F)]


def test_random_code_point_strings_match_both_references(ours_hf, ours_openclip, transformers_tok, open_clip):
    rng = random.Random(1)
    texts = ["".join(chr(rng.randint(*rng.choice(BLOCKS))) for _ in range(rng.randint(1, 40)))
             for _ in range(500)]
    bad_hf = _mismatches(ours_hf(texts), _hf_rows(transformers_tok, texts), texts)
    bad_oc = _mismatches(ours_openclip(texts), open_clip(texts), texts)
    assert not bad_hf and not bad_oc, f"{len(bad_hf)} hf and {len(bad_oc)} openclip of 500 differ"


def _assigned_code_points() -> list[str]:
    """Every code point the running Python's Unicode tables assign, less surrogates and the
    private-use planes 15 and 16 (130k characters of one category, like the BMP's private use)."""
    return [chr(cp) for cp in range(0xF0000) if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]


@pytest.fixture(scope="module")
def every_char_text() -> str:
    """Each assigned code point after an apostrophe, beside a letter, doubled and beside a digit."""
    return "".join(f"'{c}a{c}{c}1 " for c in _assigned_code_points())


def test_word_split_equals_regex_package_on_every_code_point(every_char_text, open_clip):
    ours = word_pattern("openclip").findall(every_char_text)
    reference = open_clip.pat.findall(every_char_text)
    first = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), None)
    assert ours == reference, f"{len(ours)} vs {len(reference)} words; first difference at {first}"


def test_word_split_equals_oniguruma_on_every_code_point(every_char_text, transformers_tok):
    pre = transformers_tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(every_char_text)
    symbols = byte_symbols()
    ours = ["".join(symbols[b] for b in w.encode()) for w in word_pattern("hf").findall(every_char_text)]
    reference = [w for w, _ in pre]
    first = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), None)
    assert ours == reference, f"{len(ours)} vs {len(reference)} words; first difference at {first}"


def test_hf_normalizer_equals_transformers_on_every_code_point(transformers_tok):
    text = " ".join(_assigned_code_points()) + " ΟΔΟΣ Σ. cafe\u0301 \u212b\x1c\t\n\u3000x"
    reference = transformers_tok.backend_tokenizer.normalizer.normalize_str(text)
    ours = tk.clean_hf(text)
    first = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), None)
    assert ours == reference, f"lengths {len(ours)} vs {len(reference)}; first difference at {first}"


def test_encode_has_no_specials_and_no_truncation(ours_hf):
    ids = ours_hf.encode("a photo of a cat " * 30)
    assert ids[:4] == ours_hf.encode("a photo of a")
    assert len(ids) == 150 and START not in ids and ours_hf.end_id not in ids


def test_rows_truncate_to_75_tokens_then_end_then_pad(ours_hf, ours_openclip):
    content = ours_hf.encode("a photo of a cat " * 30)
    row = ours_hf("a photo of a cat " * 30)[0].tolist()
    assert row == [ours_hf.start_id, *content[:75], ours_hf.end_id]
    short = ours_openclip(["a cat", "a dog and a bird"])
    assert short.shape == (2, 77) and short[0, 4:].eq(0).all() and short[1, 7:].eq(0).all()


def test_exclamation_mark_is_token_zero_and_ordinary(ours_openclip, open_clip):
    """Id 0 is "!" inside a word ("!~"); OpenCLIP pads with it too, and neither treats it specially."""
    row = ours_openclip("wow !~")[0].tolist()
    assert row[:5] == [49406, ours_openclip.encode("wow")[0], 0, 349, 49407] and set(row[5:]) == {0}
    assert row == open_clip("wow !~")[0].tolist()


def test_vocabulary_layout(ours_hf):
    vocab = ours_hf.vocab
    assert len(vocab) == 49408 and vocab[START] == 49406 and vocab[END] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["Ā"] == 188  # byte 0x00 moved to U+0100
    assert len(ours_hf.merges) == 48894 and ours_hf.merges[0] == ("i", "n")


@pytest.mark.parametrize("encoder, cleaning, pad", [
    (TINY_SD1.text_encoders[0], "hf", 49407), (TINY_SD2.text_encoders[0], "openclip", 0),
    (TINY_SDXL.text_encoders[0], "hf", 49407), (TINY_SDXL.text_encoders[1], "openclip", 0),
])
def test_for_config_picks_the_training_reference(encoder, cleaning, pad):
    tok = CLIPTokenizer.for_config(encoder)
    assert (tok.cleaning, tok.pad_id, tok.max_length) == (cleaning, pad, 77)


@pytest.mark.parametrize("pad", [49407, 0])
def test_save_loads_back_and_in_transformers(tmp_path, pad, corpus):
    from transformers import CLIPTokenizer as HFTokenizer

    ours = CLIPTokenizer.from_vocab_gz(pad_token=pad)
    ours.save(tmp_path)
    again = CLIPTokenizer.from_folder(tmp_path, pad_token=pad)
    assert again.vocab == ours.vocab and again.merges == ours.merges
    theirs = HFTokenizer.from_pretrained(tmp_path)
    texts = corpus[:50]
    assert theirs.pad_token_id == pad and theirs.model_max_length == 77
    assert torch.equal(_hf_rows(theirs, texts), ours(texts))


def test_shipped_vocabulary_equals_open_clip_tables(ours_hf, open_clip):
    names = {"<start_of_text>": START, "<end_of_text>": END}
    assert ours_hf.vocab == {names.get(t, t): i for t, i in open_clip.encoder.items()}
    assert ours_hf.ranks == open_clip.bpe_ranks


# Documented in docs/tokenizer.md: prompts on which the two references give different ids.
DISAGREEMENTS = [
    "“curly quotes” and it’s",  # ftfy straightens quotes
    "AT&amp;T",  # HTML unescape
    "&amp;amp;amp;",  # unescaped three times by open_clip
    "ﬁne ligature ǅ",  # ftfy: fix_latin_ligatures
    "ＦＵＬＬ width 猫，狗",  # ftfy: fix_character_width
    "cafÃ©",  # ftfy: mojibake repair
    "x\u0085y \u0080",  # ftfy: C1 controls read as Windows-1252
    "\u001b[31mred",  # ftfy: terminal escapes removed
    "nul\u0000char a\u000bb",  # ftfy: control characters removed
    "info\u001cseparator",  # ftfy removes U+001C; transformers keeps it as punctuation
    "ΟΔΟΣ",  # final sigma: Python lower() gives ς, the Rust normalizer σ
    "<|endoftext|>",  # transformers' special token spelling
    "<start_of_text>",  # open_clip's special token spelling
    "'ſ",  # open_clip's IGNORECASE: `'s` matches `'ſ`
    "ι\u0345",  # open_clip's IGNORECASE: U+0345 matches no class and is dropped
]


@pytest.mark.parametrize("text", DISAGREEMENTS)
def test_documented_disagreements_are_real(text, transformers_tok, open_clip):
    hf = transformers_tok(text, add_special_tokens=False)["input_ids"]
    assert hf != open_clip.encode(text), f"{text!r}: both give {hf}"


def test_openclip_unescapes_three_times_unless_the_prompt_has_angle_brackets():
    """ftfy unescapes HTML only in text without `<` or `>`; open_clip then unescapes twice more."""
    assert tk.clean_openclip("&amp;amp;amp;") == "&"
    assert tk.clean_openclip("&amp;amp;amp; <lora:x:1>") == "&amp; <lora:x:1>"


def test_tokenizer_json_alone_reads_as_the_same_tokenizer(tmp_path):
    """transformers 5 saves only tokenizer.json: its vocabulary and merges give the same ids."""
    from transformers import CLIPTokenizer as HFTokenizer

    from openldm.models.tokenizer import CLIPTokenizer as Ours

    ours = Ours.from_vocab_gz()
    ours.save(tmp_path / "src")
    HFTokenizer.from_pretrained(tmp_path / "src").save_pretrained(tmp_path / "hf")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "hf" / name).unlink(missing_ok=True)
    again = Ours.from_folder(tmp_path / "hf")
    text = "a photo of an astronaut riding a horse, highly detailed"
    assert again.encode(text) == ours.encode(text) and len(again.vocab) == len(ours.vocab)


def test_tokenizer_that_overruns_the_embedding_table_is_a_load_error():
    from dataclasses import replace

    from openldm.checkpoints.errors import CheckpointError
    from openldm.config import CLIP_L
    from openldm.models.tokenizer import CLIPTokenizer as Ours

    wanted = "has 49408 tokens but the text encoder's embedding table 596; put"
    with pytest.raises(CheckpointError, match=wanted):
        Ours.for_config(replace(CLIP_L, vocab_size=596, pad_token=595))


def test_tokenizer_json_we_write_is_what_transformers_writes(tmp_path):
    """Our `tokenizer.json` equals the one transformers 5 saves for the same vocabulary (embedded model's)."""
    from transformers import CLIPTokenizer as HFTokenizer

    from openldm.models.tokenizer import CLIPTokenizer as Ours

    ours = Ours.from_folder(Path(__file__).parents[1] / "openldm" / "weights" / "shapes" / "tokenizer")
    ours.save(tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer.json").rename(tmp_path / "written.json")
    HFTokenizer.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    theirs = json.loads((tmp_path / "hf" / "tokenizer.json").read_text(encoding="utf-8"))
    assert json.loads((tmp_path / "written.json").read_text(encoding="utf-8")) == theirs


@pytest.mark.parametrize("config_file", ["tokenizer_config.json", "special_tokens_map.json"])
def test_the_pad_token_comes_from_the_tokenizer_folder(ours_hf, tmp_path, config_file):
    """A folder that pads with "!" (id 0, as OpenCLIP does) pads so, whatever the family default says."""
    folder = ours_hf.save(tmp_path / "tokenizer")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((folder / name).read_text())
        if name == config_file:
            data["pad_token"] = {"content": "!", "lstrip": False} if name == "tokenizer_config.json" else "!"
        else:
            data.pop("pad_token")
        (folder / name).write_text(json.dumps(data))
    tokenizer = CLIPTokenizer.from_folder(folder, pad_token=ours_hf.end_id)
    assert tokenizer.pad_id == 0 and tokenizer("a cat", 6)[0].tolist()[-2:] == [0, 0]
    (folder / "vocab.json").unlink()  # transformers 5's form: tokenizer.json beside the configs
    assert CLIPTokenizer.from_folder(folder, pad_token=ours_hf.end_id).pad_id == 0


def test_a_pad_token_outside_the_vocabulary_is_refused(ours_hf, tmp_path):
    folder = ours_hf.save(tmp_path / "tokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|pad|>"}))
    with pytest.raises(tk.CheckpointError, match=r"the pad token '<\|pad\|>' of its tokenizer config"):
        CLIPTokenizer.from_folder(folder)


def test_unicode_classes_are_remembered_and_a_broken_memo_is_rescanned(tmp_path, monkeypatch):
    from openldm.user_cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    scanned = tk._scan_classes()
    tk._classes.cache_clear()
    try:
        assert tk._classes() == scanned
        [memo] = (tmp_path / "tokenizer").iterdir()
        assert unicodedata.unidata_version in memo.name and json.loads(memo.read_text()) == list(scanned)
        ascii_only = ["\\U00000041-\\U0000005a"] * 3  # a memo in the scan's form is what a later run uses
        memo.write_text(json.dumps(ascii_only))
        tk._classes.cache_clear()
        assert list(tk._classes()) == [r"\U00000041-\U0000005a"] * 3
        memo.write_text('["[a-z]", "x", "y"]')  # not what a scan writes: ignored, rescanned
        tk._classes.cache_clear()
        assert tk._classes() == scanned
    finally:
        tk._classes.cache_clear()
