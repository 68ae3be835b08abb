"""Autoencoders with continuous (KL) and discrete (vector-quantised) latents: the first stages of
the two-stage generative models (the transformer prior over codes, latent diffusion)."""
