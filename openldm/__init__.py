"""openldm: a complete, hackable latent diffusion (Stable Diffusion) system."""

__version__ = "0.1.0"
