"""Every method of the library: its name, family, one-line summary and module.

A method names a config class (a :class:`mlatlas.core.config.BaseConfig` dataclass), a
``train(cfg, run=None, progress=None) -> Run`` function and, where they make sense,
``sample(run, n, seed, progress) -> Tensor`` and ``evaluate(run, n, seed, progress) -> dict``.
A module may hold several related methods (the three dynamic-programming solvers). Modules are
imported only when a method is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import ModuleType

from mlatlas.core.config import ConfigError, closest


@dataclass(frozen=True)
class Method:
    """A method: ``config`` and ``train`` name attributes of ``module_path``; ``sample`` and
    ``evaluate`` too, or ``"module:attr"`` for a function shared by a family, or None."""

    name: str
    family: str
    summary: str
    module_path: str
    config: str = "Config"
    train: str = "train"
    sample: str | None = "sample"
    evaluate: str | None = "evaluate"
    sample_config: str | None = None
    sample_figure: str | None = None

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.module_path)

    def _resolve(self, ref: str):
        module_path, _, attr = ref.rpartition(":")
        return getattr(importlib.import_module(module_path) if module_path else self.module, attr)

    @property
    def config_cls(self) -> type:
        return self._resolve(self.config)

    @property
    def train_fn(self) -> Callable:
        return self._resolve(self.train)

    @property
    def sample_config_cls(self) -> type | None:
        """The dataclass of sampling options (flags of ``sample`` and ``eval``), if any."""
        return self._resolve(self.sample_config) if self.sample_config else None

    @property
    def sample_figure_fn(self) -> Callable | None:
        """``figure(x, title, run, options)`` for ``mlatlas sample``'s picture where a grid of
        samples alone would not say what they were drawn for (ControlNet's control images)."""
        return self._resolve(self.sample_figure) if self.sample_figure else None

    def function(self, kind: str) -> Callable:
        """The ``sample`` or ``evaluate`` function; a ConfigError if the method has none."""
        ref = getattr(self, kind)
        if ref is None:
            raise ConfigError(f"{self.name} runs cannot {kind}")
        return self._resolve(ref)

    @property
    def default_data(self) -> str:
        """The default dataset, environment or grid, for ``mlatlas list``."""
        defaults = {f.name: f.default for f in fields(self.config_cls)}
        names = ("dataset", "corpus", "env", "grid")
        return str(next((defaults[k] for k in names if k in defaults), "-"))


def _tabular(name: str, module: str, summary: str, *, config: str, train: str) -> Method:
    return Method(name, "rl/tabular", summary, f"mlatlas.rl.tabular.{module}", config=config,
                  train=train, sample=None, evaluate=TABULAR_EVALUATE)


TABULAR_EVALUATE = "mlatlas.rl.tabular.common:evaluate"
DIFFUSION = "mlatlas.generative.diffusion.loop"
DIFFUSION_CONFIGS = "mlatlas.generative.diffusion.configs"
DEEP_RL = "mlatlas.rl.deep.evaluation"
CLIP = "mlatlas.contrastive.clip"
LIKELIHOOD = "mlatlas.generative.likelihood"
GAN_OPTIONS = "mlatlas.generative.gan.common:SampleOptions"
DETECTION = "mlatlas.vision.common"


def _detector(name: str, summary: str) -> Method:
    return Method(name, "vision", summary, f"mlatlas.vision.{name}", train=f"{DETECTION}:train",
                  sample=f"{DETECTION}:sample", evaluate=f"{DETECTION}:evaluate",
                  sample_config=f"{DETECTION}:SampleOptions")


def _likelihood(name: str, family: str, module: str, summary: str,
                config: str = "Config") -> Method:
    return Method(name, f"generative/{family}", summary, f"mlatlas.generative.{family}.{module}",
                  config=config, train=f"{LIKELIHOOD}:train", sample=f"{LIKELIHOOD}:sample",
                  evaluate=f"{LIKELIHOOD}:evaluate", sample_config=f"{LIKELIHOOD}:SampleOptions")


def _deep(name: str, summary: str) -> Method:
    return Method(name, "rl/deep", summary, f"mlatlas.rl.deep.{name}", sample=None,
                  evaluate=f"{DEEP_RL}:evaluate", sample_config=f"{DEEP_RL}:EvalOptions")


def _llm(name: str, summary: str, evaluate: str = "mlatlas.llm.common:evaluate") -> Method:
    return Method(name, "llm", summary, f"mlatlas.llm.{name}", sample=None, evaluate=evaluate)


def _diffusion(name: str, config: str, summary: str, module: str = DIFFUSION_CONFIGS,
               family: str = "generative/diffusion") -> Method:
    return Method(name, family, summary, module, config=config,
                  train=f"{DIFFUSION}:train", sample=f"{DIFFUSION}:sample",
                  evaluate=f"{DIFFUSION}:evaluate",
                  sample_config=f"{DIFFUSION_CONFIGS}:SampleConfig")


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        _diffusion("ddpm", "DDPMConfig", "Denoising diffusion (Ho et al. 2020): linear betas, "
                   "eps-prediction, ancestral sampling"),
        _diffusion("vp", "VPConfig", "Variance-preserving diffusion: eps, x0 or v prediction, "
                   "linear or cosine betas, DDIM/Euler/Heun sampling"),
        _diffusion("ve", "VEConfig", "Variance-exploding score matching (Song et al. 2021) in "
                   "EDM's preconditioned form"),
        _diffusion("edm", "EDMConfig", "EDM (Karras et al. 2022): preconditioning, log-normal "
                   "noise levels, Heun sampling"),
        _diffusion("flow_matching", "Config", "Flow matching on the straight path (Lipman et al. "
                   "2023): velocity regression, Euler/Heun ODE sampling",
                   "mlatlas.generative.flow_matching.flow_matching", "generative/flow_matching"),
        Method("latent_diffusion", "generative/diffusion", "Latent diffusion (Rombach et al. "
               "2022): VP diffusion in a KL/VQ autoencoder's latents, cross-attention on labels "
               "or captions, classifier-free guidance", "mlatlas.generative.diffusion.latent",
               sample_config="mlatlas.generative.diffusion.latent:SampleOptions",
               sample_figure="sample_figure"),
        Method("controlnet", "generative/diffusion", "ControlNet (Zhang et al. 2023): a "
               "trainable copy of a frozen latent diffusion UNet's encoder, zero convolutions, "
               "edge / mask / skeleton control", "mlatlas.generative.diffusion.controlnet",
               sample_config="mlatlas.generative.diffusion.controlnet:SampleOptions",
               sample_figure="sample_figure"),
        Method("rectified_flow", "generative/flow_matching", "Rectified flow (Liu et al. 2023): "
               "1-RF by flow matching, reflow on its own pairs, one-step 2-RF sampling",
               "mlatlas.generative.flow_matching.rectified_flow",
               sample_config=f"{DIFFUSION_CONFIGS}:SampleConfig"),
        Method("ngram", "generative/autoregressive", "n-gram language model: MLE, add-k and "
               "interpolated modified Kneser-Ney (Chen & Goodman 1998), characters or words",
               "mlatlas.generative.autoregressive.ngram",
               sample_config="mlatlas.generative.autoregressive.ngram:SampleOptions"),
        _likelihood("fvsbn", "autoregressive", "fvsbn", "Fully visible sigmoid belief net: "
                    "a logistic regression per pixel on the pixels before it"),
        _likelihood("nade", "autoregressive", "nade", "NADE (Larochelle & Murray 2011): tied "
                    "hidden layer, O(DH) recursion for all D conditionals"),
        _likelihood("made", "autoregressive", "made", "MADE (Germain et al. 2015): degree masks, "
                    "order- and connectivity-agnostic training, K-mask ensemble"),
        _likelihood("pixelcnn", "autoregressive", "pixelcnn", "PixelCNN (van den Oord et al. "
                    "2016): 7x7 mask A, mask-B residual blocks (with its blind spot)"),
        _likelihood("gated_pixelcnn", "autoregressive", "pixelcnn", "Gated PixelCNN (van den "
                    "Oord et al. 2016): vertical and horizontal stacks, no blind spot",
                    config="GatedConfig"),
        _likelihood("nice", "flows", "nice", "NICE (Dinh et al. 2015): additive coupling, "
                    "diagonal scaling, exact log-likelihood by change of variables"),
        _likelihood("realnvp", "flows", "realnvp", "RealNVP (Dinh et al. 2017): affine "
                    "coupling, checkerboard and channel masks, squeeze, multi-scale"),
        _likelihood("glow", "flows", "glow", "Glow (Kingma & Dhariwal 2018): ActNorm, LU 1x1 "
                    "convolution, affine coupling, learned split priors"),
        Method("gan", "generative/gan", "GAN (Goodfellow et al. 2014): BCE discriminator, "
               "minimax or non-saturating generator loss, MLPs or DCGAN nets",
               "mlatlas.generative.gan.gan", sample_config=GAN_OPTIONS),
        Method("wgan", "generative/gan", "WGAN (Arjovsky et al. 2017): Kantorovich-Rubinstein "
               "critic with weight clipping, RMSprop, n_critic schedule",
               "mlatlas.generative.gan.wgan", sample_config=GAN_OPTIONS),
        Method("wgan_gp", "generative/gan", "WGAN-GP (Gulrajani et al. 2017): gradient penalty "
               "lambda (||grad f(x_hat)|| - 1)^2 on random interpolates",
               "mlatlas.generative.gan.wgan", config="GPConfig", sample_config=GAN_OPTIONS),
        Method("autoencoder", "generative/vq", "KL autoencoder (the VAE-style first stage of "
               "latent diffusion): Gaussian posterior, KL to N(0, I), reconstruction",
               "mlatlas.generative.vq.autoencoder"),
        Method("vqvae", "generative/vq", "VQ-VAE (van den Oord et al. 2017): codebook, "
               "straight-through estimator, commitment loss, EMA codebook, dead-code restarts",
               "mlatlas.generative.vq.vqvae"),
        Method("vqgan", "generative/vq", "VQGAN (Esser et al. 2021): VQ autoencoder with a "
               "patch discriminator (hinge), adaptive weight, perceptual loss",
               "mlatlas.generative.vq.vqgan"),
        Method("vq_transformer", "generative/vq", "Transformer prior over VQ code indices "
               "(Esser et al. 2021, stage two): GPT-style, top-k/top-p sampling, decoded images",
               "mlatlas.generative.vq.prior",
               sample_config="mlatlas.generative.vq.prior:SampleOptions"),
        _detector("faster_rcnn", "Faster R-CNN (Ren et al. 2015): RPN with anchors, RoI Align "
                  "and an MLP head, on generated shapes with boxes"),
        _detector("rfcn", "R-FCN (Dai et al. 2016): position-sensitive score maps, PS-RoI "
                  "pooling and voting, on generated shapes with boxes"),
        Method("spp_net", "vision", "SPP-net (He et al. 2014): spatial pyramid pooling gives a "
               "fixed-length vector from any image size; multi-size training",
               "mlatlas.vision.spp_net", sample=None),
        _tabular("bellman", "dp", "Policy evaluation: closed form (I - gamma P_pi)^-1 r_pi "
                 "and iteration (Zhao ch. 2)", config="BellmanConfig", train="train_bellman"),
        _tabular("value_iteration", "dp", "Value iteration on the Bellman optimality equation "
                 "(Zhao Alg. 4.1)", config="ValueIterationConfig",
                 train="train_value_iteration"),
        _tabular("policy_iteration", "dp", "Policy iteration: exact evaluation + greedy "
                 "improvement (Zhao Alg. 4.2)", config="PolicyIterationConfig",
                 train="train_policy_iteration"),
        _tabular("truncated_policy_iteration", "dp", "Truncated policy iteration, j sweeps per "
                 "evaluation (Zhao Alg. 4.3)", config="TruncatedPolicyIterationConfig",
                 train="train_truncated_policy_iteration"),
        _tabular("mc_basic", "monte_carlo", "MC Basic: q from episodes of every (s, a), greedy "
                 "improvement (Zhao Alg. 5.1)", config="MCBasicConfig", train="train_mc_basic"),
        _tabular("mc_exploring_starts", "monte_carlo", "MC Exploring Starts, every-visit "
                 "returns (Zhao Alg. 5.2)", config="MCExploringStartsConfig",
                 train="train_mc_exploring_starts"),
        _tabular("mc_epsilon_greedy", "monte_carlo", "MC epsilon-greedy, no exploring starts "
                 "(Zhao Alg. 5.3)", config="MCEpsilonGreedyConfig",
                 train="train_mc_epsilon_greedy"),
        Method("robbins_monro", "rl/stochastic-approx", "Robbins-Monro root finding, e.g. "
               "g(w) = tanh(w - 1) (Zhao ch. 6)", "mlatlas.rl.tabular.stochastic_approx",
               config="RobbinsMonroConfig", train="train_robbins_monro", sample=None,
               evaluate=None),
        Method("mean_estimation", "rl/stochastic-approx", "Incremental mean estimation "
               "w_{k+1} = w_k - a_k (w_k - x_k) (Zhao ch. 6)",
               "mlatlas.rl.tabular.stochastic_approx", config="MeanEstimationConfig",
               train="train_mean_estimation", sample=None, evaluate=None),
        Method("sgd_comparison", "rl/stochastic-approx", "SGD versus BGD versus mini-batch GD "
               "on mean estimation (Zhao ch. 6)", "mlatlas.rl.tabular.stochastic_approx",
               config="SGDComparisonConfig", train="train_sgd_comparison", sample=None,
               evaluate=None),
        _tabular("td0", "td", "TD(0) learning of state values v_pi (Zhao Alg. 7.1 / eq. 7.1)",
                 config="TD0Config", train="train_td0"),
        _tabular("sarsa", "td", "Sarsa with epsilon-greedy policy improvement (Zhao Alg. 7.1)",
                 config="SarsaConfig", train="train_sarsa"),
        _tabular("expected_sarsa", "td", "Expected Sarsa (Zhao Section 7.3.1)",
                 config="ExpectedSarsaConfig", train="train_expected_sarsa"),
        _tabular("n_step_sarsa", "td", "n-step Sarsa (Zhao Section 7.3.2)",
                 config="NStepSarsaConfig", train="train_n_step_sarsa"),
        _tabular("q_learning", "td", "Q-learning, on-policy version (Zhao Alg. 7.2)",
                 config="QLearningConfig", train="train_q_learning"),
        _tabular("q_learning_off_policy", "td", "Q-learning off-policy from a behaviour "
                 "policy's episode (Zhao Alg. 7.3)", config="QLearningOffPolicyConfig",
                 train="train_q_learning_off_policy"),
        _tabular("td_linear", "vfa_linear", "TD-linear value estimation with polynomial or "
                 "Fourier features (Zhao Section 8.2)", config="TDLinearConfig",
                 train="train_td_linear"),
        _tabular("sarsa_linear", "vfa_linear", "Sarsa with linear function approximation (Zhao "
                 "Section 8.3)", config="SarsaLinearConfig", train="train_sarsa_linear"),
        _tabular("q_learning_linear", "vfa_linear", "Q-learning with linear function "
                 "approximation (Zhao Section 8.3)", config="QLearningLinearConfig",
                 train="train_q_learning_linear"),
        _tabular("dqn_tabular", "dqn", "Deep Q-learning with replay and a target network "
                 "(Zhao Section 8.4)", config="DQNConfig", train="train_dqn_tabular"),
        _tabular("reinforce_tabular", "policy_gradient", "REINFORCE, softmax policy on the "
                 "grid (Zhao Alg. 9.1)", config="ReinforceConfig",
                 train="train_reinforce_tabular"),
        _tabular("qac_tabular", "actor_critic", "Q actor-critic (Zhao Alg. 10.1)",
                 config="QACConfig", train="train_qac_tabular"),
        _tabular("a2c_tabular", "actor_critic", "Advantage (TD) actor-critic (Zhao Alg. 10.2)",
                 config="A2CConfig", train="train_a2c_tabular"),
        _tabular("off_policy_ac_tabular", "actor_critic", "Off-policy actor-critic with "
                 "importance sampling (Zhao Alg. 10.3)", config="OffPolicyACConfig",
                 train="train_off_policy_ac_tabular"),
        Method("deterministic_ac", "rl/actor-critic", "Deterministic actor-critic (Zhao Alg. "
               "10.4) on a linear-quadratic regulator with a known optimum",
               "mlatlas.rl.tabular.actor_critic", config="DeterministicACConfig",
               train="train_deterministic_ac", sample=None, evaluate="evaluate_deterministic_ac"),
        Method("clip", "contrastive", "CLIP (Radford et al. 2021): symmetric softmax contrastive "
               "loss, learnable scale, zero-shot prompt ensembles", CLIP, sample=None),
        Method("siglip", "contrastive", "SigLIP (Zhai et al. 2023): pairwise sigmoid loss with "
               "learnable temperature and bias, dense or chunked", CLIP, config="SigLIPConfig",
               sample=None),
        Method("cpc", "contrastive", "CPC (van den Oord et al. 2018): causal encoder + GRU "
               "context, k-step InfoNCE with in-batch negatives, linear probe vs random init",
               "mlatlas.contrastive.cpc", sample=None),
        Method("simclr", "contrastive", "SimCLR (Chen et al. 2020): two augmented views, "
               "NT-Xent, linear probe of the encoder against its initialisation",
               "mlatlas.contrastive.simclr", sample=None),
        Method("lit", "contrastive", "LiT (Zhai et al. 2022): CLIP with a pre-trained, locked "
               "image tower (a SimCLR or CLIP run, or pre-trained in the run)",
               "mlatlas.contrastive.lit", sample=None),
        Method("blip", "contrastive", "BLIP (Li et al. 2022): ITC, ITM with hard negatives and "
               "a captioning decoder sharing one text Transformer; CapFilt bootstrapping",
               "mlatlas.contrastive.blip", sample=None),
        _llm("sft", "Supervised fine-tuning of the tiny Llama-layout LM on worked answers "
             "(the starting policy and reference of the alignment methods)"),
        _llm("reward_model", "Bradley-Terry reward model on preference pairs of the SFT "
             "policy's correct and wrong answers", evaluate="evaluate"),
        _llm("ppo_rlhf", "PPO-RLHF with the PPO-max recipe (Zheng et al. 2023): reward "
             "normalisation and clipping, token-level KL, critic from the reward model"),
        _llm("grpo", "GRPO (Shao et al. 2024): group-relative advantages, clipped ratio, k3 KL "
             "to the reference; the Dr. GRPO variant"),
        _llm("dpo", "DPO (Rafailov et al. 2023) and IPO on pairs of the policy's own correct and "
             "wrong answers"),
        _llm("kimi", "Kimi k1.5 RL (Kimi Team 2025): mirror-descent surrogate with tau, length "
             "penalty, curriculum by difficulty"),
        Method("vlm", "multimodal", "A small Kimi-VL: packed native-resolution ViT with 2D "
               "RoPE, pixel shuffle, MoE decoder; staged training, CircularEval",
               "mlatlas.multimodal.vlm", sample_config="mlatlas.multimodal.vlm:Options"),
        _deep("ppo", "Proximal policy optimisation (Schulman et al. 2017): clipped surrogate, "
              "GAE, value clipping, entropy bonus"),
        _deep("reinforce", "REINFORCE (Williams 1992): Monte Carlo policy gradient, with or "
              "without a learned baseline"),
        _deep("a2c", "Advantage actor-critic (Mnih et al. 2016), synchronous: n-step GAE "
              "advantages, shared optimiser"),
        _deep("trpo", "Trust-region policy optimisation (Schulman et al. 2015): conjugate "
              "gradient on Fisher-vector products, KL line search"),
        _deep("ddpg", "Deep deterministic policy gradient (Lillicrap et al. 2016): replay, "
              "target networks, Gaussian or OU noise"),
        _deep("td3", "TD3 (Fujimoto et al. 2018): clipped double Q, target policy smoothing, "
              "delayed actor updates"),
    ]
}


def get_method(name: str) -> Method:
    """The method called ``name``, read case-insensitively with ``-`` as ``_`` (``DDPM``,
    ``Rectified-Flow``); a ConfigError with the closest names otherwise."""
    try:
        return METHODS[name.lower().replace("-", "_")]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}{closest(name, METHODS)} "
                          f"(known: {', '.join(METHODS)})") from None
