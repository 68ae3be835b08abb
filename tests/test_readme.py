"""The README's reinforcement-learning tour runs as written (with the run folder under tmp)."""

import json
import re
import shlex
from pathlib import Path

from mlatlas.cli import main
from mlatlas.core.run import Run

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_commands(marker: str) -> list[list[str]]:
    """The mlatlas commands (without "mlatlas") of the README's bash block holding ``marker``."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if marker in b)
    return [shlex.split(line.split("#")[0])[1:] for line in block.splitlines()
            if line.startswith("mlatlas ")]


def run_dir_of(runs: Path, readme_path: str) -> Path:
    """The run this tour just made for the README's runs/<method>-<stamp>."""
    method = Path(readme_path).name.rsplit("-", 2)[0]
    (run_dir,) = runs.glob(f"{method}-*")
    return run_dir


def point_at_run(argv: list[str], option: str, runs: Path) -> None:
    """The README's runs/<method>-<stamp> after ``option`` becomes the run this tour made."""
    if option in argv:
        at = argv.index(option) + 1
        argv[at] = str(run_dir_of(runs, argv[at]))


def test_readme_rl_tour(runs, capsys):
    commands = tour_commands("value_iteration")
    assert len(commands) >= 4
    for argv in commands:
        if argv[0] == "train":
            assert main([*argv, "--out", str(runs), "--no-progress"]) == 0, argv
        else:
            capsys.readouterr()
            assert main([argv[0], str(run_dir_of(runs, argv[1])), *argv[2:]]) == 0, argv
            assert json.loads(capsys.readouterr().out)["policy_optimal"]


def test_readme_diffusion_tour(runs, capsys):
    """The diffusion tour with tiny budgets: every command parses and runs."""
    commands = tour_commands("mlatlas train edm")
    assert len(commands) == 4
    for argv in commands:
        if argv[0] == "train":
            argv = [*argv, "--steps", "2", "--batch-size", "16", "--channels", "8",
                    "--eval-samples", "10", "--out", str(runs), "--no-progress"]
        else:
            argv = [argv[0], str(run_dir_of(runs, argv[1])), *argv[2:], "--n", "4", "--no-progress"]
        assert main(argv) == 0, argv


def test_readme_likelihood_tour(runs, capsys):
    """The likelihood tour with tiny budgets: every command parses and runs, and eval prints
    the held-out NLL beside the baseline."""
    commands = tour_commands("mlatlas train nade")
    assert [a[1] for a in commands if a[0] == "train"] == ["nade", "made", "ngram"]
    for argv in commands:
        if argv[0] == "train":
            # The n-gram model counts the whole corpus in about 4 s of CPU.
            tiny = [] if argv[1] == "ngram" else ["--steps", "2", "--eval-samples", "4"]
            argv = [*argv, *tiny, "--out", str(runs), "--no-progress"]
        else:
            argv = [argv[0], str(run_dir_of(runs, argv[1])), *argv[2:], "--no-progress"]
        capsys.readouterr()
        assert main(argv) == 0, argv
        if argv[0] == "eval":
            metrics = json.loads(capsys.readouterr().out)
            assert metrics["test_bits_per_dim"] > 0 and metrics["baseline_nll_nats"] > 0


def test_readme_adversarial_and_vq_tour(runs, capsys):
    """The GAN / VQ tour with tiny budgets; the prior's --vq-run is the tour's own vqvae run."""
    commands = tour_commands("mlatlas train wgan_gp")
    assert [a[1] for a in commands if a[0] == "train"] == ["wgan_gp", "gan", "vqvae",
                                                            "vq_transformer"]
    tiny = {"wgan_gp": ["--steps", "2", "--batch-size", "16", "--hidden", "8",
                        "--eval-samples", "10"],
            "gan": ["--steps", "2", "--batch-size", "16", "--width", "4", "--eval-samples", "10"],
            "vqvae": ["--steps", "2", "--batch-size", "16", "--width", "8",
                      "--eval-samples", "8"],
            "vq_transformer": ["--steps", "2", "--batch-size", "16", "--width", "16",
                               "--eval-samples", "8"]}
    for argv in commands:
        if argv[0] == "train":
            point_at_run(argv, "--vq-run", runs)
            argv = [*argv, *tiny[argv[1]], "--out", str(runs), "--no-progress"]
        else:
            argv = [argv[0], str(run_dir_of(runs, argv[1])), *argv[2:], "--no-progress"]
        assert main(argv) == 0, argv


def test_readme_latent_diffusion_tour(runs, tmp_path):
    """The latent diffusion / ControlNet tour with tiny budgets; --base-run is the tour's own
    latent_diffusion run and the control image a held-out shapes image written as a PNG."""
    import numpy as np
    from PIL import Image

    from mlatlas.data import load_dataset

    commands = tour_commands("mlatlas train latent_diffusion")
    assert [a[1] for a in commands if a[0] == "train"] == ["latent_diffusion", "controlnet"]
    tiny = {"latent_diffusion": ["--steps", "2", "--ae-steps", "2", "--ae-width", "4",
                                 "--channels", "8", "--text-width", "16", "--batch-size", "16",
                                 "--eval-samples", "0"],
            "controlnet": ["--steps", "2", "--batch-size", "16", "--eval-samples", "0"]}
    image = load_dataset("shapes").x_test[0].permute(1, 2, 0).numpy()
    control = tmp_path / "shape.png"
    Image.fromarray((image * 255).astype(np.uint8)).save(control)
    for argv in commands:
        if argv[0] == "train":
            point_at_run(argv, "--base-run", runs)
            argv = [*argv, *tiny[argv[1]], "--out", str(runs), "--no-progress"]
        else:
            argv = [argv[0], str(run_dir_of(runs, argv[1])), *argv[2:], "--steps", "2",
                    "--n", "4", "--no-progress"]
            if "--control" in argv:
                argv[argv.index("--control") + 1] = str(control)
        assert main(argv) == 0, argv


def test_readme_deep_rl_tour(runs, capsys):
    """The deep RL tour with tiny budgets: every command parses and runs."""
    commands = tour_commands("mlatlas train ppo")
    assert len(commands) == 4
    for argv in commands:
        if argv[0] == "train":
            argv = [*argv, "--steps", "600", "--eval-episodes", "1", "--out", str(runs),
                    "--no-progress"]
        else:
            argv = [argv[0], str(run_dir_of(runs, argv[1])), *argv[2:], "--no-progress"]
            if "--n" in argv:
                argv[argv.index("--n") + 1] = "2"
        assert main(argv) == 0, argv
    assert next(runs.glob("ppo-*/episode-seed0.gif")).is_file()


# Tiny budgets for the representation-learning tour (the widths must agree for --image-run).
TINY_CONTRASTIVE = {
    "clip": ["--width", "16", "--embed-dim", "8", "--n-train", "64", "--batch-size", "16"],
    "siglip": ["--width", "16", "--embed-dim", "8", "--n-train", "64", "--batch-size", "16"],
    "lit": ["--width", "16", "--embed-dim", "8", "--n-train", "64", "--batch-size", "16"],
    # Two steps teach the filter nothing: a tiny threshold keeps every caption.
    "blip": ["--width", "16", "--embed-dim", "8", "--n-train", "64", "--batch-size", "16",
             "--filter-threshold", "1e-6"],
    "simclr": ["--width", "16", "--batch-size", "16"],
    "cpc": ["--n-train", "64", "--n-test", "64", "--batch-size", "16"],
}


def test_readme_contrastive_tour(runs):
    """The representation-learning tour with tiny budgets: every command parses and runs, and
    LiT locks the tower of the CLIP run made just before."""
    commands = tour_commands("mlatlas train siglip")
    assert [a[1] for a in commands if a[0] == "train"] == list(TINY_CONTRASTIVE)
    for argv in commands:
        if argv[0] == "train":
            if "--image-run" in argv:
                at = argv.index("--image-run") + 1
                argv[at] = str(run_dir_of(runs, argv[at]))
            argv = [*argv, "--steps", "2", *TINY_CONTRASTIVE[argv[1]], "--out", str(runs),
                    "--no-progress"]
        else:
            argv = [argv[0], str(run_dir_of(runs, argv[1])), *argv[2:], "--no-progress"]
        assert main(argv) == 0, argv


TINY_LM = ["--dim", "32", "--n-layers", "1", "--n-heads", "2", "--n-kv-heads", "2",
           "--hidden-dim", "64"]


def test_readme_llm_tour(runs, capsys):
    """The language-model tour with tiny budgets: every command parses and runs, each method
    starting from the SFT run made first."""
    commands = tour_commands("mlatlas train grpo")
    assert [a[1] for a in commands if a[0] == "train"][0] == "sft"
    for argv in commands:
        for flag in ("--init-from", "--reward-model"):
            if flag in argv:
                at = argv.index(flag) + 1
                argv[at] = str(run_dir_of(runs, argv[at]))
        if argv[0] == "train":
            tiny = [*TINY_LM] if argv[1] == "sft" else []
            argv = [*argv, "--steps", "2", "--eval-n", "8", "--log-every", "1", "--eval-every",
                    "1", *tiny, "--out", str(runs), "--no-progress"]
        else:
            # Two GRPO runs were made (GRPO and Dr. GRPO): score the first.
            method = Path(argv[1]).name.rsplit("-", 2)[0]
            first = sorted(runs.glob(f"{method}-*"))[0]
            argv = [argv[0], str(first), "--n", "8", "--no-progress"]
        assert main(argv) == 0, argv


def test_readme_distributed_command(runs):
    """The README's --nproc line, with a tiny budget, runs at two processes."""
    from parallel import train

    (argv,) = [c for c in tour_commands("--nproc 2") if "--nproc" in c]
    proc = train(runs, argv[1], *argv[2:argv.index("--nproc")], "--steps", "4",
                 "--eval-samples", "0", nproc=2)
    assert "run: " in proc.stdout


def test_readme_detection_tour(runs, capsys):
    """The detection tour with tiny budgets: every command parses and runs."""
    commands = tour_commands("mlatlas train faster_rcnn")
    assert len(commands) == 5
    tiny = ["--steps", "2", "--batch-size", "4", "--width", "8", "--log-every", "1",
            "--ckpt-every", "2", "--out", str(runs), "--no-progress"]
    for argv in commands:
        if argv[:2] == ["train", "spp_net"]:
            argv = [*argv, "--dataset", "digits", "--train-sizes", "8,12", "--test-sizes", "16",
                    "--levels", "1,2", *tiny]
        elif argv[0] == "train":
            argv = [*argv, "--train-images", "8", "--eval-images", "4", *tiny]
        else:
            argv = [argv[0], str(run_dir_of(runs, argv[1])), *argv[2:], "--n", "4",
                    "--no-progress"]
        assert main(argv) == 0, argv


def test_readme_formats_tour(runs, tmp_path, monkeypatch, capsys):
    """The data-formats tour in a fresh folder: shards from a .npy, checked, shown, trained on,
    and the CircularEval line with a generated TSV and a model module."""
    import numpy as np
    from sklearn.datasets import load_digits

    from mlatlas.eval.circular import Question, write_tsv

    monkeypatch.chdir(tmp_path)
    np.save("digits.npy", (load_digits().images[:40] / 16).astype(np.float32))
    write_tsv("mmbench.tsv", [Question(index=i, g_index=i, question=f"Which is {i}?", hint="",
                                       options=(str(i), str(i + 1)), answer="A")
                              for i in range(5)])
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "vlm.py").write_text(
        "def answer(image, question, options):\n"
        "    return next(k for k, v in options.items() if question.endswith(v + '?'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = tour_commands("mlatlas records write")
    assert [argv[0] for argv in commands] == ["records"] * 3 + ["train", "mmbench"]
    for argv in commands:
        if argv[0] == "train":
            argv = [*argv, "--steps", "2", "--batch-size", "8", "--channels", "8", "--eval-samples",
                    "10", "--out", str(runs), "--no-progress"]
        elif argv[0] == "mmbench":
            argv = [*argv, "--no-progress"]
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    assert '"x"' in out and "records" in out
    overall = next(line for line in out.splitlines() if line.startswith("overall"))
    assert overall.split()[2:4] == ["1.0000", "1.0000"]  # the oracle, circular and vanilla


def test_readme_vlm_tour(tmp_path, monkeypatch, capsys):
    """The vision-language tour with a tiny model: each stage starts from the one before, and
    eval and sample run on the last."""
    from mlatlas.data.vqa import save_image, vqa_set

    commands = tour_commands("mlatlas train vlm --stage vision")
    assert len(commands) == 5
    monkeypatch.chdir(tmp_path)
    save_image(vqa_set(6, split="test").images[0], tmp_path / "img.png")
    tiny = ["--steps", "2", "--batch-size", "4", "--n-train", "32", "--eval-n", "6",
            "--eval-every", "2", "--log-every", "1", "--ckpt-every", "2", "--vit-width", "16",
            "--vit-depth", "1", "--dim", "16", "--n-layers", "2", "--n-heads", "2",
            "--n-experts", "4", "--expert-dim", "8", "--prompts-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "3", "--out", str(tmp_path / "runs"),
            "--no-progress"]
    made: list[Path] = []
    for argv in commands:
        if argv[0] == "train":
            if "--init-from" in argv:
                argv[argv.index("--init-from") + 1] = str(made[-1])
            assert main([*argv, *tiny]) == 0, argv  # the later --steps 2 wins
            made.append(max((tmp_path / "runs").glob("vlm-*"), key=lambda p: p.stat().st_mtime))
        else:
            argv = [argv[0], str(made[-1]), *argv[2:], "--no-progress"]
            if argv[0] == "eval":
                argv += ["--n", "6"]
            assert main(argv) == 0, argv
    assert [Run.open(r).load_config().stage for r in made] == ["vision", "sft", "rl"]
