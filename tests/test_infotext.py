import pytest
from PIL import Image

from openldm.pipelines.infotext import format_infotext, parse_infotext, read_png, save_png

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
