# Every target creates or updates .venv first, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: install dev demo test test-slow lint bench bench-diffusion bench-rl classifiers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/mlatlas demo

test: dev
	$(BIN)/python -m pytest

test-slow: dev
	$(BIN)/python -m pytest -m slow

lint: dev
	$(BIN)/ruff check .

bench: dev
	$(BIN)/python benchmarks/ddpm_vs_diffusers.py
	$(BIN)/python benchmarks/samplers_vs_diffusers.py --no-unet
	$(BIN)/python benchmarks/value_iteration_bandwidth.py

# The diffusion family's quality benchmarks train models first: about 40 minutes on 2 cores.
bench-diffusion: dev
	$(BIN)/python benchmarks/diffusion_nfe.py
	$(BIN)/python benchmarks/guidance.py
	$(BIN)/python benchmarks/rectified_flow_reflow.py

# Deep RL time to threshold against Stable-Baselines3 (rl-zoo settings), 3 seeds: about 40
# minutes on 2 cores. CleanRL's ppo.py joins with --cleanrl-dir (see the script's docstring).
bench-rl: dev
	$(BIN)/python benchmarks/rl_vs_sb3.py --algos ppo,a2c,trpo --envs CartPole-v1 --libs ours,sb3
	$(BIN)/python benchmarks/rl_vs_sb3.py --algos ddpg,td3,trpo --envs Pendulum-v1 --libs ours,sb3
	# rl-zoo's PPO explores Pendulum with gSDE in 1e5 steps; mlatlas's PPO needs ~1.3e5.
	$(BIN)/python benchmarks/rl_vs_sb3.py --algos ppo --envs Pendulum-v1 --libs ours,sb3 --cap-mult 3
	$(BIN)/python benchmarks/rl_vs_sb3.py --algos ppo,a2c --envs Acrobot-v1 --libs ours,sb3

classifiers: install
	$(BIN)/mlatlas classifier digits mnist fashion-mnist

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
