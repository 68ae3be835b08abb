"""Reinforcement learning: tabular foundations (Zhao's book) and deep RL on gymnasium.

Importing this package registers the grid world with gymnasium as ``mlatlas/GridWorld-v0``,
and the two identity tasks the deep agents are checked on (``mlatlas/Identity-v0``,
``mlatlas/IdentityContinuous-v0``).
"""

from mlatlas.rl.deep.toy_envs import register as register_toy_envs
from mlatlas.rl.tabular.env import register

register()
register_toy_envs()
