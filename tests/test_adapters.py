"""Adapters (:mod:`osrm_core.adapters`) loaded from hostile and broken inputs: damaged configs,
tensors and zips, each with its exact message (a table, the one in README.md, "Security model"),
and random zips thrown at ``load_adapter`` (hypothesis)."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _helpers import (
    A0,
    B0,
    MEMBER,
    PICKLE_MESSAGE,
    PROPERTY,
    Q0,
    _all_files,
    _bad_crc,
    _file,
    _flip,
    _nan_at,
    _pickled,
    _pop,
    _random_zip,
    _set,
    _zip,
    _zip_of,
    assert_message,
    folder_files,
    full,
    variant,
)
from conftest import TINY_TARGETS
from hypothesis import given
from hypothesis import strategies as st

from osrm_core import load_adapter
from osrm_core.adapters import PEFT_PREFIX, AdapterError

BIG = 10 * 1024 * 1024

#: (case, make(good, dest) -> path to load, expected message). Every path is loaded with
#: ``load_adapter(path, tiny base model)``.
ADAPTER_CASES: list[tuple[str, Callable[[Path, Path], Path], str | re.Pattern]] = [
    ("pickled adapter_model.bin", _pickled, PICKLE_MESSAGE.format("x")),
    ("no adapter_config.json", lambda g, d: variant(g, d, drop=("adapter_config.json",)),
     "x: no adapter_config.json; is this a PEFT adapter folder?"),
    ("no weights", lambda g, d: variant(g, d, drop=("adapter_model.safetensors",)),
     "x: no adapter_model.safetensors"),
    ("config not JSON", lambda g, d: variant(g, d, files={"adapter_config.json": b"{r: 2"}),
     "x: adapter_config.json is not valid JSON (Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1))"),
    ("config a list", lambda g, d: variant(g, d, files={"adapter_config.json": b"[1, 2]"}),
     "x: adapter_config.json must hold a JSON object"),
    ("config nested 100k deep", lambda g, d: variant(g, d, files={"adapter_config.json": b"[" * 100_000}),
     "x: adapter_config.json is nested too deeply"),
    ("peft_type prefix tuning", lambda g, d: variant(g, d, config={"peft_type": "PREFIX_TUNING"}),
     "x: peft_type is 'PREFIX_TUNING'; only LORA is supported"),
    ("r missing", lambda g, d: variant(g, d, config={"r": ...}),
     "x: adapter_config.json field 'r' is missing; it must be a positive integer"),
    ("r = 0", lambda g, d: variant(g, d, config={"r": 0}),
     "x: adapter_config.json field 'r' is 0; it must be a positive integer"),
    ("r a string", lambda g, d: variant(g, d, config={"r": "2"}),
     "x: adapter_config.json field 'r' is '2'; it must be a positive integer"),
    ("r = true", lambda g, d: variant(g, d, config={"r": True}),
     "x: adapter_config.json field 'r' is True; it must be a positive integer"),
    ("r does not match the tensors", lambda g, d: variant(g, d, config={"r": 4}),
     f"x: layer '{Q0}' has rank 2 but adapter_config.json says r=4"),
    ("rank_pattern not numbers", lambda g, d: variant(g, d, config={"rank_pattern": {"query": "big"}}),
     "x: adapter_config.json field 'rank_pattern' must map module names to positive integers"),
    ("lora_alpha a string", lambda g, d: variant(g, d, config={"lora_alpha": "16"}),
     "x: adapter_config.json field 'lora_alpha' is '16'; it must be a positive number"),
    ("lora_alpha NaN", lambda g, d: variant(g, d, files={"adapter_config.json": json.dumps(
        {**json.loads((g / "adapter_config.json").read_text()), "lora_alpha": float("nan")}).encode()}),
     "x: adapter_config.json field 'lora_alpha' is nan; it must be a positive number"),
    ("target_modules a number", lambda g, d: variant(g, d, config={"target_modules": 5}),
     "x: adapter_config.json field 'target_modules' is 5; it must be a list of module names or one pattern string"),
    ("target_modules miss a layer", lambda g, d: variant(g, d, config={"target_modules": ["value"]}),
     f"x: layer '{Q0}' is not in adapter_config.json's target_modules ['value']"),
    ("base_model_name_or_path a number", lambda g, d: variant(g, d, config={"base_model_name_or_path": 7}),
     "x: adapter_config.json field 'base_model_name_or_path' is 7; it must be a string"),
    ("DoRA", lambda g, d: variant(g, d, config={"use_dora": True}),
     "x: a DoRA adapter (use_dora: true); only plain LoRA is supported"),
    ("NaN weight", lambda g, d: variant(g, d, edit=_nan_at(B0, float("nan"))),
     f"x: tensor '{B0}' has NaN or Inf values"),
    ("Inf weight", lambda g, d: variant(g, d, edit=_nan_at(A0, float("inf"))),
     f"x: tensor '{A0}' has NaN or Inf values"),
    ("integer weight", lambda g, d: variant(g, d, edit=_set(A0, torch.zeros(2, 32, dtype=torch.int32))),
     f"x: tensor '{A0}' is not floating point (torch.int32)"),
    ("lora_A without lora_B", lambda g, d: variant(g, d, edit=_pop(B0)),
     f"x: layer '{Q0}' has lora_A but no lora_B"),
    ("lora_B without lora_A", lambda g, d: variant(g, d, edit=_pop(A0)),
     f"x: layer '{Q0}' has lora_B but no lora_A"),
    ("no LoRA weights", lambda g, d: variant(g, d, state={"base_model.model.classifier.weight": torch.zeros(2, 32)}),
     "x: no LoRA weights (lora_A/lora_B) found"),
    ("A and B ranks differ", lambda g, d: variant(g, d, edit=_set(A0, torch.zeros(3, 32))),
     f"x: size mismatch for layer '{Q0}': lora_A (3, 32), lora_B (32, 2)"),
    ("layer not in the base model", lambda g, d: variant(g, d, config={"target_modules": ["attn"]}, state={
        f"{PEFT_PREFIX}bert.encoder.layer.9.attn.lora_A.weight": torch.zeros(2, 32),
        f"{PEFT_PREFIX}bert.encoder.layer.9.attn.lora_B.weight": torch.zeros(32, 2)}),
     "x: layer 'bert.encoder.layer.9.attn' does not exist in the base model (the adapter names base model 'tiny-bert')"),
    ("layer not linear", lambda g, d: variant(g, d, config={"target_modules": ["LayerNorm"]}, state={
        f"{PEFT_PREFIX}bert.embeddings.LayerNorm.lora_A.weight": torch.zeros(2, 32),
        f"{PEFT_PREFIX}bert.embeddings.LayerNorm.lora_B.weight": torch.zeros(32, 2)}),
     "x: layer 'bert.embeddings.LayerNorm' of the base model is a LayerNorm, not a linear layer"),
    ("adapter of another model", lambda g, d: variant(g, d, config={"target_modules": ["query"]}, state={
        f"{PEFT_PREFIX}{Q0}.lora_A.weight": torch.zeros(2, 48),
        f"{PEFT_PREFIX}{Q0}.lora_B.weight": torch.zeros(48, 2)}),
     f"x: size mismatch for layer '{Q0}': adapter is 48x48, the base model's layer is 32x32 "
     "(the adapter names base model 'tiny-bert')"),
    ("head tensor that is no parameter", lambda g, d: variant(g, d, edit=_set(
        f"{PEFT_PREFIX}classifier.forward", torch.zeros(2, 32))),
     "x: tensor 'classifier.forward' is neither a LoRA weight nor a parameter of the base model"),
    ("head of another width", lambda g, d: variant(g, d, edit=_set(
        f"{PEFT_PREFIX}classifier.weight", torch.zeros(2, 48))),
     "x: size mismatch for head 'classifier.weight': (2, 48) vs (2, 32) in the base model"),
    ("damaged safetensors", lambda g, d: variant(g, d, files={"adapter_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"}),
     full(r"x: adapter_model\.safetensors is damaged \(.+\)")),
    ("missing path", lambda g, d: d / "nowhere",
     full(r"adapter '.*/x/nowhere' does not exist")),
    ("a file that is not a zip", lambda g, d: _file(d.parent / "notes.txt", b"hi"),
     "notes.txt: must be a PEFT adapter folder or a .zip of one"),
    ("zip: not a zip", lambda g, d: _file(d.with_suffix(".zip"), b"PK\x03\x04 broken"),
     "x.zip: not a valid zip archive"),
    ("zip: member with ..", lambda g, d: _zip(d, {"../evil": b"1"}),
     "x.zip: archive member '../evil' leaves the archive folder ('..')"),
    ("zip: nested ..", lambda g, d: _zip(d, {"a/../../evil": b"1"}),
     "x.zip: archive member 'a/../../evil' leaves the archive folder ('..')"),
    ("zip: absolute path", lambda g, d: _zip(d, {"/etc/cron.d/evil": b"1"}),
     "x.zip: archive member '/etc/cron.d/evil' has an absolute path"),
    ("zip: drive letter", lambda g, d: _zip(d, {"C:/evil": b"1"}),
     "x.zip: archive member 'C:/evil' has an absolute path"),
    ("zip: backslash", lambda g, d: _zip(d, {"a\\..\\evil": b"1"}),
     "x.zip: archive member 'a\\\\..\\\\evil' contains a backslash"),
    ("zip: symbolic link", lambda g, d: _zip_of(g, d, links=("adapter/link",)),
     "x.zip: archive member 'adapter/link' is a symbolic link"),
    ("zip: bomb", lambda g, d: _zip(d, {"adapter/adapter_model.safetensors": b"\x00" * BIG}, deflate=True),
     full(r"x\.zip: archive member 'adapter/adapter_model\.safetensors' is compressed \d+:1; "
          r"at most 200:1 is allowed \(a zip bomb\?\)")),
    ("zip: damaged member", _bad_crc,
     "x.zip: the archive is damaged (Bad CRC-32 for file 'adapter/adapter_config.json')"),
    ("zip: name too long", lambda g, d: _zip(d, {"a" * 300: b"1"}),
     f"x.zip: archive member '{'a' * 77}...' cannot be written (File name too long)"),
    ("zip: no adapter inside", lambda g, d: _zip(d, {"readme.txt": b"hi"}),
     "x.zip: the archive holds no adapter_config.json"),
    ("zip: two adapters", lambda g, d: _zip(d, {**folder_files(g, "a/"), **folder_files(g, "b/")}),
     "x.zip: the archive holds 2 folders with adapter_config.json; upload one per archive"),
    ("zip: pickled inside", lambda g, d: _zip(d, folder_files(_pickled(g, d))),
     PICKLE_MESSAGE.format("x.zip")),
]


@pytest.mark.parametrize(("case", "make", "expected"), ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_hostile_adapters(case, make, expected, good_adapter, base, tmp_path):
    path = make(good_adapter, tmp_path / "x")
    with pytest.raises(AdapterError) as caught:
        load_adapter(path, base)
    assert_message(str(caught.value), expected)
    assert isinstance(caught.value, ValueError)


def test_good_adapter_loads_and_pickle_only_on_request(good_adapter, base, tmp_path):
    adapter = load_adapter(good_adapter, base)
    assert sorted(adapter.layers) == sorted(TINY_TARGETS) and adapter.config["r"] == 2
    from_zip = load_adapter(_zip_of(good_adapter, tmp_path / "good"), base)
    torch.testing.assert_close(from_zip.layers[Q0].delta, adapter.layers[Q0].delta, rtol=0, atol=0)
    pickled = load_adapter(_pickled(good_adapter, tmp_path / "p"), base, allow_pickle=True)
    torch.testing.assert_close(pickled.layers[Q0].delta, adapter.layers[Q0].delta, rtol=0, atol=0)
    # weights_only=True: a pickle that would build an arbitrary object is refused even then.
    evil = variant(good_adapter, tmp_path / "evil", drop=("adapter_model.safetensors",))
    torch.save({"x": Path("/")}, evil / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"^evil: adapter_model\.bin cannot be loaded safely \(.+"):
        load_adapter(evil, base, allow_pickle=True)


@pytest.fixture(scope="module")
def good_parts(good_adapter) -> tuple[bytes, bytes]:
    return (good_adapter / "adapter_config.json").read_bytes(), (good_adapter / "adapter_model.safetensors").read_bytes()


@PROPERTY
@given(members=st.lists(MEMBER, max_size=3), with_config=st.sampled_from(["good", "random", "none"]),
       with_weights=st.sampled_from(["good", "damaged", "random", "none"]), flips=st.lists(st.integers(0, 10**6), max_size=4),
       junk=st.binary(max_size=200), allow_pickle=st.booleans())
def test_random_zips_through_load_adapter(base, good_parts, members, with_config, with_weights, flips, junk, allow_pickle):
    config = {"good": good_parts[0], "random": junk, "none": None}[with_config]
    weights = {"good": good_parts[1], "damaged": _flip(good_parts[1], flips), "random": junk, "none": None}[with_weights]
    data = _random_zip(members, config, weights)
    if with_weights != "damaged":
        data = _flip(data, flips[:1])
    with tempfile.TemporaryDirectory() as sandbox:
        sandbox = Path(sandbox)
        (sandbox / "upload").mkdir()
        (sandbox / "tmp").mkdir()
        path = sandbox / "upload" / "up.zip"
        path.write_bytes(data)
        saved = tempfile.tempdir
        tempfile.tempdir = str(sandbox / "tmp")  # where load_adapter's private folder goes
        try:
            load_adapter(path, base, allow_pickle=allow_pickle)
        except AdapterError as err:
            assert str(err).startswith("up.zip: ") and "\n" not in str(err)
        finally:
            tempfile.tempdir = saved
        assert _all_files(sandbox) == [sandbox / "tmp", sandbox / "upload", path]  # nothing left behind
