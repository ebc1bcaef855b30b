"""Fit a model's latent -> RGB preview map (`LatentFormat.rgb_factors`, `rgb_bias`) by least squares.

Encodes images with the model's own VAE, takes the model-space latent (what the sampler sees), and
solves RGB in [-1, 1] (the image average-pooled to the latent's size) ~= latent @ F + b. The embedded
model's factors in openldm/config.py come from:

    python scripts/fit_preview_factors.py openldm/weights/shapes --images 128
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from openldm.data.shapes import ShapesDataset
from openldm.pipelines import images as im
from openldm.pipelines.loading import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = load(args.model)
    data = ShapesDataset(args.images, seed=12345)  # not the training seed's first items
    latents, pixels = [], []
    for i in range(args.images):
        image = data[i][0]
        x = im.to_tensor([image])
        latents.append(pipe.encode_image(image)[0])
        pixels.append(F.avg_pool2d(x, pipe.config.vae.downsample_factor)[0])
    z = torch.stack(latents).permute(0, 2, 3, 1).reshape(-1, latents[0].shape[0]).double()
    rgb = torch.stack(pixels).permute(0, 2, 3, 1).reshape(-1, 3).double()
    design = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, rgb).solution
    residual = (design @ solution - rgb).abs().mean().item()
    factors, bias = solution[:-1], solution[-1]
    rows = ("(" + ", ".join(f"{v:.4f}" for v in row) + ")" for row in factors)
    print("rgb_factors=(" + ", ".join(rows) + "),")
    print("rgb_bias=(" + ", ".join(f"{v:.4f}" for v in bias) + "),")
    print(f"mean abs error {residual:.4f} (RGB in [-1, 1]) over {len(z):,} latent pixels")


if __name__ == "__main__":
    main()
