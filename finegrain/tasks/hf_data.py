"""Task data from Hugging Face ``datasets``: a Hub name or a local path, offline-aware.

A task that takes ``task.kwargs.dataset`` reads its splits with ``load_columns``:

- a local path (a string that starts with ``./``, ``../``, ``/`` or ``~``, ends in a data-file
  extension, or whose parent directory exists) is read from disk and never from the network. A
  directory written by ``save_to_disk`` is opened with ``load_from_disk``; any other directory
  or a single ``.json``/``.jsonl``/``.parquet``/``.csv``/``.arrow`` file goes through
  ``load_dataset``, which infers the format from the extensions and the split names from the
  file names (``train.jsonl``, ``test.jsonl``; a single file is the split ``train``). A path
  that does not exist is an error ("no such file or directory").
- anything else is a Hub name (``openai/gsm8k``), loaded with ``load_dataset(name, config)``.
  When ``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` is set, only the local cache is used:
  offline mode is forced on for the call, even if ``datasets`` was imported before the variable
  was set, and a name that is not cached is a one-line error.

Columns are mapped by kwargs: ``columns={"question_field": "problem"}`` reads the column
``problem`` and, when it is missing, names ``task.kwargs.question_field`` and the columns that
exist. ``datasets`` is imported only here, on first use, with an install hint when it is missing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from finegrain.tasks.base import KWARGS

INSTALL_HINT = "pip install 'finegrain[datasets]'"
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                      ".arrow": "arrow"}
_TRUE = {"1", "true", "yes", "on"}


def offline() -> bool:
    """True when ``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def looks_like_path(source: str) -> bool:
    """Whether ``source`` names a local path rather than a Hub dataset.

    >>> [looks_like_path(s) for s in ["./data", "/abs/x", "~/d", "../d", "d/train.jsonl", "openai/gsm8k"]]
    [True, True, True, True, True, False]
    """
    if source.startswith(("./", "../", "/", "~")) or source in (".", ".."):
        return True
    path = Path(source)
    return (path.suffix.lower() in DATA_FILE_BUILDERS or path.exists()
            or (str(path.parent) not in ("", ".") and path.parent.exists()))


def import_datasets():
    """The ``datasets`` module, or an ImportError with the install hint."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{KWARGS}.dataset: reading a dataset needs the 'datasets' package; "
                          f"install it with: {INSTALL_HINT}") from None
    return datasets


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message, at most 200 characters."""
    line = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    return line if len(line) <= 200 else line[:197] + "..."


@contextlib.contextmanager
def _forced_offline(datasets) -> Iterator[None]:
    """Offline mode for ``datasets`` and ``huggingface_hub`` during the block. Both read the
    environment once, when imported; this makes a variable set later count too."""
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_local(datasets, path: Path, config: str | None):
    """A DatasetDict (or Dataset) from a local path; one-line errors name the path."""
    if not path.exists():
        raise FileNotFoundError(f"{KWARGS}.dataset: {path}: no such file or directory")
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            return datasets.load_from_disk(str(path))
        if path.is_file():
            builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"{KWARGS}.dataset: {path}: expected a directory or a "
                                 f"{'/'.join(DATA_FILE_BUILDERS)} file")
            return datasets.load_dataset(builder, data_files=str(path))
        return datasets.load_dataset(str(path), name=config)
    except ValueError as err:
        if str(err).startswith(KWARGS):
            raise
        raise ValueError(f"{KWARGS}.dataset: cannot read {path}: {_first_line(err)}") from err
    except Exception as err:  # datasets raises many kinds, often with multi-line messages
        raise ValueError(f"{KWARGS}.dataset: cannot read {path}: {_first_line(err)}") from err


def _load_hub(datasets, name: str, config: str | None):
    """A DatasetDict from the Hub or, offline, from the local cache only."""
    if not offline():
        try:
            return datasets.load_dataset(name, name=config)
        except Exception as err:
            raise ValueError(f"{KWARGS}.dataset: cannot load '{name}': {_first_line(err)}") from err
    try:
        with _forced_offline(datasets):
            return datasets.load_dataset(name, name=config)
    except Exception as err:
        raise ValueError(f"{KWARGS}.dataset: '{name}' is not in the local datasets cache and "
                         f"offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); load it "
                         f"once with network access, or give a local path "
                         f"({_first_line(err)})") from err


def load_splits(source: str, *, config: str | None = None) -> dict[str, Any]:
    """Every split of ``source`` (see the module docstring) as ``{split name: Dataset}``.

    A single ``Dataset`` (a ``save_to_disk`` of one split) is one split: its own split name when
    it has one, else ``train``.
    """
    datasets = import_datasets()
    if looks_like_path(source):
        loaded = _load_local(datasets, Path(source).expanduser(), config)
    else:
        loaded = _load_hub(datasets, source, config)
    if isinstance(loaded, datasets.Dataset):
        return {str(loaded.split) if loaded.split is not None else "train": loaded}
    return dict(loaded)


def load_columns(source: str, split: str, columns: Mapping[str, str], *,
                 config: str | None = None, split_kwarg: str = "split",
                 splits: dict[str, Any] | None = None) -> list[tuple]:
    """The rows of split ``split`` of ``source`` as tuples of the ``columns`` values, in the
    order of ``columns`` (kwarg name -> column name).

    ``split_kwarg`` names the kwarg that chose ``split`` in errors; ``splits`` reuses the
    result of ``load_splits`` (so that a task reads its source once for both splits).
    """
    splits = load_splits(source, config=config) if splits is None else splits
    if split not in splits:
        raise ValueError(f"{KWARGS}.{split_kwarg}: no split '{split}' in {source}; "
                         f"splits: {', '.join(sorted(splits)) or '(none)'}")
    ds = splits[split]
    for kwarg, column in columns.items():
        if column not in ds.column_names:
            raise ValueError(f"{KWARGS}.{kwarg}: no column '{column}' in {source} (split "
                             f"'{split}'); columns: {', '.join(ds.column_names)}")
    return list(zip(*(ds[column] for column in columns.values())))
