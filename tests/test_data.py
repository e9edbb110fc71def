"""Tests for tasks and their loaders (:mod:`osrm_core.data`) and batching (:mod:`osrm_core.batching`):
broken data files, each with its exact message, and random bytes, CSVs and JSONL thrown at the
loader (hypothesis)."""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _helpers import PROPERTY, _csv, _file, assert_message
from hypothesis import given
from hypothesis import strategies as st

from osrm_core.batching import iter_batches, length_order
from osrm_core.data import (
    MAX_DATA_BYTES,
    DataError,
    Split,
    TaskData,
    from_dataframes,
    load_task,
    load_task_dir,
    read_table,
)
from osrm_core.task_spec import parse_task_spec

CSV = b"text,label\nthe film was great,1\nawful plot,0\nloved it,1\nboring and slow,0\n"


def _split(n: int = 4, labels=(0, 1)) -> Split:
    return Split([f"text {i}" for i in range(n)], np.resize(np.array(labels), n))


def _task(**kwargs) -> TaskData:
    args = {"name": "t", "train": _split(), "test": _split(2), "label_names": ["neg", "pos"]}
    args.update(kwargs)
    return TaskData(**args)


# --------------------------------------------------------------------------- Split and TaskData


def test_split_basics() -> None:
    split = Split(["a", "b", "c"], [0, 1, 0], ["x", "y", "z"])
    assert len(split) == 3
    assert split.label.dtype == np.int64
    head = split.head(2)
    assert head.text == ["a", "b"] and head.text_pair == ["x", "y"] and list(head.label) == [0, 1]
    assert split.head(None) is split and split.head(10) is split


def test_split_length_mismatch() -> None:
    with pytest.raises(ValueError, match="text and label differ in length: 2 != 3"):
        Split(["a", "b"], [0, 1, 0])
    with pytest.raises(ValueError, match="text_pair and text differ in length"):
        Split(["a", "b"], [0, 1], ["x"])


def test_taskdata_properties() -> None:
    task = _task()
    assert task.num_labels == 2 and not task.is_pair and task.metric == "accuracy"


def test_task_with_no_examples() -> None:
    with pytest.raises(DataError, match="task 'empty' has no training examples"):
        _task(name="empty", train=Split([], []))
    with pytest.raises(DataError, match="has no test examples"):
        _task(test=Split([], []))


def test_unknown_metric() -> None:
    with pytest.raises(ValueError, match="metric 'bleu' is unknown: allowed are accuracy, mcc, f1"):
        _task(metric="bleu")
    with pytest.raises(ValueError, match="metric 'bleu' is unknown"):
        load_task("t", CSV, fmt="csv", metric="bleu")


def test_labels_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"train has label 5 outside 0\.\.1"):
        _task(train=Split(["a", "b", "c"], [0, 1, 5]))
    with pytest.raises(ValueError, match=r"test has label -1 outside 0\.\.1"):
        _task(test=Split(["a"], [-1]))
    with pytest.raises(ValueError, match=r"label 3 is outside 0\.\.1"):
        load_task("t", CSV + b"odd one,3\n", fmt="csv", label_names=["neg", "pos"])
    with pytest.raises(ValueError, match="label -2 is negative"):
        load_task("t", CSV + b"odd one,-2\n", fmt="csv")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "bad name!"}, "task name 'bad name!' is not allowed"),
        ({"name": ""}, "task name '' is not allowed"),
        ({"label_names": ["only"]}, "needs at least 2 label names, got 1"),
        ({"train": Split(["a", "b"], [1, 1])}, "train split has only one class"),
        ({"test": Split(["a"], [0], ["b"])}, "text_pair must be in both splits or neither"),
    ],
)
def test_taskdata_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _task(**kwargs)


# --------------------------------------------------------------------------- tables and files


def test_load_task_from_csv_bytes() -> None:
    task = load_task("reviews", CSV, fmt="csv", test_fraction=0.5, seed=3)
    assert task.name == "reviews" and task.source == "upload"
    assert len(task.train) == 2 and len(task.test) == 2
    assert task.label_names == ["0", "1"]
    assert sorted(task.train.text + task.test.text) == sorted(
        ["the film was great", "awful plot", "loved it", "boring and slow"]
    )
    # The split is seeded: the same seed gives the same split.
    again = load_task("reviews", CSV, fmt="csv", test_fraction=0.5, seed=3)
    assert again.train.text == task.train.text


def test_string_labels_are_mapped_in_sorted_order() -> None:
    train = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["pos", "neg", "pos", "neg"]})
    test = pd.DataFrame({"text": ["e", "f"], "label": ["neg", "pos"]})
    task = from_dataframes("t", train, test)
    assert task.label_names == ["neg", "pos"]
    assert list(task.train.label) == [1, 0, 1, 0] and list(task.test.label) == [0, 1]
    unseen = pd.DataFrame({"text": ["e"], "label": ["meh"]})
    with pytest.raises(ValueError, match=r"test labels \['meh'\] do not occur in train"):
        from_dataframes("t", train, unseen)
    mixed = pd.DataFrame({"text": ["a", "b", "c"], "label": ["1", "pos", "0"]})
    with pytest.raises(ValueError, match="labels mix numbers and names"):
        from_dataframes("t", mixed, mixed)


def test_jsonl_with_text_pair(tmp_path) -> None:
    rows = [{"text": f"s{i}", "text_pair": f"p{i}", "label": i % 2} for i in range(6)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    task = load_task_dir("pairs", tmp_path)
    assert task.is_pair and task.train.text_pair == [f"p{i}" for i in range(6)]
    assert task.test.text == ["s0"] and task.source.endswith("train.jsonl")
    assert parse_task_spec(str(tmp_path), name="pairs").train.text == task.train.text


def test_missing_csv_column() -> None:
    data = b"sentence,label\nhello,0\nworld,1\n"
    with pytest.raises(
        ValueError, match=r"column 'text' for text not found; columns are \['sentence', 'label'\]"
    ):
        load_task("t", data, fmt="csv")
    with pytest.raises(ValueError, match="column 'target' for label not found"):
        load_task("t", CSV, fmt="csv", label="target")


def test_non_utf8_bytes() -> None:
    with pytest.raises(ValueError, match=r"upload: not UTF-8 text \(byte 5\)"):
        load_task("t", b"text,\xff\xfelabel\n", fmt="csv")


def test_empty_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="upload: the file is empty"):
        load_task("t", b"", fmt="csv")
    with pytest.raises(ValueError, match="the file is empty"):
        load_task("t", b"  \n\n", fmt="jsonl")
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.csv: the file is empty"):
        load_task("t", empty)


@pytest.mark.parametrize(
    ("data", "fmt", "message"),
    [
        (CSV, None, "format None is unknown; use 'csv', 'jsonl' or 'txt'"),
        (b'{"text": "a", "label": 0}\n[1, 2]\n', "jsonl", "line 2 is not a JSON object"),
        (b'{"text": "a", "label": 0\n', "jsonl", "cannot parse as JSONL"),
        (b"text,label\n", "csv", "no rows"),
        (b"text,label\n ,0\n ,1\n", "csv", "column 'text' is empty"),
        (b'{"text": "a", "label": null}\n{"text": "b", "label": 1}\n', "jsonl", "has empty labels"),
    ],
)
def test_read_rejects(data: bytes, fmt, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_task("t", data, fmt=fmt, test_fraction=0.5)


def test_read_table_paths(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_table(tmp_path / "nope.csv")
    odd = tmp_path / "data.tsv"
    odd.write_text("text\tlabel\na\t0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown type '\.tsv'; use \.csv, \.jsonl or \.txt"):
        read_table(odd)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        load_task("t", CSV, fmt="csv", test_fraction=1.5)


def test_long_texts_are_cut_with_a_warning() -> None:
    long = "word " * 2000
    data = f"text,label\n{long},0\nshort,1\nother,0\nmore,1\n".encode()
    with pytest.warns(UserWarning, match="texts longer than 5000 characters were cut"):
        task = load_task("t", data, fmt="csv", test_fraction=0.25)
    assert max(len(t) for t in task.train.text + task.test.text) == 5000


def test_parse_task_spec_demo_and_errors() -> None:
    task = parse_task_spec("demo:sentiment", name="reviews", seed=1)
    assert task.name == "reviews" and task.num_labels == 2
    with pytest.raises(ValueError, match="is neither demo:KEY, hf:DATASET, a directory nor an existing file"):
        parse_task_spec("/no/such/file.csv")


# --------------------------------------------------------------------------- batching


def test_iter_batches_pads_to_the_longest_row(tokenizer, tiny_tasks) -> None:
    split = tiny_tasks[0].train
    batches = list(iter_batches(tokenizer, split, batch_size=7))
    assert sum(len(b["labels"]) for b in batches) == len(split)
    for start, batch in zip(range(0, len(split), 7), batches, strict=True):
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max())  # dynamic padding
        assert torch.equal(batch["labels"], torch.as_tensor(split.label[start : start + 7]))
        # Padded positions hold the pad token.
        assert bool((batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all())
    no_labels = next(iter_batches(tokenizer, split, batch_size=4, with_labels=False, indices=[3, 1]))
    assert "labels" not in no_labels and no_labels["input_ids"].shape[0] == 2


def test_iter_batches_sorted_and_pairs(tokenizer, tiny_tasks) -> None:
    pairs = tiny_tasks[3].train
    assert pairs.text_pair is not None
    idx = np.arange(len(pairs))
    order = length_order(tokenizer, pairs, idx, 128)
    batch = next(iter_batches(tokenizer, pairs, batch_size=len(pairs), sort_by_length=True))
    lengths = batch["attention_mask"].sum(1).numpy()
    assert (np.diff(lengths) >= 0).all()
    assert batch["token_type_ids"].max() == 1  # the second sentence is marked
    assert list(batch["labels"].numpy()) == list(pairs.label[order])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        next(iter_batches(tokenizer, pairs, batch_size=0))
    with pytest.raises(ValueError, match="max_length must be >= 2, got 1"):
        next(iter_batches(tokenizer, pairs, max_length=1))


# --------------------------------------------------------------------------- unlabeled texts


@pytest.mark.parametrize(
    "name, content",
    [
        ("plain.txt", "first sample\n\nsecond one, with a comma\nthird\nfourth\nfifth\n"),
        ("plain.csv", "text\nfirst sample\n\"second one, with a comma\"\nthird\nfourth\nfifth\n"),
        ("plain.jsonl", "".join(f'{{"text": "{t}"}}\n' for t in
                                ["first sample", "second one, with a comma", "third", "fourth", "fifth"])),
    ],
)
def test_unlabeled_texts_are_a_task(tmp_path, name, content) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    task = parse_task_spec(str(path), name="u")
    assert not task.labeled and task.metric == "loss" and task.num_labels == 0
    texts = sorted(task.train.text + task.test.text)
    assert texts == sorted(["first sample", "second one, with a comma", "third", "fourth", "fifth"])
    assert task.train.label is None and task.test.head(1).label is None


def test_unlabeled_task_refuses_a_classification_metric(tmp_path) -> None:
    path = tmp_path / "plain.txt"
    path.write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(ValueError, match="task 'u' has no labels, so its metric cannot be 'mcc'"):
        parse_task_spec(str(path), name="u", metric="mcc")
    with pytest.raises(ValueError, match="column 'target' for label not found"):
        load_task("u", b"text\na\nb\nc\n", fmt="csv", label="target")


def test_metric_of_a_task_spec() -> None:
    task = parse_task_spec("demo:sentiment", name="s", metric="mcc")
    assert task.metric == "mcc" and task.name == "s"
    assert parse_task_spec("demo:sentiment", metric="loss").metric == "loss"
    with pytest.raises(ValueError, match="metric 'auc' of task 's' is unknown: allowed are accuracy, mcc, f1, loss"):
        parse_task_spec("demo:sentiment", name="s", metric="auc")


# --------------------------------------------------------------------------- data files

GOOD = "text,label\ngreat film,pos\nawful plot,neg\nloved it,pos\nboring,neg\n"


def _sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no room on disk."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


#: (case, load() -> anything, expected DataError message). ``load_task`` on bytes names the
#: source "upload"; the task is called "t"; a single file is split 80/20 (seed 0).
DATA_CASES: list[tuple[str, Callable[[Path], object], str | re.Pattern]] = [
    ("not UTF-8", lambda p: load_task("t", "text,label\ncafé,0\n".encode("latin-1"), fmt="csv"),
     "upload: not UTF-8 text (byte 14); save the file as UTF-8"),
    ("UTF-16", lambda p: load_task("t", GOOD.encode("utf-16"), fmt="csv"),
     "upload: not UTF-8 text (byte 0); save the file as UTF-8"),
    ("empty file", lambda p: load_task("t", b"", fmt="csv"), "upload: the file is empty"),
    ("blank lines only", lambda p: load_task("t", b" \n\n\t\n", fmt="jsonl"), "upload: the file is empty"),
    ("header only", lambda p: load_task("t", b"text,label\n", fmt="csv"), "upload: no rows"),
    ("misnamed text column", lambda p: load_task("t", GOOD.replace("text,", "sentence,").encode(), fmt="csv"),
     "t train: column 'text' for text not found; columns are ['sentence', 'label']"),
    ("missing label column named otherwise", lambda p: load_task("t", b"text\na\nb\nc\n", fmt="csv", label="y"),
     "t train: column 'y' for label not found; columns are ['text']"),
    ("text column all blank", lambda p: load_task("t", b"text,label\n ,0\n ,1\n ,0\n", fmt="csv"),
     "t train: column 'text' is empty"),
    ("one class only", lambda p: load_task("t", _csv([("a", 1), ("b", 1), ("c", 1), ("d", 1)]), fmt="csv"),
     "task 't' train split has only one class"),
    ("fractional labels", lambda p: load_task("t", _csv([("a", 0.5), ("b", 1.5), ("c", 0.5), ("d", 1.5)]), fmt="csv"),
     "t: label '0.5' is not an integer; labels must be integers 0..K-1 or class names"),
    ("infinite label", lambda p: load_task("t", _csv([("a", "inf"), ("b", 1), ("c", 0), ("d", 1)]), fmt="csv"),
     "t: label 'inf' is not an integer; labels must be integers 0..K-1 or class names"),
    ("negative label", lambda p: load_task("t", _csv([("a", -2), ("b", 1), ("c", 0), ("d", 1)]), fmt="csv"),
     "t: label -2 is negative; labels must be 0..K-1"),
    ("label 10^12 (10^12 classes)", lambda p: load_task("t", _csv([("a", 10**12), ("b", 1), ("c", 0), ("d", 1)]), fmt="csv"),
     "t: label 1000000000000 is outside 0..999; at most 1000 classes are supported"),
    ("label 1e300", lambda p: load_task("t", _csv([("a", "1e300"), ("b", 1), ("c", 0), ("d", 1)]), fmt="csv"),
     "t: label 1e+300 is outside 0..999; at most 1000 classes are supported"),
    ("label outside the given names", lambda p: load_task("t", _csv([("a", 0), ("b", 1), ("c", 3), ("d", 1)]), fmt="csv",
                                                          label_names=["neg", "pos"]),
     "t: label 3 is outside 0..1"),
    ("empty label cell", lambda p: load_task("t", _csv([("a", 0), ("b", ""), ("c", 0), ("d", 1)]), fmt="csv",
                                             test_fraction=0.25),
     "t train: column 'label' has empty labels (1, the first in data row 2)"),
    ("labels mix numbers and names", lambda p: load_task("t", _csv([("a", 0), ("b", "pos"), ("c", 0), ("d", 1)]), fmt="csv"),
     "t: labels mix numbers and names; use integers 0..K-1 or names"),
    ("text column taken as labels", lambda p: load_task(
        "t", _csv([(f"text {i}", f"text {i}") for i in range(1300)]), fmt="csv"),
     "t: the label column has 1040 distinct values; at most 1000 classes are supported (is it the right column?)"),
    ("test label unseen in train", lambda p: load_task("t", _csv([("a", "pos"), ("b", "neg")]), _csv([("c", "meh")]), fmt="csv"),
     "t: test labels ['meh'] do not occur in train"),
    ("JSONL: label a list", lambda p: load_task(
        "t", b'{"text": "a", "label": [1]}\n{"text": "b", "label": 0}\n{"text": "c", "label": 1}\n', fmt="jsonl",
        test_fraction=0.34),
     "t train: label [1] (data row 1) is not a number or a class name"),
    ("JSONL: line not an object", lambda p: load_task("t", b'{"text": "a", "label": 0}\n[1, 2]\n', fmt="jsonl"),
     "upload: line 2 is not a JSON object"),
    ("JSONL: malformed line", lambda p: load_task("t", b'{"text": "a", "label": 0}\n{"text": "b",\n', fmt="jsonl"),
     "upload: cannot parse as JSONL: line 2: Expecting property name enclosed in double quotes"),
    ("JSONL: nested 100k deep", lambda p: load_task("t", b"[" * 100_000, fmt="jsonl"),
     "upload: cannot parse as JSONL: line 1 is nested too deeply"),
    ("CSV: ragged rows", lambda p: load_task("t", b'text,label\na,0\nb,1,2,3\n', fmt="csv"),
     "upload: cannot parse as CSV: Error tokenizing data. C error: Expected 2 fields in line 3, saw 4"),
    ("upload over the size cap", lambda p: read_table(b"a" * (MAX_DATA_BYTES + 1), fmt="csv"),
     "upload: larger than 50 MiB"),
    ("file over the size cap", lambda p: read_table(_sparse(p / "big.csv", MAX_DATA_BYTES + 1)),
     "data file 'big.csv' is larger than 50 MiB"),
    ("unknown file type", lambda p: read_table(_file(p / "data.xlsx", b"PK")),
     "data file 'data.xlsx': unknown type '.xlsx'; use .csv, .jsonl or .txt"),
]


@pytest.mark.parametrize(("case", "load", "expected"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_broken_data(case, load, expected, tmp_path):
    with pytest.raises(DataError) as caught:
        load(tmp_path)
    assert_message(str(caught.value), expected)


def test_data_warnings_long_texts_and_duplicates():
    long = "word " * 1200  # 6000 characters
    data = f"text,text_pair,label\n{long},{long},0\nb,x,1\nc,y,0\nd,z,1\nb,x,1\n".encode()
    test = b"text,text_pair,label\ne,f,0\ng,h,1\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = load_task("t", data, test, fmt="csv")
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert messages == [
        "t train: 2 texts longer than 5000 characters were cut",
        "task 't': 1 duplicate training rows",
    ]
    assert len(task.train.text[0]) == 5000 and len(task.train.text_pair[0]) == 5000


# --------------------------------------------------------------------------- property tests


CELL = st.one_of(
    st.text(max_size=12),
    st.integers(-3, 1200).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "pos", "neg", "0", "1", "nan", "NA", '"', "a,b", "1e400", "\u00e9"]),
)
COLUMNS = st.lists(st.sampled_from(["text", "label", "text_pair", "sentence", "x", ""]), min_size=1, max_size=4)


@st.composite
def csv_files(draw) -> bytes:
    encoding = "utf-8"
    if draw(st.booleans()):  # any columns, any cells, any encoding
        columns = draw(COLUMNS)
        rows = draw(st.lists(st.lists(CELL, min_size=len(columns), max_size=len(columns) + 1), max_size=12))
        encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    else:  # the right columns, both classes, now and then a bad label: many of these give a task
        columns = draw(st.sampled_from([["text", "label"], ["label", "text", "text_pair"]]))
        scheme = draw(st.sampled_from([["0", "1", "2"], ["0", "1.0"], ["pos", "neg"]]))
        bad = st.sampled_from(["-1", "", "1.5", "pos", "3", "x" * 6000, "inf", "1e300", "5000"])
        label = st.one_of(*[st.just(x) for x in scheme] * 3, bad)
        text = st.text(min_size=1, max_size=10) | st.just("x" * 6000)

        def row(y):
            return [y if c == "label" else draw(text) for c in columns]

        rows = [row(draw(label)) for _ in range(draw(st.integers(0, 12)))]
        rows += [row(scheme[0]), row(scheme[1]), row(scheme[0]), row(scheme[1])]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue().encode(encoding, "replace")


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2000) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def jsonl_files(draw) -> bytes:
    if draw(st.booleans()):  # any keys, any values
        keys = st.sampled_from(["text", "label", "text_pair", "y"])
        rows = draw(st.lists(st.one_of(st.dictionaries(keys, JSON_VALUE, max_size=4), JSON_VALUE), max_size=10))
    else:  # text and label in every row, now and then an odd value
        scheme = draw(st.sampled_from([[0, 1], ["pos", "neg"], [True, False]]))
        odd = JSON_VALUE
        rows = [
            {"text": draw(st.text(min_size=1, max_size=8) | odd), "label": draw(st.sampled_from(scheme) | odd)}
            for _ in range(draw(st.integers(0, 8)))
        ]
        rows += [{"text": f"t{i}", "label": scheme[i % 2]} for i in range(4)]
    lines = [json.dumps(r) for r in rows]
    if draw(st.integers(0, 3)) == 0:  # a line nested deeper than Python's recursion limit
        lines.insert(0, "[" * draw(st.integers(1000, 5000)))
    if draw(st.booleans()) and lines:  # a torn line
        lines[-1] = lines[-1][: draw(st.integers(0, len(lines[-1])))]
    return "\n".join(lines).encode()


def _task_invariants(task) -> None:
    assert len(task.train) > 0 and len(task.test) > 0
    for split in (task.train, task.test):
        assert all(isinstance(t, str) and len(t) <= 5000 for t in split.text)
    if not task.labeled:  # a file of texts without a label column: plain texts, scored by their loss
        assert task.metric == "loss" and task.train.label is None and task.test.label is None
        return
    k = task.num_labels
    assert k >= 2
    for split in (task.train, task.test):
        assert split.label.dtype == np.int64 and ((split.label >= 0) & (split.label < k)).all()


FORMATS = st.sampled_from(["csv", "jsonl"])


@PROPERTY
@given(sample=st.one_of(st.tuples(st.binary(max_size=600), FORMATS), st.tuples(csv_files(), st.just("csv")),
                        st.tuples(jsonl_files(), st.just("jsonl")), st.tuples(csv_files() | jsonl_files(), FORMATS)))
def test_random_bytes_csv_and_jsonl_give_a_task_or_a_data_error(sample):
    data, fmt = sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            task = load_task("t", data, fmt=fmt)
        except DataError as err:
            assert str(err) and "\n" not in str(err)
            return
    _task_invariants(task)
