"""Tabular RL on the grid world, following Zhao's "Mathematical Foundations of RL".

Modules, in the book's order: ``gridworld`` (the world, its tensor model, policies), ``env`` (the
gymnasium environment ``mlatlas/GridWorld-v0``), ``bellman`` (ch. 2), ``dp`` (ch. 3-4),
``monte_carlo`` (ch. 5), ``stochastic_approx`` (ch. 6), ``td`` (ch. 7), ``vfa`` (ch. 8),
``policy_gradient`` (ch. 9) and ``actor_critic`` (ch. 10). ``common`` writes the files every
grid-world run leaves; ``plots`` draws the book's figures.
"""
