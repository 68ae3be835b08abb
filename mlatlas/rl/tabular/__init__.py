"""Tabular RL on the grid world, following Zhao's "Mathematical Foundations of RL".

Modules, in the book's order: ``gridworld`` (the world, its tensor model, policies), ``env`` (the
gymnasium environment ``mlatlas/GridWorld-v0``), ``bellman`` (the Bellman and Bellman optimality
equations solved exactly, ch. 2-3), ``dp`` (policy evaluation, value and policy iteration, ch. 2
and 4), ``monte_carlo`` (ch. 5), ``stochastic_approx`` (ch. 6), ``td`` (ch. 7), ``features``,
``vfa_linear`` and ``dqn`` (ch. 8), ``policy_gradient`` (ch. 9) and ``actor_critic`` (ch. 10).
``episodes`` runs batches of episodes, ``common`` holds the grid config, the exact scores and the
files every grid-world run leaves, ``plots`` draws the book's figures. ``bellman``, ``common``,
``episodes``, ``features`` and ``plots`` import no method module.
"""
