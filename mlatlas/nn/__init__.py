"""Network building blocks every family shares; families import them, never copy them.

- ``attention``: multi-head attention (self, cross, causal, padding masks, grouped-query,
  rotary position embeddings, KV cache).
- ``transformer``: the pre-norm Transformer block and stack of the image and text towers.
- ``layers``: RMSNorm, SwiGLU, the GELU feed-forward layer.
- ``unet``: sinusoidal time embedding, label embedding, TimeMLP (points) and the UNet (images)
  of the diffusion family.
- ``vit``: the ViT patch embedding (patches, [CLS], learned positions).
- ``tokenizers``: character and BPE tokenizers with one set of special ids.
- ``sampling``: the next-token sampler (greedy, temperature, top-k, top-p).
"""
