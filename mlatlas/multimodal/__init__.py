"""The Kimi-VL-shaped vision-language model."""
