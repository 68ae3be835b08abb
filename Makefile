# Every target creates or updates .venv first, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: install dev docs docs-serve docs-check demo test test-slow lint bench bench-diffusion bench-rl bench-contrastive \
        bench-llm test-openclip test-torchvision test-tensorflow classifiers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	@echo "installing mlatlas and torch into $(VENV) (about 3 minutes the first time)..."
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	@echo "installing the dev extras: pytest, ruff, diffusers, transformers, trl, stable-baselines3, nltk, normflows, vector-quantize-pytorch (about 2 minutes)..."
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
	# Both PPOs explore Pendulum with gSDE (rl-zoo's setting, mlatlas's preset).
	$(BIN)/python benchmarks/rl_vs_sb3.py --algos ppo --envs Pendulum-v1 --libs ours,sb3
	$(BIN)/python benchmarks/rl_vs_sb3.py --algos ppo,a2c --envs Acrobot-v1 --libs ours,sb3

# The heavy peers in one venv of their own: open_clip needs torchvision, which installs only
# beside torch 2.14.1 (a CUDA build); TensorFlow and tf-keras (~3 GB) sit beside them. mlatlas
# goes on top without its dependencies (the few it needs there are named).
OPENCLIP := .venv-openclip

$(OPENCLIP)/.installed:
	$(PYTHON) -m venv $(OPENCLIP)
	$(OPENCLIP)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 \
		open_clip_torch==3.3.0 tensorflow-cpu==2.21.0 tf-keras==2.21.0 tfrecord \
		google-crc32c numpy pytest pytest-xdist hypothesis
	$(OPENCLIP)/bin/python -m pip install -q -e . --no-deps
	touch $@

test-openclip: $(OPENCLIP)/.installed
	$(OPENCLIP)/bin/python -m pytest -q tests/test_parity_open_clip.py

# The detection operators against torchvision.ops (outputs and gradients), in the same venv.
test-torchvision: $(OPENCLIP)/.installed
	$(OPENCLIP)/bin/python -m pytest -q tests/test_parity_torchvision.py

# TFRecord files, tf.Example bytes and feature-column ids against TensorFlow, in the same venv.
test-tensorflow: $(OPENCLIP)/.installed
	$(OPENCLIP)/bin/python -m pytest -q tests/test_parity_tensorflow_*.py

# Contrastive losses: chunked SigLIP memory and time (about 10 minutes), SigLIP against CLIP
# over batch sizes and seeds (about 25 minutes), parity and speed against open_clip.
bench-contrastive: dev $(OPENCLIP)/.installed
	$(BIN)/python benchmarks/siglip_chunked.py --sizes 8192 --chunks 256 512 1024 2048
	$(BIN)/python benchmarks/siglip_vs_clip.py
	$(BIN)/python benchmarks/contrastive_distributed.py
	$(OPENCLIP)/bin/python benchmarks/contrastive_vs_open_clip.py

# Language-model alignment against TRL (GRPOTrainer, DPOTrainer) from the same exported SFT
# weights: seconds per step and held-out accuracy after equal steps.
bench-llm: dev
	$(BIN)/python benchmarks/llm_vs_trl.py

classifiers: install
	$(BIN)/mlatlas classifier digits mnist fashion-mnist shapes

# The documentation site (mkdocs-material, API pages by mkdocstrings) into site/. KaTeX comes
# from the npm registry at a pinned version and is served by the site itself, so the site and
# its reader need no network; --strict fails on a broken link or a missing code reference.
KATEX_VERSION := 0.16.22
KATEX := build/katex

$(VENV)/.installed-docs: $(VENV)/.installed-dev
	@echo "installing the docs extra: mkdocs-material, mkdocstrings, jieba, selenium..."
	$(PIP) -e '.[dev,docs]'
	touch $@

$(KATEX)/katex.min.js:
	@echo "fetching KaTeX $(KATEX_VERSION) from the npm registry..."
	rm -rf build/katex-pack $(KATEX) && mkdir -p build/katex-pack $(KATEX)
	cd build/katex-pack && npm pack --silent katex@$(KATEX_VERSION) > /dev/null
	tar -xzf build/katex-pack/katex-$(KATEX_VERSION).tgz -C build/katex-pack
	cp -r build/katex-pack/package/dist/katex.min.css build/katex-pack/package/dist/fonts \
		build/katex-pack/package/LICENSE $(KATEX)/
	cp build/katex-pack/package/dist/katex.min.js $(KATEX)/katex.min.js

docs: $(VENV)/.installed-docs $(KATEX)/katex.min.js
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(VENV)/.installed-docs $(KATEX)/katex.min.js
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The built site in headless Chromium (Debian's package; installed here when missing and root):
# every page loads without console errors, images, links, maths and search work. Screenshots go
# to $$MLATLAS_SCREENSHOTS (default /tmp/mlatlas-docs-screenshots).
BROWSER_DEBS := chromium chromium-driver fonts-wqy-microhei

docs-check: docs
	@command -v chromedriver > /dev/null && fc-list :lang=zh | grep -q . || \
		{ [ "$$(id -u)" = 0 ] && apt-get install -y -q --no-install-recommends $(BROWSER_DEBS) > /dev/null; } || \
		{ echo "docs-check needs Debian's $(BROWSER_DEBS): apt-get install them"; exit 1; }
	MLATLAS_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -m docs -n 0 tests/test_docs_site.py tests/test_docs_build.py

clean:
	rm -rf $(VENV) $(OPENCLIP) runs site build .pytest_cache .ruff_cache *.egg-info
