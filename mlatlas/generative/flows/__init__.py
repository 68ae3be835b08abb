"""Normalizing flows: NICE, RealNVP and Glow, exact log-likelihood by change of variables."""
