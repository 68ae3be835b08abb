"""Adversarial models: GAN, WGAN and WGAN-GP (losses, networks, one loop)."""
