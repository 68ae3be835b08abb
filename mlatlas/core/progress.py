"""Progress bars: tqdm on stderr, shown on an interactive terminal unless asked otherwise."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable=None, *, progress: bool | None = None, **kwargs) -> tqdm:
    """``progress`` True forces the bar, False hides it, None shows it only on a terminal."""
    disable = None if progress is None else not progress
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
