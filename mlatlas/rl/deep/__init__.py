"""Deep reinforcement learning on gymnasium: REINFORCE, A2C, PPO, TRPO, DDPG and TD3.

Each agent is a module with a ``Config`` (``Config.create(env=...)`` applies the env's tuned
defaults), ``train(cfg) -> Run``, ``evaluate(run, n, seed)`` and the pure functions of its maths
(losses, targets, updates). What they share lives by what it holds: :mod:`.config` (the family's
fields), :mod:`.envs` (vector environments, the step loop around them), :mod:`.normalize`,
:mod:`.policies` (networks, the policy's closed forms), :mod:`.gsde` (state-dependent
exploration of the actor-critic agents' Gaussian policies), :mod:`.rollout` (on-policy rollouts),
:mod:`.replay` (the replay buffer), :mod:`.loop` (training counted in environment steps) and
:mod:`.evaluation` (scores and videos); advantages live in :mod:`mlatlas.rl.returns` beside the
tabular methods' returns.
"""
