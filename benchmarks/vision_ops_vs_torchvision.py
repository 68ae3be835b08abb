"""Time mlatlas.vision's detection operators against torchvision.ops on detection-sized inputs.

For each operator the script builds one set of inputs (float32, on --device), checks that ours and
torchvision's agree on them (largest absolute difference of the output and of the gradients),
then times, ours and torchvision's in turn so that the load of a shared machine falls on both:

- forward only, under ``torch.no_grad()``;
- forward + backward: the gradient of a fixed random projection ``(out * P).sum()`` of the
  output with respect to the input (for deform_conv2d also the offset, mask and weight; for
  box_iou both box sets). NMS returns indices and is timed forward only.

Inputs (``--quick`` shrinks them for a smoke run):

- roi_pool, roi_align (7x7; sampling_ratio 2 and -1, aligned=True): a (2, 256, 50, 50) feature
  map and 512 RoIs with sides of 8..400 px on an 800 px image, spatial_scale 1/16;
- ps_roi_pool, ps_roi_align (7x7, sampling_ratio 2): (2, 21*49, 50, 50), R-FCN's 21 classes,
  300 RoIs of the same sizes kept inside the first 776 px (off the map's last row and column,
  where torchvision's PS-RoI pooling forward disagrees with its own backward);
- deform_conv2d: (2, 256, 50, 50), a 3x3 kernel 256 -> 256, padding 1, offsets of a few pixels;
  v1 and v2 (with a mask);
- nms (IoU threshold 0.7) on 2,000 and 6,000 boxes; box_iou 2000 x 2000.

Run it in the heavy-peers environment (torchvision is installed only there), pinning the
OpenMP / MKL pools to the thread count given to torch:

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv-openclip/bin/python \\
        benchmarks/vision_ops_vs_torchvision.py --threads 1 [--repeats 5] [--ops roi_align nms]
    OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 .venv-openclip/bin/python \\
        benchmarks/vision_ops_vs_torchvision.py --threads 2
    .venv-openclip/bin/python benchmarks/vision_ops_vs_torchvision.py --quick   # smoke run
    python benchmarks/vision_ops_vs_torchvision.py --device cuda   # torchvision's CUDA kernels

``--profile`` also prints, for each selected case, torch.profiler's table of the aten ops of one
forward + backward call of ours.

Prints the median over --repeats (after one warm-up call each) in milliseconds and the ratio
ours / torchvision (below 1: ours is faster). The goal stated by the issue is "within 1.5x of
torchvision's time for every operator"; the last columns say whether each row meets it, forward
only and forward + backward.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torchvision.ops as tv

from mlatlas.vision import boxes, deform, pooling

GOAL = 1.5
OPS = ("roi_pool", "roi_align", "ps_roi_pool", "ps_roi_align", "deform_conv2d", "nms",
       "box_iou")


@dataclass
class Case:
    op: str
    label: str
    shape: str
    ours: Callable
    theirs: Callable
    inputs: tuple
    wrt: tuple = field(default_factory=tuple)   # tensors the backward differentiates; () = none


def random_rois(k: int, batch: int, image: float, low: float, high: float,
                g: torch.Generator) -> torch.Tensor:
    """(k, 5) RoIs (batch_index, x1, y1, x2, y2) with sides uniform in [low, high] px, inside an
    image x image picture."""
    sides = low + torch.rand(k, 2, generator=g) * (high - low)
    corner = torch.rand(k, 2, generator=g) * (image - sides)
    index = torch.randint(batch, (k, 1), generator=g).float()
    return torch.cat([index, corner, corner + sides], 1)


def random_boxes(n: int, image: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n proposal-like boxes: jittered copies around n / 20 objects, so that they overlap in
    clusters as a detector's raw boxes do; and their scores."""
    objects = max(n // 20, 1)
    centre = torch.rand(objects, 2, generator=g) * image
    size = 16 + torch.rand(objects, 2, generator=g) * (image / 3)
    which = torch.randint(objects, (n,), generator=g)
    c = (centre[which] + torch.randn(n, 2, generator=g) * size[which] * 0.15).clamp(0, image)
    s = size[which] * torch.exp(torch.randn(n, 2, generator=g) * 0.2)
    # Not clipped to the image: every box keeps a positive area (torchvision's box_iou is 0/0
    # = NaN for two empty boxes, ours 0).
    return torch.cat([c - s / 2, c + s / 2], 1), torch.rand(n, generator=g)


def cases(quick: bool, selected: set[str], device: torch.device) -> list[Case]:
    """The inputs are drawn on the CPU (the same numbers on every device), then moved."""
    g = torch.Generator()
    batch, image, scale = 2, 800.0, 1 / 16
    side = 50
    c, k_roi, k_ps, classes = (16, 64, 32, 3) if quick else (256, 512, 300, 21)
    deform_c = 16 if quick else 256
    nms_sizes = (200, 600) if quick else (2000, 6000)
    iou_n = 200 if quick else 2000
    out = []

    def leaf(*shape, scale_by=1.0):
        return (torch.randn(*shape, generator=g) * scale_by).to(device).requires_grad_()

    if selected & {"roi_pool", "roi_align"}:
        g.manual_seed(1)  # the same inputs whatever --ops selects
        x = leaf(batch, c, side, side)
        rois = random_rois(k_roi, batch, image, 8, 400, g).to(device)
        shape = f"{tuple(x.shape)} {k_roi} RoIs -> 7x7"
        if "roi_pool" in selected:
            out.append(Case("roi_pool", "roi_pool", shape,
                            lambda a, r: pooling.roi_pool(a, r, 7, scale),
                            lambda a, r: tv.roi_pool(a, r, 7, scale), (x, rois), (x,)))
        if "roi_align" in selected:
            for ratio in (2, -1):
                out.append(Case(
                    "roi_align", f"roi_align s={ratio}", shape,
                    lambda a, r, s=ratio: pooling.roi_align(a, r, 7, scale, s, True),
                    lambda a, r, s=ratio: tv.roi_align(a, r, 7, scale, s, True),
                    (x, rois), (x,)))
    if selected & {"ps_roi_pool", "ps_roi_align"}:
        g.manual_seed(2)
        x = leaf(batch, classes * 49, side, side)
        # Inside the first 776 px: a bin ending in the map's last row or column is where
        # torchvision's PS-RoI pooling forward (clamped to H - 1) disagrees with its own
        # backward and with ours (see tests/test_parity_torchvision.py).
        rois = random_rois(k_ps, batch, image - 24, 8, 400, g).to(device)
        shape = f"{tuple(x.shape)} {k_ps} RoIs -> 7x7"
        if "ps_roi_pool" in selected:
            out.append(Case("ps_roi_pool", "ps_roi_pool", shape,
                            lambda a, r: pooling.ps_roi_pool(a, r, 7, scale),
                            lambda a, r: tv.ps_roi_pool(a, r, 7, scale), (x, rois), (x,)))
        if "ps_roi_align" in selected:
            out.append(Case("ps_roi_align", "ps_roi_align s=2", shape,
                            lambda a, r: pooling.ps_roi_align(a, r, 7, scale, 2),
                            lambda a, r: tv.ps_roi_align(a, r, 7, scale, 2), (x, rois), (x,)))
    if "deform_conv2d" in selected:
        g.manual_seed(3)
        x = leaf(batch, deform_c, side, side)
        weight = leaf(deform_c, deform_c, 3, 3, scale_by=(deform_c * 9) ** -0.5)
        bias = torch.randn(deform_c, generator=g).to(device)
        offset = leaf(batch, 2 * 9, side, side, scale_by=2.0)
        mask = torch.rand(batch, 9, side, side, generator=g).to(device).requires_grad_()
        shape = f"{tuple(x.shape)} 3x3 {deform_c}->{deform_c}"

        def ours(a, o, w, m=None):
            return deform.deform_conv2d(a, o, w, bias, padding=1, mask=m)

        def theirs(a, o, w, m=None):
            return tv.deform_conv2d(a, o, w, bias, padding=1, mask=m)

        out.append(Case("deform_conv2d", "deform_conv2d v1", shape, ours, theirs,
                        (x, offset, weight), (x, offset, weight)))
        out.append(Case("deform_conv2d", "deform_conv2d v2", shape, ours, theirs,
                        (x, offset, weight, mask), (x, offset, weight, mask)))
    if "nms" in selected:
        g.manual_seed(4)
        for n in nms_sizes:
            b, s = (t.to(device) for t in random_boxes(n, image, g))
            out.append(Case("nms", f"nms {n}", f"{n} boxes, IoU > 0.7",
                            lambda b_, s_: boxes.nms(b_, s_, 0.7),
                            lambda b_, s_: tv.nms(b_, s_, 0.7), (b, s)))
    if "box_iou" in selected:
        g.manual_seed(5)
        a, _ = random_boxes(iou_n, image, g)
        b, _ = random_boxes(iou_n, image, g)
        a, b = a.to(device).requires_grad_(), b.to(device).requires_grad_()
        out.append(Case("box_iou", "box_iou", f"{iou_n} x {iou_n}", boxes.box_iou, tv.box_iou,
                        (a, b), (a, b)))
    return out


def projection(case: Case) -> torch.Tensor | None:
    if not case.wrt:
        return None
    with torch.no_grad():
        shape = case.theirs(*case.inputs).shape
    weights = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return weights.to(case.inputs[0].device)


def differences(case: Case, weights: torch.Tensor | None) -> tuple[str, str]:
    """Largest |ours - theirs| of the output and of any gradient (NMS: whether the kept indices
    are the same)."""
    out_ours, out_theirs = case.ours(*case.inputs), case.theirs(*case.inputs)
    if out_ours.dtype == torch.long:
        same = torch.equal(out_ours, out_theirs)
        return ("same" if same else f"DIFFER ({len(out_ours)} vs {len(out_theirs)})"), "-"
    out_diff = (out_ours - out_theirs).abs().max().item()
    if weights is None:
        return f"{out_diff:.1e}", "-"
    grads_ours = torch.autograd.grad((out_ours * weights).sum(), case.wrt)
    grads_theirs = torch.autograd.grad((out_theirs * weights).sum(), case.wrt)
    grad_diff = max((a - b).abs().max().item()
                    for a, b in zip(grads_ours, grads_theirs, strict=True))
    return f"{out_diff:.1e}", f"{grad_diff:.1e}"


def forward(fn: Callable, case: Case, weights) -> None:
    with torch.no_grad():
        fn(*case.inputs)


def forward_backward(fn: Callable, case: Case, weights) -> None:
    torch.autograd.grad((fn(*case.inputs) * weights).sum(), case.wrt)


def synchronize(device: torch.device) -> None:
    """Wait for the queued kernels, so that a CUDA timing covers the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def medians_ms(step: Callable, case: Case, weights, repeats: int) -> tuple[float, float]:
    """Median ms of ``step`` for ours and theirs, one warm-up call each, then taken in turns
    (the order swapped every round)."""
    device = case.inputs[0].device
    fns = (case.ours, case.theirs)
    for fn in fns:
        step(fn, case, weights)
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            synchronize(device)
            start = time.perf_counter()
            step(fns[i], case, weights)
            synchronize(device)
            times[i].append(1000 * (time.perf_counter() - start))
    return statistics.median(times[0]), statistics.median(times[1])


def verdict(ratio: float) -> str:
    return "yes" if ratio <= GOAL else "NO"


def profile(case: Case, weights, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = forward_backward if weights is not None else forward
    step(case.ours, case, weights)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step(case.ours, case, weights)
    what = "forward + backward" if weights is not None else "forward"
    print(f"\n--- profile of ours: {case.label} ({what}) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's table of one call of ours per case")
    parser.add_argument("--profile-rows", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} thread(s)")
    print(f"torch {torch.__version__}, torchvision {importlib.metadata.version('torchvision')}, "
          f"{where}, float32; median of {args.repeats} calls "
          f"after a warm-up, ours and torchvision's in turn; fwd = forward under no_grad, "
          f"f+b = forward + backward; goal: ours/tv <= {GOAL}")
    header = (f"{'op':<18} {'shape':<36} {'|d out|':>8} {'|d grad|':>8} | "
              f"{'fwd ours':>9} {'fwd tv':>8} {'ratio':>6} {'goal':>4} | "
              f"{'f+b ours':>9} {'f+b tv':>8} {'ratio':>6} {'goal':>4}")
    print(header)
    print("-" * len(header))
    selected = cases(args.quick, set(args.ops), device)
    misses = []
    for case in selected:
        weights = projection(case)
        d_out, d_grad = differences(case, weights)
        fwd_ours, fwd_tv = medians_ms(forward, case, weights, args.repeats)
        fwd_ratio = fwd_ours / fwd_tv
        row = (f"{case.label:<18} {case.shape:<36} {d_out:>8} {d_grad:>8} | "
               f"{fwd_ours:9.2f} {fwd_tv:8.2f} {fwd_ratio:6.2f} {verdict(fwd_ratio):>4} | ")
        if fwd_ratio > GOAL:
            misses.append(f"{case.label} fwd {fwd_ratio:.2f}x")
        if weights is None:
            row += f"{'-':>9} {'-':>8} {'-':>6} {'-':>4}"
        else:
            fb_ours, fb_tv = medians_ms(forward_backward, case, weights, args.repeats)
            fb_ratio = fb_ours / fb_tv
            row += f"{fb_ours:9.2f} {fb_tv:8.2f} {fb_ratio:6.2f} {verdict(fb_ratio):>4}"
            if fb_ratio > GOAL:
                misses.append(f"{case.label} f+b {fb_ratio:.2f}x")
        print(row, flush=True)
    if misses:
        print(f"\nGoal (within {GOAL}x of torchvision for every operator) NOT met: "
              + ", ".join(misses))
    else:
        print(f"\nGoal (within {GOAL}x of torchvision for every operator) met by every row.")
    if args.profile:
        for case in selected:
            profile(case, projection(case), args.profile_rows)


if __name__ == "__main__":
    main()
