"""Representation learning: contrastive losses (InfoNCE, NT-Xent, CLIP, SigLIP) and the models
built on them."""
