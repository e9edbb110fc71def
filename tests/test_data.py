"""Tests for tasks and their loaders (:mod:`osrm_core.data`) and batching (:mod:`osrm_core.batching`)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from osrm_core.batching import iter_batches, length_order
from osrm_core.data import (
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
        (CSV, None, "format None is unknown; use 'csv' or 'jsonl'"),
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
    odd = tmp_path / "data.txt"
    odd.write_text("text,label\na,0\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown type '\.txt'; use \.csv or \.jsonl"):
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
