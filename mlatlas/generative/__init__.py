"""Deep generative models."""
