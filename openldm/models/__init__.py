"""The networks: UNet, VAE, CLIP text encoder, tokenizer, latent formats."""
