import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from openldm.diffusion.registry import SAMPLERS, SCHEDULE_DISPLAY, resolve
from openldm.pipelines.infotext import format_infotext, parse_infotext, read_png, save_png
from openldm.pipelines.params import (
    INFOTEXT_KEYS,
    UPSCALERS,
    GenerationParams,
    SettingsError,
    infotext_settings,
    params_from_infotext,
    read_infotext,
)

SETTINGS = {
    "Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.5, "Seed": 1234,
    "Size": "512x768", "Model hash": "0123456789", "Model": "my model, v2",
}


def test_format_matches_the_a1111_layout():
    text = format_infotext("a red circle", "blurry", {"Steps": 20, "Sampler": "Euler a", "Seed": 3})
    assert text == "a red circle\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 3"


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [("a red circle", "blurry"), ("multi\nline prompt, (x:1.2)", ""), ("p", "neg\nover lines"), ("", "")],
)
def test_round_trip(prompt, negative):
    got_prompt, got_negative, settings = parse_infotext(format_infotext(prompt, negative, SETTINGS))
    assert (got_prompt, got_negative) == (prompt, negative)
    assert settings == {k: str(v) for k, v in SETTINGS.items()}


def test_parses_a_quoted_value_with_commas():
    text = 'x\nSteps: 5, Lora hashes: "a: 1, b: 2", Seed: 9'
    assert parse_infotext(text)[2] == {"Steps": "5", "Lora hashes": "a: 1, b: 2", "Seed": "9"}


def test_prompt_without_settings_line_stays_prompt():
    assert parse_infotext("just a prompt") == ("just a prompt", "", {})


def test_a_quote_that_is_not_json_is_kept_as_written():
    """Found by the fuzzer: json.loads raised on an unterminated or badly escaped quoted value."""
    assert parse_infotext('x\nSteps: 1, Model: "')[2] == {"Steps": "1", "Model": '"'}
    assert parse_infotext('x\nSteps: 1, Model: "a\\qb"')[2] == {"Steps": "1", "Model": '"a\\qb"'}


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [("\nafter a blank line", ""), ("p", "  two spaces"), ("p", "a\nNegative prompt: b"), ("", "\n")],
)
def test_round_trip_keeps_edge_whitespace_and_later_negative_lines(prompt, negative):
    """Found by the fuzzer: a leading newline and a negative prompt's leading spaces were lost."""
    assert parse_infotext(format_infotext(prompt, negative, SETTINGS))[:2] == (prompt, negative)


def test_values_with_spaces_at_either_end_are_quoted():
    text = format_infotext("p", "", {"Steps": 1, "Model hash": " ", "Model": "m "})
    assert text == 'p\nSteps: 1, Model hash: " ", Model: "m "'
    assert parse_infotext(text)[2] == {"Steps": "1", "Model hash": " ", "Model": "m "}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_numbers_that_are_not_finite_are_unreadable(value):
    with pytest.raises(ValueError, match="unreadable infotext value.*not a finite number"):
        params_from_infotext("p", "", {"Steps": "2", "CFG scale": value})


def test_png_keeps_both_chunks_and_writes_atomically(tmp_path):
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    path = save_png(image, tmp_path / "sub" / "a.png", "p\nSteps: 1, Seed: 2", {"seed": 2, "steps": 1})
    assert read_png(path) == ("p\nSteps: 1, Seed: 2", {"seed": 2, "steps": 1})
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]

    class Boom(Image.Image):
        def save(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_png(Boom(), tmp_path / "sub" / "b.png", "x", {})
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]


def test_unreadable_png_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable PNG"):
        read_png(bad)


# --- properties (hypothesis): any text parses, any settings round-trip ----------------------------

_TRICKY = ["\n", ",", ":", '"', "\\", " ", "Negative prompt:", "Steps: 3, Seed: 1", '\\"', "\\u12", "\t", "é"]
TEXT = st.lists(st.sampled_from(_TRICKY) | st.text(max_size=4), max_size=12).map("".join)
_KEYS = [*INFOTEXT_KEYS, "Steps", "ENSD"]
_VALUES = st.sampled_from(["1", "-2", "0.5", "nan", "inf", "1e999", "8x8", "1,2", "a: 1, b", "x", ""])
INFOTEXTS = st.one_of(
    TEXT,
    st.tuples(TEXT, st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES | TEXT), min_size=1, max_size=6)).map(
        lambda t: t[0] + "\n" + ", ".join(f"{k}: {v}" for k, v in t[1])
    ),
)


@given(INFOTEXTS)
def test_any_text_parses_and_reads_as_settings_or_a_value_error(text):
    prompt, negative, pairs = parse_infotext(text)
    assert isinstance(prompt, str) and isinstance(negative, str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in pairs.items())
    try:
        params = params_from_infotext(prompt, negative, pairs)
    except ValueError as e:
        assert str(e).startswith("unreadable infotext value") or isinstance(e, SettingsError), e
        return
    numbers = (params.cfg, params.strength, params.hires_strength, params.upscale_by, params.refiner_switch)
    assert all(x is None or math.isfinite(x) for x in numbers)


_REAL = st.floats(-20, 20, allow_nan=False)
_UNIT = st.floats(0, 1)
_SIZE = st.tuples(st.integers(1, 8192), st.integers(1, 8192))
# a prompt line that starts with "Negative prompt:" is where the negative prompt starts: A1111's format
PROMPT = TEXT.filter(lambda t: not any(line.startswith("Negative prompt:") for line in t.split("\n")))
# "Lora weights: a: 0.8, b: 1.0" cannot hold a name with a comma (or edge spaces); see the test below
LORA_NAME = st.text(st.characters(codec="utf-8", exclude_characters=","), min_size=1, max_size=8).filter(
    lambda t: t == t.strip()
)
PARAMS = st.builds(
    GenerationParams, prompt=PROMPT, negative=TEXT, steps=st.integers(1, 150),
    sampler=st.sampled_from(list(SAMPLERS)), schedule=st.none() | st.sampled_from(list(SCHEDULE_DISPLAY)),
    cfg=st.none() | st.floats(0, 30), guidance_rescale=_UNIT, seed=st.integers(0, 2**32 - 1),
    subseed=st.integers(0, 2**32 - 1), subseed_strength=_UNIT, clip_skip=st.none() | st.integers(1, 12),
    strength=_UNIT, upscale_by=st.floats(1, 8), upscaler=st.sampled_from(UPSCALERS),
    hires_steps=st.none() | st.integers(1, 150), hires_strength=_UNIT,
    hires_width=st.integers(0, 4096), hires_height=st.integers(0, 4096), hires_prompt=TEXT,
    hires_negative=TEXT,
    hires_sampler=st.none() | st.sampled_from(list(SAMPLERS)), hires_cfg=st.none() | st.floats(0, 30),
    eta=st.none() | st.floats(0, 2), s_noise=st.none() | st.floats(0, 2), original_size=st.none() | _SIZE,
    crop_coords=st.tuples(st.integers(0, 4096), st.integers(0, 4096)), target_size=st.none() | _SIZE,
    outpaint=st.tuples(*[st.integers(0, 1024)] * 4), refiner_model=st.none() | TEXT, refiner_switch=_UNIT,
    loras=st.lists(st.tuples(LORA_NAME, _REAL), max_size=3).map(tuple),
)
MODES = st.sampled_from(["txt2img", "img2img", "inpaint", "outpaint", "upscale"])


def _kept(p: GenerationParams, mode: str, width: int, height: int) -> GenerationParams:
    """What an infotext records of `p` (by A1111's display names); the rest reads back as the defaults."""
    spec, schedule = resolve(p.sampler, p.schedule)
    kept = {"steps": p.steps, "sampler": spec.display, "schedule": SCHEDULE_DISPLAY[schedule], "cfg": p.cfg,
            "seed": p.seed, "width": width, "height": height, "original_size": p.original_size,
            "target_size": p.target_size, "crop_coords": p.crop_coords, "outpaint": p.outpaint,
            "loras": p.loras}
    if p.subseed_strength:
        kept |= {"subseed": p.subseed, "subseed_strength": p.subseed_strength}
    if mode == "upscale":
        resized = p.hires_width or p.hires_height
        kept |= {"hires": True, "hires_strength": p.hires_strength, "hires_steps": p.hires_steps,
                 "upscaler": p.upscaler, "hires_prompt": p.hires_prompt, "hires_negative": p.hires_negative,
                 "hires_sampler": p.hires_sampler and resolve(p.hires_sampler)[0].display,
                 "hires_cfg": p.hires_cfg}
        kept |= {"hires_width": p.hires_width, "hires_height": p.hires_height} if resized else {
            "upscale_by": p.upscale_by}
    elif mode != "txt2img":
        kept["strength"] = p.strength
    if p.clip_skip is not None and p.clip_skip > 1:  # 1 is no skip, as in A1111
        kept["clip_skip"] = p.clip_skip
    if p.guidance_rescale:
        kept["guidance_rescale"] = p.guidance_rescale
    kept |= {"eta": p.eta, "s_noise": p.s_noise}
    if p.refiner_model is not None:
        kept |= {"refiner_model": p.refiner_model, "refiner_switch": p.refiner_switch}
    return GenerationParams(p.prompt, negative=p.negative, **kept)


@given(PARAMS, MODES, st.integers(8, 4096), st.integers(8, 4096), TEXT, TEXT)
def test_any_settings_written_read_back_the_same(params, mode, width, height, model, model_hash):
    text = format_infotext(params.prompt, params.negative,
                           infotext_settings(params, width, height, model, model_hash, mode))
    prompt, negative, pairs = parse_infotext(text)
    assert (pairs["Model"], pairs["Model hash"]) == (model, model_hash)
    assert read_infotext(prompt, negative, pairs) == (_kept(params, mode, width, height), ())
