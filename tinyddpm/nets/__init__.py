"""Denoisers and their parts: embeddings, attention, the UNet, the MLP, the VAE, the text encoder, presets."""
