"""Tasks and their data: ``TaskData``, loaders for CSV, JSONL, DataFrames and Hugging Face datasets.

A task is a text classification problem with a train and a test split. Each split holds the
texts, an optional second text per example (sentence-pair tasks) and integer labels in
``0..K-1``, or no labels at all: an unlabeled task (a CSV/JSONL with only a text column, or a
``.txt`` file with one sample per line) serves statistics and diagnosis, and is scored by the
token loss of a causal LM. The metric says how the task is scored (see :mod:`osrm_core.evaluate`).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from osrm_core.errors import DataError

Metric = Literal["accuracy", "mcc", "f1", "loss"]
METRICS: tuple[str, ...] = ("accuracy", "mcc", "f1", "loss")

#: Uploads and files larger than this are refused (bytes).
MAX_DATA_BYTES = 50 * 1024 * 1024
#: Texts longer than this many characters are cut, with a warning.
MAX_TEXT_CHARS = 5000
#: Most classes a task may have (a text column taken for the label column has about one per row).
MAX_CLASSES = 1000



@dataclass
class Split:
    """One split of a task.

    Attributes
    ----------
    text : list of str, length n
    label : numpy array of int64, shape (n,), or None
        None for unlabeled texts.
    text_pair : list of str or None
        The second sentence of sentence-pair tasks, or None for single-sentence tasks.
    """

    text: list[str]
    label: np.ndarray | None
    text_pair: list[str] | None = None

    def __post_init__(self) -> None:
        if self.label is not None:
            self.label = np.asarray(self.label, dtype=np.int64)
        if self.label is not None and len(self.text) != len(self.label):
            raise DataError(f"text and label differ in length: {len(self.text)} != {len(self.label)}")
        if self.text_pair is not None and len(self.text_pair) != len(self.text):
            raise DataError(
                f"text_pair and text differ in length: {len(self.text_pair)} != {len(self.text)}"
            )

    def __len__(self) -> int:
        return len(self.text)

    def head(self, n: int | None) -> Split:
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        pair = None if self.text_pair is None else self.text_pair[:n]
        return Split(self.text[:n], None if self.label is None else self.label[:n], pair)

    def take(self, indices: np.ndarray) -> Split:
        """The examples at ``indices``, in that order."""
        pair = None if self.text_pair is None else [self.text_pair[i] for i in indices]
        return Split([self.text[i] for i in indices], self.label[indices], pair)


@dataclass
class TaskData:
    """A classification task: name, train/test splits, label names and metric.

    Attributes
    ----------
    name : str
        Short identifier, used in file names (letters, digits, ``_`` and ``-``).
    train, test : Split
    label_names : list of str
        ``label_names[k]`` names label ``k``; ``num_labels == len(label_names)``; empty for an
        unlabeled task.
    metric : {"accuracy", "mcc", "f1", "loss"}
        ``loss`` is the only metric of an unlabeled task.
    description : str
    source : str
        Where the samples came from (a file name, ``upload``, ``hf:DATASET``), for reports.
    drawn_test : bool
        The test split was drawn here from the training file (a single file split 80/20), not
        given by the source. A source's own test split (a folder's ``test.csv``, a dataset's
        test split) is what adapters trained on that task never saw.
    """

    name: str
    train: Split
    test: Split
    label_names: list[str]
    metric: Metric = "accuracy"
    description: str = ""
    source: str = field(default="", repr=False)
    drawn_test: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise DataError(
                f"task name {self.name!r} is not allowed: use letters, digits, '_' and '-'"
            )
        if self.metric not in METRICS:
            raise DataError(f"metric {self.metric!r} is unknown: allowed are {', '.join(METRICS)}")
        if len(self.train) == 0:
            raise DataError(f"task {self.name!r} has no training examples")
        if len(self.test) == 0:
            raise DataError(f"task {self.name!r} has no test examples")
        if (self.train.label is None) != (self.test.label is None):
            raise DataError(f"task {self.name!r}: labels must be in both splits or neither")
        if (self.train.text_pair is None) != (self.test.text_pair is None):
            raise DataError(f"task {self.name!r}: text_pair must be in both splits or neither")
        if not self.labeled:
            if self.metric != "loss":
                raise DataError(
                    f"task {self.name!r} has no labels, so its metric cannot be {self.metric!r}; "
                    "an unlabeled task is scored by 'loss' (the token loss of a causal LM)"
                )
            if self.label_names:
                raise DataError(f"task {self.name!r} has label names but no labels")
            return
        k = len(self.label_names)
        if k < 2:
            raise DataError(f"task {self.name!r} needs at least 2 label names, got {k}")
        for split_name, split in (("train", self.train), ("test", self.test)):
            bad = split.label[(split.label < 0) | (split.label >= k)]
            if bad.size:
                raise DataError(
                    f"task {self.name!r} {split_name} has label {int(bad[0])} outside 0..{k - 1}"
                )
        if np.unique(self.train.label).size < 2:
            raise DataError(f"task {self.name!r} train split has only one class")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def labeled(self) -> bool:
        """False for a task of plain texts (statistics, diagnosis, causal-LM loss only)."""
        return self.train.label is not None

    @property
    def is_pair(self) -> bool:
        return self.train.text_pair is not None


# --------------------------------------------------------------------------- tables


def check_columns(df: pd.DataFrame, where: str, **roles: str | None) -> None:
    """DataError naming the first of ``roles`` (``text="text"``, ...) whose column ``df`` lacks:
    the message of the command line, which the app shows too."""
    for role, column in roles.items():
        if column is not None and column not in df.columns:
            raise DataError(
                f"{where}: column {column!r} for {role} not found; columns are {list(df.columns)}"
            )


def _split_from_frame(
    df: pd.DataFrame, *, text: str, label: str | None, text_pair: str | None, where: str
) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    check_columns(df, where, text=text, label=label, text_pair=text_pair)
    if len(df) == 0:
        raise DataError(f"{where}: no rows")
    texts = df[text].fillna("").astype(str)
    if (texts.str.strip() == "").all():
        raise DataError(f"{where}: column {text!r} is empty")
    pairs = None if text_pair is None else df[text_pair].fillna("").astype(str)
    cut = 0
    for column in (texts, pairs):
        if column is not None:
            cut += int((column.str.len() > MAX_TEXT_CHARS).sum())
    if cut:
        warnings.warn(
            f"{where}: {cut} texts longer than {MAX_TEXT_CHARS} characters were cut",
            stacklevel=3,
        )
        texts = texts.str.slice(0, MAX_TEXT_CHARS)
        pairs = None if pairs is None else pairs.str.slice(0, MAX_TEXT_CHARS)
    if label is None:
        return texts.tolist(), None, None if pairs is None else pairs.tolist()
    labels = df[label]
    empty = labels.isna() | labels.map(lambda x: isinstance(x, str) and not x.strip())
    if empty.any():
        first = empty.to_numpy().argmax()
        raise DataError(
            f"{where}: column {label!r} has empty labels ({int(empty.sum())}, the first in {_row(df, first)})"
        )
    nested = labels.map(lambda x: isinstance(x, list | dict))
    if nested.any():
        first = nested.to_numpy().argmax()
        raise DataError(
            f"{where}: label {labels.iloc[first]!r} ({_row(df, first)}) is not a number or a class name"
        )
    return texts.tolist(), labels.to_numpy(), None if pairs is None else pairs.tolist()


def _row(df: pd.DataFrame, position: int) -> str:
    """'data row N' of the file a frame was read from (1-based, header not counted)."""
    index = df.index[position]
    return f"data row {index + 1}" if isinstance(index, int | np.integer) else f"row {index!r}"


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _integer(value: float) -> str:
    return str(int(value)) if abs(value) < 1e15 else f"{value:g}"


def _encode_labels(
    train: np.ndarray, test: np.ndarray, label_names: list[str] | None, where: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer labels 0..K-1 stay; anything else is mapped via sorted unique train values."""
    both = np.concatenate([train, test])
    as_int = pd.to_numeric(pd.Series(both), errors="coerce")
    if as_int.notna().all():
        values = as_int.to_numpy(dtype=np.float64)
        fractional = ~np.isfinite(values) | (values != np.round(values))
        if fractional.any():
            raise DataError(
                f"{where}: label {_shown(both[fractional.argmax()])} is not an integer; "
                "labels must be integers 0..K-1 or class names"
            )
        if values.min() < 0:
            raise DataError(f"{where}: label {_integer(values.min())} is negative; labels must be 0..K-1")
        if values.max() >= MAX_CLASSES:
            raise DataError(
                f"{where}: label {_integer(values.max())} is outside 0..{MAX_CLASSES - 1}; "
                f"at most {MAX_CLASSES} classes are supported"
            )
        ints = values.astype(np.int64)
        k = int(ints.max()) + 1 if label_names is None else len(label_names)
        if ints.max() >= k:
            raise DataError(f"{where}: label {int(ints.max())} is outside 0..{k - 1}")
        names = label_names or [str(i) for i in range(k)]
        return ints[: len(train)], ints[len(train) :], names
    if as_int.notna().any():
        raise DataError(f"{where}: labels mix numbers and names; use integers 0..K-1 or names")
    classes = sorted({str(x) for x in train})
    if len(classes) > MAX_CLASSES:
        raise DataError(
            f"{where}: the label column has {len(classes)} distinct values; at most {MAX_CLASSES} "
            "classes are supported (is it the right column?)"
        )
    unseen = sorted({str(x) for x in test} - set(classes))
    if unseen:
        raise DataError(f"{where}: test labels {unseen[:3]} do not occur in train")
    index = {c: i for i, c in enumerate(classes)}
    return (
        np.array([index[str(x)] for x in train], dtype=np.int64),
        np.array([index[str(x)] for x in test], dtype=np.int64),
        label_names or classes,
    )


def from_dataframes(
    name: str,
    train: pd.DataFrame,
    test: pd.DataFrame | None = None,
    *,
    text: str = "text",
    label: str | None = "label",
    text_pair: str | None = None,
    label_names: list[str] | None = None,
    metric: Metric = "accuracy",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TaskData:
    """Build a task from pandas DataFrames.

    Parameters
    ----------
    train, test : DataFrame
        ``test`` None splits ``train`` with ``test_fraction`` (shuffled with ``seed``).
    text, label, text_pair : str
        Column names. ``text_pair`` None autodetects a ``text_pair`` column that is not all empty.
        Without a column named ``label`` (the default name) the task is unlabeled (metric
        ``loss``); a label column named otherwise must exist.
    label_names : list of str, optional
        Names for labels 0..K-1. Labels that are strings are mapped in sorted order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if test is None:
        if len(train) < 2:
            raise DataError(f"task {name!r}: need at least 2 rows to split off a test set")
        order = np.random.default_rng(seed).permutation(len(train))
        n_test = max(1, int(round(test_fraction * len(train))))
        test, train = train.iloc[order[:n_test]], train.iloc[order[n_test:]]
    if text_pair is None and "text_pair" in train.columns:
        if (train["text_pair"].fillna("").astype(str).str.strip() != "").any():
            text_pair = "text_pair"
    if label == "label" and label not in train.columns and text in train.columns:
        label = None  # plain texts: an unlabeled task
        metric = "loss"
    # Columns are checked first: duplicated(subset=[]) on a frame without them fails obscurely.
    tr = _split_from_frame(train, text=text, label=label, text_pair=text_pair, where=f"{name} train")
    te = _split_from_frame(test, text=text, label=label, text_pair=text_pair, where=f"{name} test")
    dup = train.duplicated(subset=[c for c in (text, text_pair) if c is not None]).sum()
    if dup:
        warnings.warn(f"task {name!r}: {int(dup)} duplicate training rows", stacklevel=2)
    if label is None:
        y_train, y_test, names = None, None, []
    else:
        y_train, y_test, names = _encode_labels(tr[1], te[1], label_names, where=name)
    return TaskData(
        name=name,
        train=Split(tr[0], y_train, tr[2]),
        test=Split(te[0], y_test, te[2]),
        label_names=names,
        metric=metric,
    )


def read_table(source: str | Path | bytes, *, fmt: Literal["csv", "jsonl", "txt"] | None = None) -> pd.DataFrame:
    """Read a CSV or JSONL file (path or raw bytes) into a DataFrame of strings and numbers, or a
    ``.txt`` file (one sample per line, blank lines skipped) into one ``text`` column.

    Raises :class:`DataError` for files that are too large, not UTF-8, empty or malformed.
    """
    if isinstance(source, bytes):
        raw, label = source, "upload"
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} does not exist")
        if path.stat().st_size > MAX_DATA_BYTES:
            raise DataError(f"data file {path.name!r} is larger than {MAX_DATA_BYTES >> 20} MiB")
        raw, label = path.read_bytes(), path.name
        if fmt is None:
            suffix = path.suffix.lower()
            fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}.get(suffix)
            if fmt is None:
                raise DataError(f"data file {path.name!r}: unknown type {suffix!r}; use .csv, .jsonl or .txt")
    if len(raw) > MAX_DATA_BYTES:
        raise DataError(f"{label}: larger than {MAX_DATA_BYTES >> 20} MiB")
    if fmt not in ("csv", "jsonl", "txt"):
        raise DataError(f"{label}: format {fmt!r} is unknown; use 'csv', 'jsonl' or 'txt'")
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{label}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None
    if not content.strip():
        raise DataError(f"{label}: the file is empty")
    try:
        if fmt == "txt":
            df = pd.DataFrame({"text": [line for line in content.splitlines() if line.strip()]})
        elif fmt == "csv":
            df = pd.read_csv(io.StringIO(content), keep_default_na=False, dtype=str)
        else:
            rows = []
            for i, line in enumerate(content.splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{label}: cannot parse as JSONL: line {i}: {err.msg}") from None
                    except RecursionError:
                        raise DataError(f"{label}: cannot parse as JSONL: line {i} is nested too deeply") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{label}: line {i} is not a JSON object")
                    rows.append(row)
            df = pd.DataFrame(rows)
    except DataError:
        raise
    except (ValueError, pd.errors.ParserError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{label}: cannot parse as {fmt.upper()}: {first}") from None
    if df.empty:
        raise DataError(f"{label}: no rows")
    return df


def load_task(
    name: str,
    train: str | Path | bytes,
    test: str | Path | bytes | None = None,
    *,
    fmt: Literal["csv", "jsonl", "txt"] | None = None,
    **kwargs,
) -> TaskData:
    """Load a task from CSV, JSONL or TXT files (paths or bytes); see :func:`from_dataframes`."""
    train_df = read_table(train, fmt=fmt)
    test_df = None if test is None else read_table(test, fmt=fmt)
    task = from_dataframes(name, train_df, test_df, **kwargs)
    task.source = str(train) if not isinstance(train, bytes) else "upload"
    task.drawn_test = test is None
    return task


def load_task_dir(name: str, directory: str | Path, **kwargs) -> TaskData:
    """Load ``directory/train.{csv,jsonl,txt}`` and ``directory/test.{csv,jsonl,txt}``."""
    directory = Path(directory)
    for ext in ("csv", "jsonl", "txt"):
        if (directory / f"train.{ext}").is_file():
            test = directory / f"test.{ext}"
            return load_task(name, directory / f"train.{ext}", test if test.is_file() else None, **kwargs)
    raise DataError(f"task directory {str(directory)!r} has no train.csv, train.jsonl or train.txt")


def load_hf_task(
    name: str,
    dataset: str,
    config: str | None = None,
    *,
    train_split: str = "train",
    test_split: str = "test",
    **kwargs,
) -> TaskData:
    """Load a task from a Hugging Face dataset by name (needs ``datasets`` and the network)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "loading a Hugging Face dataset needs the 'datasets' package: pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(dataset, config)
    except Exception as err:  # offline, unknown name, ...: the library's own message says which
        raise DataError(f"cannot load Hugging Face dataset {dataset!r}: {err}") from None
    for split in (train_split, test_split):
        if split not in ds:
            raise DataError(f"dataset {dataset!r} has no split {split!r}; splits are {list(ds)}")
    names = None
    label_col = kwargs.get("label", "label")
    feature = ds[train_split].features.get(label_col)
    if getattr(feature, "names", None):
        names = list(feature.names)
    task = from_dataframes(
        name, ds[train_split].to_pandas(), ds[test_split].to_pandas(), label_names=names, **kwargs
    )
    task.source = f"hf:{dataset}"
    return task
