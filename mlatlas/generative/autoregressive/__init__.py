"""Autoregressive models: n-gram language models and autoregressive image models."""
