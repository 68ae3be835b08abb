"""VQGAN's hinge losses and adaptive weight against taming-transformers (Esser et al.'s code),
on the same tensors.

    git clone https://github.com/CompVis/taming-transformers /tmp/taming    # or a mirror
    python benchmarks/vqgan_losses_vs_taming.py --taming-dir /tmp/taming

Nothing of taming-transformers is imported as a package (its losses module pulls in LPIPS and
torchvision): the script reads ``taming/modules/losses/vqperceptual.py``, compiles only the two
functions and the method it compares (``hinge_d_loss``, ``calculate_adaptive_weight``), and
feeds them and mlatlas's ``hinge_discriminator_loss`` / ``adaptive_weight`` the same logits and
the same two-layer decoder. Prints each pair and their ratio. taming's discriminator loss is
half the paper's sum, 0.5 (E relu(1 - D(x)) + E relu(1 + D(x_hat))); mlatlas keeps the paper's
sum (the 1/2 is a constant factor on the discriminator's gradient, i.e. on its learning rate).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.generative.vq.vqgan import adaptive_weight, hinge_discriminator_loss


def taming_functions(root: Path) -> dict:
    path = root / "taming" / "modules" / "losses" / "vqperceptual.py"
    tree = ast.parse(path.read_text())
    wanted = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "hinge_d_loss":
            wanted.append(node)
        if isinstance(node, ast.ClassDef) and node.name == "VQLPIPSWithDiscriminator":
            wanted += [n for n in node.body if isinstance(n, ast.FunctionDef)
                       and n.name == "calculate_adaptive_weight"]
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taming-dir", required=True, type=Path,
                        help="a checkout (or git archive) of CompVis/taming-transformers")
    args = parser.parse_args()
    ref = taming_functions(args.taming_dir)
    gen = torch.Generator().manual_seed(0)
    logits_real, logits_fake = torch.randn(8, 1, 3, 3, generator=gen), torch.randn(
        8, 1, 3, 3, generator=gen)
    ours, theirs = hinge_discriminator_loss(logits_real, logits_fake), ref["hinge_d_loss"](
        logits_real, logits_fake)
    print(f"hinge discriminator loss: mlatlas {float(ours):.6f}, taming {float(theirs):.6f}, "
          f"ratio {float(ours / theirs):.6f} (expected 2: taming halves the sum)")

    decoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
    z, x = torch.randn(5, 4, generator=gen), torch.randn(5, 6, generator=gen)
    x_hat = decoder(z)
    rec_loss = (x - x_hat).abs().mean()
    g_loss = -torch.sigmoid(x_hat).sum(1).mean()
    last = decoder[2].weight

    class Holder:  # the `self` of taming's method: the discriminator weight factor
        discriminator_weight = 1.0

    ours = adaptive_weight(rec_loss, g_loss, last)
    theirs = ref["calculate_adaptive_weight"](Holder(), rec_loss, g_loss, last_layer=last)
    print(f"adaptive weight: mlatlas {float(ours):.6f}, taming {float(theirs):.6f}, "
          f"|difference| {abs(float(ours - theirs)):.2e}")


if __name__ == "__main__":
    main()
