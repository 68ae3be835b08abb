"""The ``mlatlas`` command line.

    mlatlas list                               methods and datasets
    mlatlas train METHOD [--flag VALUE ...]    flags come from the method's Config dataclass
    mlatlas train --resume RUN_DIR [--steps N] continue a run where it stopped
    mlatlas sample RUN_DIR [--n N] [--sampler heun --steps 18 --guidance 3 --label 7]
                                               draw samples, write a figure and a .npy
    mlatlas eval RUN_DIR [--n N] [--seed S]    evaluate: N samples, episodes, problems or
                                               held-out examples (default: the run's own)
    mlatlas eval RUN_DIR --n 20 --video        score an RL policy, record an episode
    mlatlas demo                               DDPM on the 8x8 digits, end to end
    mlatlas classifier DATASET ...             retrain the shipped feature networks
    mlatlas records show FILE [--limit N] [--skip-corrupt]
                                               print each tf.train.Example as a JSON line
    mlatlas records verify FILE...             check every CRC; exit 1 if any record is corrupt
    mlatlas records write SRC OUT --shards K [--compression gzip]
                                               a .npy file, image folder or JSONL file as
                                               TFRecord shards in the folder OUT
    mlatlas mmbench TSV --model MODULE:CALLABLE [--results OUT.tsv]
                                               MMBench's CircularEval of any
                                               model(image, question, options) -> str

Bad input (an unknown method, dataset or flag, a bad value) ends with one line naming the problem
and the closest valid names, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from mlatlas.core.config import (
    INT64_MAX,
    ConfigError,
    add_config_arguments,
    closest,
    config_from_dict,
    config_to_dict,
    flag,
    require_range,
)
from mlatlas.launch import EXIT_PEER_LOST, LAUNCHED_BY_NPROC

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
# The most samples, episodes or problems one sample or eval command draws.
MAX_ITEMS = 10**9
MAX_NPROC = 1024
COMMANDS = ("list", "train", "sample", "eval", "demo", "classifier", "records", "mmbench")


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and suggests the closest flag; no abbreviated
    flags, so a flag one method lacks is never read as a prefix of another."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def parse(self, argv: list[str]) -> argparse.Namespace:
        args, extra = self.parse_known_args(argv)
        if extra:
            flags = [o for a in self._actions for o in a.option_strings]
            name = extra[0].split("=", 1)[0]
            hint = closest(name, flags) if name.startswith("-") else ""
            raise UsageError(f"unrecognised argument {extra[0]!r}{hint}")
        return args


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: $MLATLAS_THREADS or 1; "
                             "0 uses every core)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: when the terminal is interactive)")


def cmd_list(argv: list[str]) -> int:
    Parser(prog="mlatlas list", description="List methods and datasets.").parse(argv)
    from mlatlas.data import DATASETS
    from mlatlas.registry import METHODS

    rows = [(m.name, m.family, m.default_data, m.summary) for m in METHODS.values()]
    header = ("method", "family", "default data", "summary")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[3])
    print(f"\ndatasets: {', '.join(DATASETS)}, or a path to an image folder, a .npy file or "
          "TFRecord files")
    return 0


def cmd_train(argv: list[str]) -> int:
    from mlatlas.core.run import Run
    from mlatlas.registry import METHODS, get_method

    method_name = argv[0] if argv and not argv[0].startswith("-") else None
    rest = argv[1:] if method_name else argv
    resume = None
    if method_name is None:
        probe = Parser(prog="mlatlas train", add_help=False)
        probe.add_argument("--resume", type=Path)
        probe.add_argument("-h", "--help", action="store_true")
        known, _ = probe.parse_known_args(rest)
        if known.resume is None:
            if known.help:
                print("usage: mlatlas train METHOD [flags] | mlatlas train --resume RUN_DIR\n"
                      f"methods: {', '.join(METHODS)}; `mlatlas train METHOD --help` lists its "
                      "flags")
                return 0
            raise UsageError("train needs a METHOD or --resume RUN_DIR "
                             f"(methods: {', '.join(METHODS)})")
        resume = Run.open(known.resume)
        method_name = resume.method
    method = get_method(method_name)
    cls = method.config_cls
    parser = Parser(prog=f"mlatlas train {method.name}", description=method.summary)
    add_config_arguments(parser, cls, suppress_defaults=True)
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="folder in which the run folder is made (default: runs)")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="train data-parallel in N processes on this machine (the global "
                             "batch is split over them; across machines use torchrun)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the flags and the data, print the config as JSON and stop "
                             "(no run folder is made)")
    _common(parser)
    args = parser.parse(rest)
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("resume", "out", "threads", "progress", "nproc", "dry_run")}
    if args.resume is not None and resume is None:
        resume = Run.open(args.resume)
        if resume.method != method.name:
            raise UsageError(f"{args.resume} is a {resume.method} run, not {method.name}")
    world = _check_parallel(method, args.nproc)
    _set_threads(args.threads)
    if resume is not None:
        changed = {k for k, v in overrides.items() if resume.config.get(k) != v}
        if changed - cls.RESUMABLE:
            name = sorted(changed - cls.RESUMABLE)[0]
            raise UsageError(f"--{flag(name)} cannot change when resuming (the run "
                             f"used {resume.config[name]!r}); only "
                             f"{', '.join(sorted(cls.RESUMABLE))} can")
        resume.load_config(cls)  # a damaged config.json is named as such, not as a flag
        cfg = config_from_dict(cls, {**resume.config, **overrides})
        done = resume.checkpoint_step()
        if done is not None:
            resume.verify_checkpoint()  # before any process starts on a damaged file
        if done is not None and cfg.steps < done:
            raise UsageError(f"--steps {cfg.steps} is below the step {done} that "
                             f"{resume.dir} has reached")
        if args.dry_run:
            print(json.dumps(config_to_dict(cfg), indent=2, sort_keys=True))
            return 0
        _join_job(cfg, world)
        resume.config = config_to_dict(cfg)
        resume.write_config()
        run = resume
    else:
        cfg = cls.create(**overrides)
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} is a file; it must be a folder (made if absent)")
        # Check the device and data before a run folder is made, so a typo leaves nothing.
        if args.dry_run:
            cfg.check_data()
            print(json.dumps(config_to_dict(cfg), indent=2, sort_keys=True))
            return 0
        _join_job(cfg, world)
        cfg.check_data()
        run = Run.create(method.name, cfg, root=args.out)
    from mlatlas.core import distributed

    # Under --nproc the launching process prints the folder and the report, not the ranks.
    speaks = distributed.is_main() and not os.environ.get(LAUNCHED_BY_NPROC)
    if speaks:
        print(f"run folder: {run.dir}", file=sys.stderr)
    if world > 1 and not distributed.launched():
        from mlatlas.launch import launch_train

        flags = [f"--threads={args.threads}"] if args.threads is not None else []
        if args.progress is not None:
            flags.append("--progress" if args.progress else "--no-progress")
        code = launch_train(run.dir, world, flags)
        if code == EXIT_USAGE and resume is None and not run.has_checkpoint():
            shutil.rmtree(run.dir)
        if code == 0:
            _report(Run.open(run.dir))
        return code
    try:
        method.train_fn(cfg, run, progress=args.progress)
    except BaseException:
        # A problem found once the method looks at its data or environment (e.g. DDPG given
        # discrete actions), a failure or a Ctrl-C during start-up: a new run that never
        # reached its first checkpoint leaves nothing behind.
        if resume is None and not run.has_checkpoint() and distributed.is_main():
            shutil.rmtree(run.dir, ignore_errors=True)
        raise
    if speaks:
        _report(run)
    return 0


def _check_parallel(method, nproc: int | None) -> int:
    """The world size a train command asks for (``--nproc``, or the job torchrun started), after
    refusing what cannot run data-parallel."""
    from mlatlas.core import distributed
    from mlatlas.core.config import BatchConfig
    from mlatlas.registry import METHODS

    if nproc is not None and not 1 <= nproc <= MAX_NPROC:
        raise UsageError(f"--nproc must be in 1..{MAX_NPROC}, got {nproc}")
    if nproc is not None and distributed.launched():
        raise UsageError("--nproc starts its own processes; under torchrun leave it out "
                         "(torchrun's --nproc-per-node sets them)")
    world = nproc or int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not issubclass(method.config_cls, BatchConfig):
        batch = [m.name for m in METHODS.values() if issubclass(m.config_cls, BatchConfig)]
        hint = ("; its environments step in parallel with --num-envs and --vector async"
                if method.family == "rl/deep" else "")
        raise UsageError(f"{method.name} runs in one process (only the mini-batch trainers "
                         f"run data-parallel: {', '.join(batch)}){hint}")
    return world


def _join_job(cfg, world: int) -> None:
    """Check the device and that every global batch splits over ``world`` ranks; inside a
    torchrun job, join its process group."""
    from mlatlas.core import distributed
    from mlatlas.core.config import BatchConfig
    from mlatlas.core.precision import check_compile, check_precision
    from mlatlas.core.runtime import resolve_device

    device = resolve_device(cfg.device)
    if isinstance(cfg, BatchConfig):
        check_precision(cfg.precision, device)
        if cfg.compile:
            check_compile(device)
        for name in cfg.SHARDED:
            distributed.check_divisible(getattr(cfg, name), name, world)
    if distributed.launched():
        distributed.setup(device)


def _report(run) -> None:
    files = sorted(p.name for p in run.dir.iterdir()
                   if p.suffix in (".png", ".csv") or p.name == "summary.json")
    print(f"run: {run.dir}")
    for name in files:
        print(f"  {name:14s} {run.path(name)}")
    summary = run.summary()
    if summary:
        print(json.dumps(summary, indent=2, sort_keys=True))


def parse_run_flags(argv: list[str], prog: str, n_default: int | None,
                    options_cls=None) -> argparse.Namespace:
    """The flags of ``mlatlas sample|eval RUN_DIR``, with the options (``options_cls``, a
    method's ``sample_config_cls``) of the run's method; checked, not yet acted on."""
    parser = Parser(prog=prog)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    # One meaning for every family: how many items to draw or score (samples, episodes,
    # problems, held-out examples).
    parser.add_argument("--n", type=int, default=n_default,
                        help="how many samples, episodes, problems or examples (default: "
                             f"{n_default or 'the run config'})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every random draw (default 0)")
    if options_cls is not None:
        add_config_arguments(parser, options_cls)
    _common(parser)
    args = parser.parse(argv)
    if args.n is not None:
        require_range(args, 1, MAX_ITEMS, "n")
    require_range(args, 0, INT64_MAX, "seed")
    return args


def _open_run(argv: list[str], prog: str, n_default: int | None):
    """The run, its method, the parsed flags and the keyword arguments of the method's sampling
    or evaluation options (``--sampler``, ``--steps``, ``--video``, ... for methods that declare
    an options dataclass)."""
    import dataclasses

    from mlatlas.core.run import Run
    from mlatlas.registry import get_method

    probe = Parser(prog=prog, add_help=False)
    probe.add_argument("run_dir", type=Path, nargs="?")
    known, _ = probe.parse_known_args(argv)
    options_cls = None
    if known.run_dir is not None:
        options_cls = get_method(Run.open(known.run_dir).method).sample_config_cls
    args = parse_run_flags(argv, prog, n_default, options_cls)
    _set_threads(args.threads)
    run = Run.open(args.run_dir)
    if not run.has_checkpoint():
        raise UsageError(f"{run.dir} has no checkpoint yet")
    # Every command on a run checks its config and checkpoint, even one that reads other files
    # of it (tabular evaluation reads policy.csv): a damaged run is reported, not half-trusted.
    run.load_config(get_method(run.method).config_cls)
    run.verify_checkpoint()
    extra = {}
    if options_cls is not None:
        extra["options"] = options_cls(**{f.name: getattr(args, f.name)
                                          for f in dataclasses.fields(options_cls)})
    return run, get_method(run.method), args, extra


def _options_suffix(extra: dict) -> str:
    """'-sampler-heun-steps-18' for the sampling options that differ from their defaults."""
    import dataclasses

    if "options" not in extra:
        return ""
    options = extra["options"]
    # Free text (a prompt) may hold anything: only a short, safe form of it names a file.
    def safe(value) -> str:
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value))[:32]

    return "".join(f"-{flag(f.name)}-{safe(getattr(options, f.name))}"
                   for f in dataclasses.fields(options) if getattr(options, f.name) != f.default)


def cmd_sample(argv: list[str]) -> int:
    import numpy as np

    from mlatlas.core.io import NonFiniteError, atomic_path
    from mlatlas.core.plots import samples_figure

    run, method, args, extra = _open_run(argv, "mlatlas sample", 64)
    x = method.function("sample")(run, args.n, args.seed, progress=args.progress, **extra)
    stem = f"samples-n{args.n}-seed{args.seed}{_options_suffix(extra)}"
    if isinstance(x, list):  # texts, from a language model
        from mlatlas.core.io import write_text

        write_text(run.path(f"{stem}.txt"), "".join(f"{text}\n" for text in x))
        for text in x:
            print(text)
        print(f"samples: {run.path(stem + '.txt')}")
        return 0
    bad = int((~x.isfinite()).flatten(1).any(1).sum()) if x.is_floating_point() else 0
    if bad:
        raise NonFiniteError(f"{bad} of {len(x)} samples hold NaN or infinite values; nothing "
                             "written (try a smaller --guidance or more --steps)")
    with atomic_path(run.path(f"{stem}.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, x.numpy())
    title = f"{run.method}: {args.n} samples"
    picture = method.sample_figure_fn
    figure = run.save_figure(picture(x, title, run, extra.get("options")) if picture
                             else samples_figure(x, title), f"{stem}.png")
    print(f"samples: {run.path(stem + '.npy')}\nfigure:  {figure}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    run, method, args, extra = _open_run(argv, "mlatlas eval", None)
    metrics = method.function("evaluate")(run, args.n, args.seed, progress=args.progress, **extra)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def cmd_demo(argv: list[str]) -> int:
    from mlatlas.core.runtime import idle_cores

    parser = Parser(prog="mlatlas demo",
                    description="Train DDPM on the 8x8 digits with its defaults (about 5 minutes "
                                "on 2 idle cores).")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    _common(parser)
    args = parser.parse(argv)
    # The demo takes the cores no other process is using: a second thread is 1.4x faster on
    # an idle core and 8x slower on a busy one (benchmarks/threads.py).
    threads = idle_cores() if args.threads is None else args.threads
    before = set(args.out.glob("ddpm-*"))
    code = cmd_train(["ddpm", "--dataset", "digits", "--out", str(args.out),
                      "--threads", str(threads),
                      *({True: ["--progress"], False: ["--no-progress"]}.get(args.progress, []))])
    made = sorted(set(args.out.glob("ddpm-*")) - before)
    if code == 0 and made:
        _demo_guide(made[-1])
    return code


def _demo_guide(run_dir: Path) -> None:
    """What a newcomer should look at once the demo has run: the pictures, and the samples'
    scores beside those of as many real digits (the floor the sample size allows)."""
    from mlatlas.core.run import Run
    from mlatlas.data import load_dataset
    from mlatlas.eval.samples import real_data_floor

    summary = Run.open(run_dir).summary()
    n = int(summary.get("eval/n_samples", 500))
    floor = real_data_floor(load_dataset("digits"), n)
    print(f"\nWhat to look at, in {run_dir}:\n"
          f"  samples.png      {n} generated digits beside real test digits\n"
          f"  trajectory.png   one sampling run from noise to digits\n"
          f"  loss.png         the training loss\n"
          f"Scores of the {n} samples against the held-out test digits, and of {n} real "
          f"training digits (the floor):")
    for name in ("frechet_distance", "precision", "recall"):
        if f"eval/{name}" in summary and name in floor:
            print(f"  {name:17s} {summary[f'eval/{name}']:8.3f}   real digits {floor[name]:8.3f}")
    print("Lower Frechet distance is better; near the floor, the samples are as close to the test"
          " digits as real digits are. More: docs/methods/ddpm.md")


def cmd_classifier(argv: list[str]) -> int:
    from mlatlas.eval.classifier import WEIGHTS_DIR, main

    parser = Parser(prog="mlatlas classifier",
                    description="Train the feature networks used by image metrics.")
    parser.add_argument("datasets", nargs="+",
                        choices=["digits", "mnist", "fashion-mnist", "shapes"])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    _common(parser)
    args = parser.parse(argv)
    _set_threads(args.threads)
    main(args.datasets, args.out)
    return 0


COMPRESSION_FLAGS = {"none": "", "gzip": "GZIP", "zlib": "ZLIB"}
MAX_SHARDS = 100_000


def cmd_records(argv: list[str]) -> int:
    parser = Parser(prog="mlatlas records", description="Read, check and write TFRecord files "
                    "(docs/methods/tfrecord.md).")
    sub = parser.add_subparsers(dest="action", required=True, parser_class=Parser)
    show = sub.add_parser("show", help="print each tf.train.Example as one JSON object")
    show.add_argument("file", type=Path)
    show.add_argument("--limit", type=int, default=None, help="print at most N examples")
    show.add_argument("--skip-corrupt", action="store_true",
                      help="skip corrupt records (counted on stderr) instead of failing")
    verify = sub.add_parser("verify", help="check every record's CRCs; exit 1 on corruption")
    verify.add_argument("files", type=Path, nargs="+")
    write = sub.add_parser("write", help="convert a .npy file, an image folder or a JSONL file")
    write.add_argument("src", type=Path, help="a .npy file, an image folder or a .jsonl file")
    write.add_argument("out", type=Path, help="the folder of the shards (made if absent)")
    write.add_argument("--shards", type=int, default=1, help="record i goes to shard i mod K")
    write.add_argument("--compression", choices=COMPRESSION_FLAGS, default="none")
    write.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show a progress bar (default: when the terminal is interactive)")
    args = parser.parse(argv)
    if args.action == "show":
        if args.limit is not None:
            require_range(args, 0, INT64_MAX, "limit")
        return _records_show(args.file, args.limit, args.skip_corrupt)
    if args.action == "verify":
        return _records_verify(args.files)
    require_range(args, 1, MAX_SHARDS, "shards")
    return _records_write(args.src, args.out, args.shards, COMPRESSION_FLAGS[args.compression],
                          args.progress)


def _json_value(value):
    """A decoded feature value in JSON: text as a string, other bytes as {"base64": ...}."""
    import base64

    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    return value if isinstance(value, int) or math.isfinite(value) else str(value)


def _records_show(path: Path, limit: int | None, skip_corrupt: bool) -> int:
    from mlatlas.data.formats.example import ExampleError, decode_example
    from mlatlas.data.formats.tfrecord import ReadStats, TFRecordError, read_records

    stats = ReadStats()
    try:
        for k, data in enumerate(read_records(path, skip_corrupt=skip_corrupt, stats=stats)):
            if k == limit:
                break
            try:
                features = decode_example(data)
            except ExampleError:  # a record that is no Example: its size and first bytes
                print(json.dumps({"record": k, "bytes": len(data), "hex": data[:32].hex()}))
                continue
            print(json.dumps({key: [_json_value(v) for v in values]
                              for key, values in features.items()}))
    except TFRecordError as err:  # a corrupt file fails the command, as verify does
        _say("records", f"error: {err}")
        return EXIT_FAILED
    if stats.corrupt:
        lost = f" and {stats.lost_bytes} bytes after it" if stats.lost_bytes else ""
        _say("records", f"skipped {stats.corrupt} corrupt records{lost}")
    return 0


def _records_verify(paths: list[Path]) -> int:
    from mlatlas.data.formats.tfrecord import ReadStats, TFRecordError, read_records

    failed = False
    for path in paths:
        stats = ReadStats()
        try:
            for _ in read_records(path, skip_corrupt=True, stats=stats):
                pass
        except TFRecordError as err:  # unreadable, or no TFRecord stream at all
            print(f"{path}: {err}")
            failed = True
            continue
        lost = f", {stats.lost_bytes} bytes unreadable after it" if stats.lost_bytes else ""
        print(f"{path}: {stats.records} records, {stats.data_bytes} bytes, "
              f"{stats.corrupt} corrupt{lost}")
        failed |= stats.corrupt > 0
    return EXIT_FAILED if failed else 0


def _source_examples(src: Path):
    """(number of examples, iterator of feature dicts) of a .npy file (rows), an image folder
    (uint8 H x W or H x W x 3 images, y the sub-folder's class) or a JSONL file (one object a
    line), in the formats :func:`mlatlas.data.load_tfrecord` reads."""
    import numpy as np

    from mlatlas.data import IMAGE_SUFFIXES, DatasetError

    if src.suffix == ".npy":
        try:
            array = np.load(src, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DatasetError(f"cannot read {src} as a .npy array: {err}") from None
        if array.ndim < 2 or array.dtype.kind not in "biuf":
            raise DatasetError(f"{src}: expected numbers of shape (N, ...), found {array.dtype} "
                               f"{array.shape}")
        dtype = np.uint8 if array.dtype == np.uint8 else np.dtype("<f4")
        return len(array), ({"x": np.ascontiguousarray(row, dtype).tobytes(),
                             "shape": list(row.shape)} for row in array)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
        classes = sorted({f.parent.relative_to(src).as_posix() for f in files})
        return len(files), (_image_example(f, classes, src) for f in files)
    if src.suffix == ".jsonl":
        try:
            lines = src.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DatasetError(f"cannot read {src}: {err}") from None
        numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
        return len(numbered), (_json_example(src, i, line) for i, line in numbered)
    raise UsageError(f"{src}: records write reads a .npy file, an image folder or a .jsonl file")


def _image_example(file: Path, classes: list[str], root: Path) -> dict:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from mlatlas.data import DatasetError

    try:
        with Image.open(file) as im:
            grey = im.mode in ("L", "1", "I", "I;16")
            x = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DatasetError(f"cannot read image {file}: {err}") from None
    features = {"x": x.tobytes(), "shape": list(x.shape)}
    if classes != ["."]:
        features["y"] = classes.index(file.parent.relative_to(root).as_posix())
    return features


def _json_example(src: Path, number: int, line: str) -> dict:
    from mlatlas.data import DatasetError

    try:
        features = json.loads(line)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{src}: line {number} is not JSON ({err.msg})") from None
    if not isinstance(features, dict):
        raise DatasetError(f"{src}: line {number} is not a JSON object of features")
    return features


def _records_write(src: Path, out: Path, shards: int, compression: str,
                   progress: bool | None) -> int:
    from mlatlas.core.progress import progress_bar
    from mlatlas.data import DatasetError
    from mlatlas.data.formats.example import ExampleError, encode_example
    from mlatlas.data.formats.tfrecord import (
        INDEX_SUFFIX,
        TFRecordWriter,
        index_path,
        write_index,
    )

    total, examples = _source_examples(src)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; OUT must be a folder (made if absent)")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"part-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
    # Shards of an earlier write would be read with the new ones as one data set.
    names = {path.name for path in paths}
    others = sorted(p.name for p in out.iterdir() if ".tfrecord" in p.name
                    and p.name.removesuffix(INDEX_SUFFIX) not in names)
    if others:
        raise UsageError(f"{out} already holds other TFRecord files ({others[0]}, ...); write "
                         "to an empty folder")
    writers = [TFRecordWriter(path, compression) for path in paths]
    try:
        for i, features in enumerate(progress_bar(examples, total=total, progress=progress,
                                                  desc="records", unit="ex")):
            try:
                data = encode_example(features)
            except ExampleError as err:
                raise DatasetError(f"{src}: example {i}: {err}") from None
            writers[i % shards].write(data)
    except BaseException:
        for writer, path in zip(writers, paths, strict=True):
            writer.close()
            path.unlink(missing_ok=True)
        raise
    for writer in writers:
        writer.close()
        if not compression:
            write_index(writer.index, index_path(writer.path))
        print(f"{writer.path}  {len(writer.index)} records")
    return 0


def _in_job() -> bool:
    from mlatlas.core import distributed

    return distributed.launched()


def _from_collective(err: BaseException) -> bool:
    """Whether ``err`` was raised inside torch.distributed (gloo raises plain RuntimeErrors)."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"torch{os.sep}distributed" in frames[-1].filename


def _import_callable(spec: str):
    """``package.module:name`` -> that attribute, or a UsageError naming what is missing."""
    import importlib

    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UsageError(f"--model must be MODULE:CALLABLE (e.g. mypkg.vlm:answer), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"--model {spec}: cannot import {module_name} ({err})") from None
    model = getattr(module, name, None)
    if not callable(model):
        raise UsageError(f"--model {spec}: {module_name} has no callable {name!r}")
    return model


def cmd_mmbench(argv: list[str]) -> int:
    parser = Parser(prog="mlatlas mmbench", description="MMBench's CircularEval: every question "
                    "asked once per rotation of its options, right only if every pass is right "
                    "(docs/methods/circular_eval.md).")
    parser.add_argument("tsv", type=Path, help="an MMBench-layout TSV")
    parser.add_argument("--model", required=True,
                        help="MODULE:CALLABLE, a model(image, question, options) -> str")
    parser.add_argument("--results", type=Path, default=None,
                        help="write every pass with its reply, extracted label and hit here")
    parser.add_argument("--build", action=argparse.BooleanOptionalAction, default=None,
                        help="build the rotated passes (default: unless the file holds them)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar (default: when the terminal is interactive)")
    args = parser.parse(argv)
    from mlatlas.eval.circular import MMBenchError, evaluate

    model = _import_callable(args.model)
    try:
        result = evaluate(model, args.tsv, args.results, build=args.build, progress=args.progress)
    except (MMBenchError, OSError) as err:
        raise UsageError(str(err)) from None
    if result is None:
        print(f"{args.tsv} has no answers: replies written"
              + (f" to {args.results}" if args.results else " nowhere (give --results)"))
    else:
        print(result.format())
    return 0


def _set_threads(threads: int | None) -> None:
    from mlatlas.core.runtime import set_threads

    set_threads(threads)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    handlers = {"list": cmd_list, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval,
                "demo": cmd_demo, "classifier": cmd_classifier, "records": cmd_records,
                "mmbench": cmd_mmbench}
    from mlatlas.core.io import FileError, NonFiniteError
    from mlatlas.core.run import DivergedRun, InterruptedRun, NonFiniteLossError
    from mlatlas.data import DatasetError

    code = None
    try:
        if command not in handlers:
            raise UsageError(f"unknown command {command!r}{closest(command, COMMANDS)} "
                             f"(commands: {', '.join(COMMANDS)})")
        code = handlers[command](rest)
        return code
    except (UsageError, ConfigError, DatasetError, FileError) as err:
        _say(command, f"error: {err}")
        return EXIT_USAGE
    except (NonFiniteLossError, NonFiniteError, DivergedRun) as err:
        _say(command, f"error: {err}")
        return EXIT_FAILED
    except InterruptedRun as err:
        if not os.environ.get(LAUNCHED_BY_NPROC):  # else the launcher says it, with --nproc
            _say(command, f"{err}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # outside a training loop, e.g. while sampling
        _say(command, "interrupted")
        return EXIT_INTERRUPTED
    except RuntimeError as err:
        if not (_in_job() and _from_collective(err)):
            raise
        # A peer died mid-collective: its own failure is the story, this rank only says so.
        _say(command, f"stopped: another rank of the job is gone "
             f"({str(err).splitlines()[0][:120]})", every_rank=True)
        return EXIT_PEER_LOST
    except OSError as err:  # a folder that cannot be written, a full disk
        _say(command, f"error: {err}", every_rank=True)
        return EXIT_FAILED
    finally:
        if _in_job():
            from mlatlas.core import distributed

            distributed.shutdown(synchronize=code == 0)
            if code == 0:
                # Every file is written and every rank has left the group: end the process
                # here. The interpreter's teardown can destroy gloo's threads unjoined, and a
                # rank that aborts then ("terminate called without an active exception")
                # turns a finished job into a failed one.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)


def _say(command: str, message: str, every_rank: bool = False) -> None:
    """An error line on stderr; in a torchrun job, once (rank 0) for what every rank hits
    alike, or from every rank, with its number."""
    if _in_job():
        from mlatlas.core import distributed

        if not every_rank and not distributed.is_main():
            return
        if every_rank:
            message = f"rank {distributed.rank()}: {message}"
    # One line whatever the message quotes: a control character or line separator a user typed
    # into a name or path is shown escaped.
    message = "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                      for c in message)
    print(f"mlatlas {command}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
