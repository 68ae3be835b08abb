"""Deep reinforcement learning on gymnasium: REINFORCE, A2C, PPO, TRPO, DDPG and TD3.

Each agent is a module with a ``Config`` (``Config.create(env=...)`` applies the env's tuned
defaults), ``train(cfg) -> Run`` and the pure functions of its maths (losses, targets, updates).
:mod:`~mlatlas.rl.deep.common` holds what they share; advantages live in
:mod:`mlatlas.rl.returns` beside the tabular methods' returns.
"""
