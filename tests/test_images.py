import numpy as np
import pytest
import torch
from PIL import Image

from openldm.pipelines.images import (
    check_size,
    extend_canvas,
    masked_region,
    open_image,
    paste_back,
    prepare_mask,
    resize_image,
    to_pil,
    to_tensor,
)


def gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None].repeat(w, 1)
    return Image.fromarray(np.concatenate([x, y, 255 - x], -1).astype(np.uint8))


def test_tensor_round_trip_is_exact_for_8bit_pixels():
    image = gradient(16, 8)
    x = to_tensor([image])
    assert x.shape == (1, 3, 8, 16) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(np.asarray(to_pil(x)[0]), np.asarray(image))


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_resize_modes_give_the_target_size(mode):
    assert resize_image(gradient(40, 20), 16, 16, mode).size == (16, 16)


def test_crop_keeps_the_centre_and_fill_stretches_edges():
    image = gradient(40, 20)
    cropped = np.asarray(resize_image(image, 20, 20, "crop")).astype(int)
    # crop: the 40x20 image is cut to its central 20x20, so red spans the middle of the range
    assert 50 < cropped[0, 0, 0] < 80 and 175 < cropped[0, -1, 0] < 205
    filled = np.asarray(resize_image(image, 40, 40, "fill")).astype(int)
    # fill: the image is centred in rows 10..30; the top band repeats its first row
    assert np.array_equal(filled[0], filled[5]) and np.abs(filled[0] - filled[10]).max() <= 8


def test_unknown_resize_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match="resize, crop, fill"):
        resize_image(gradient(8, 8), 8, 8, "zoom")


def test_size_must_be_multiple_of_8():
    check_size(64, 72)
    with pytest.raises(ValueError, match="multiples of 8; got 63x64"):
        check_size(63, 64)


def test_mask_invert_and_blur():
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    inverted = np.asarray(prepare_mask(mask, invert=True))
    assert inverted[0, 0] == 255 and inverted[16, 16] == 0
    blurred = np.asarray(prepare_mask(mask, blur=2))
    assert 0 < blurred[16, 7] < 255 and blurred[16, 16] == 255


def test_masked_region_is_padded_has_target_aspect_and_stays_inside():
    mask = Image.new("L", (100, 60), 0)
    mask.paste(255, (40, 20, 50, 30))
    x0, y0, x1, y1 = masked_region(mask, padding=4, width=64, height=32)
    assert x0 <= 36 and y0 <= 16 and x1 >= 54 and y1 >= 34
    assert (x1 - x0) == 2 * (y1 - y0)
    assert x0 >= 0 and y0 >= 0 and x1 <= 100 and y1 <= 60
    with pytest.raises(ValueError, match="mask is empty"):
        masked_region(Image.new("L", (8, 8)), 0, 8, 8)


def test_paste_back_changes_only_the_masked_pixels():
    original = Image.new("RGB", (32, 32), (0, 0, 0))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (10, 10, 20, 20))
    box = masked_region(mask, 2, 16, 16)
    out = np.asarray(paste_back(original, Image.new("RGB", (16, 16), (255, 255, 255)), box, mask))
    assert (out[10:20, 10:20] == 255).all() and (out[:8] == 0).all() and (out[:, :8] == 0).all()


def test_extend_canvas_marks_only_new_area():
    canvas, mask = extend_canvas(gradient(16, 16), left=8, bottom=8)
    assert canvas.size == (24, 24)
    m = np.asarray(mask)
    assert (m[:16, 8:] == 0).all() and (m[:, :8] == 255).all() and (m[16:] == 255).all()


def test_missing_and_unreadable_images_name_the_input(tmp_path):
    with pytest.raises(ValueError, match="mask not found"):
        open_image(tmp_path / "nope.png", what="mask")
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(ValueError, match="init image .* not a readable image"):
        open_image(tmp_path / "x.png", what="init image")


def test_to_pil_clamps_out_of_range():
    out = np.asarray(to_pil(torch.full((1, 3, 2, 2), 3.0))[0])
    assert (out == 255).all()
