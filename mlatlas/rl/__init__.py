"""Reinforcement learning: tabular foundations (Zhao's book) and deep RL on gymnasium.

Importing this package registers the grid world with gymnasium as ``mlatlas/GridWorld-v0``.
"""

from mlatlas.rl.tabular.env import register

register()
