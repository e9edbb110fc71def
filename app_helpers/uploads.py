"""Uploaded files: zips of runs and adapters, task files, sample texts, and zips to download."""

from __future__ import annotations

import io
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from osrm_core.adapters import Adapter, load_adapter
from osrm_core.data import DataError, Split, TaskData, from_dataframes
from osrm_core.downloads import safe_name
from osrm_core.runcheck import is_run_file


def zip_directory(path: str | Path) -> bytes:
    """A zip (bytes) of every file under ``path``, with paths relative to its parent."""
    path = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(path.rglob("*")):
            if f.is_file() and is_run_file(f):
                zf.write(f, f.relative_to(path.parent).as_posix())
    return buf.getvalue()


def save_task_dir(task: TaskData, directory: str | Path) -> Path:
    """Write a task as ``train.csv``/``test.csv`` (columns text[, text_pair], label as names)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split_name, split in (("train", task.train), ("test", task.test)):
        df = pd.DataFrame({"text": split.text})
        if split.text_pair is not None:
            df["text_pair"] = split.text_pair
        df["label"] = [task.label_names[int(y)] for y in split.label]
        df.to_csv(directory / f"{split_name}.csv", index=False)
    return directory


def text_task(name: str, texts: Sequence[str], labels: Sequence | None = None) -> TaskData:
    """A task made of sample texts, for statistics (and for a sweep when ``labels`` are given).

    The texts serve as both splits. Without labels the task is unlabeled (metric ``loss``):
    good for statistics and diagnosis, and for a sweep on a causal LM only.
    """
    texts = [str(t) for t in texts]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if len(keep) < 2:
        raise DataError(f"task {name!r}: give at least 2 sample texts")
    texts = [texts[i] for i in keep]
    if labels is None:
        split = Split(texts, None)
        return TaskData(name, split, split, [], metric="loss", source="sample texts")
    labels = [labels[i] for i in keep]
    df = pd.DataFrame({"text": texts, "label": labels})
    task = from_dataframes(name, df, df, text="text", label="label")
    task.test, task.source = task.train, "upload"  # one set of texts: the advisor splits it once
    return task


def read_uploaded_adapters(
    files: Sequence, model, loose_name: str = "adapter"
) -> tuple[dict[str, Adapter], list[str]]:
    """Read uploaded PEFT LoRA adapters with :func:`osrm_core.adapters.load_adapter` (zip
    checks, safetensors only, config validated, every tensor checked against ``model``).

    Parameters
    ----------
    files : sequence of uploaded files (``.name`` and ``.getvalue()``)
        A ``.zip`` of an adapter folder per adapter, or one loose pair of
        ``adapter_config.json`` + ``adapter_model.safetensors``.
    model : nn.Module
        The base model the adapters must fit.
    loose_name : str
        Name of the adapter given as a loose pair.

    Returns
    -------
    (adapters, errors)
        Adapters by name, and one message per upload that could not be used.
    """
    adapters: dict[str, Adapter] = {}
    errors: list[str] = []
    loose: dict[str, list[bytes]] = {}

    def add(name: str, adapter: Adapter, uploaded: str) -> None:
        adapter.source = f"uploaded {uploaded}"  # not the temporary folder it was read from
        key, n = safe_name(name, "adapter"), 2
        while key in adapters:
            key, n = f"{safe_name(name, 'adapter')}_{n}", n + 1
        adapters[key] = adapter

    for f in files:
        name = f.name
        lower = name.lower()
        if lower.endswith(".zip"):
            try:
                # A private folder, removed at once: the upload is a file only while it is read.
                with tempfile.TemporaryDirectory(prefix="osrm-upload-") as tmp:
                    path = Path(tmp) / "upload.zip"
                    path.write_bytes(f.getvalue())
                    add(Path(name).stem, load_adapter(path, model, name=name), name)
            except (ValueError, OSError) as err:
                errors.append(str(err))
        elif lower in ("adapter_config.json", "adapter_model.safetensors"):
            loose.setdefault(lower, []).append(f.getvalue())
        else:
            errors.append(
                f"{name}: not an adapter file; upload a .zip of a PEFT adapter folder, or "
                "adapter_config.json together with adapter_model.safetensors"
            )
    if loose:
        if any(len(v) > 1 for v in loose.values()):
            errors.append(
                "several adapter_config.json or adapter_model.safetensors: upload each further adapter as a zip"
            )
        elif len(loose) < 2:
            missing = {"adapter_config.json", "adapter_model.safetensors"} - set(loose)
            errors.append(
                f"{next(iter(loose))} needs {missing.pop()} beside it (or upload the adapter as a zip)"
            )
        else:
            try:
                with tempfile.TemporaryDirectory(prefix="osrm-upload-") as tmp:
                    for fname, (data,) in loose.items():
                        (Path(tmp) / fname).write_bytes(data)
                    add(loose_name, load_adapter(tmp, model, name=loose_name),
                        "adapter_config.json + adapter_model.safetensors")
            except (ValueError, OSError) as err:
                errors.append(str(err))
    return adapters, errors


def read_hub_adapters(lines: str, model) -> tuple[dict[str, Adapter], list[str]]:
    """Adapters named ``NAME=hf:OWNER/REPO[@REVISION]``, one per line, fetched and checked by
    :func:`osrm_core.adapters.load_adapter`. Returns adapters by name and one message per line
    that could not be used."""
    from osrm_core.adapters import AdapterError

    adapters: dict[str, Adapter] = {}
    errors: list[str] = []
    for line in (x.strip() for x in lines.splitlines()):
        if not line:
            continue
        name, sep, spec = line.partition("=")
        if not sep or not name.strip() or not spec.strip().startswith("hf:"):
            errors.append(f"{line!r}: write NAME=hf:OWNER/REPO or NAME=hf:OWNER/REPO@REVISION")
            continue
        try:
            adapters[safe_name(name.strip(), "adapter")] = load_adapter(spec.strip(), model, name=name.strip())
        except AdapterError as err:
            errors.append(str(err))
    return adapters, errors


def uploads_signature(files: Sequence, *extra: str) -> str:
    """A digest of uploaded files (names and bytes) and extra strings, to key session caches."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.getvalue()).digest())
    for e in extra:
        h.update(b"\x00" + e.encode())
    return h.hexdigest()


def adapter_zip(adapter: Adapter, name: str) -> bytes:
    """A zip of ``adapter`` written as a PEFT adapter folder ``name/``."""
    from osrm_core.adapters import write_adapter

    with tempfile.TemporaryDirectory(prefix="osrm-out-") as tmp:
        folder = Path(tmp) / safe_name(name, "adapter")
        write_adapter(folder, adapter.layers, adapter.config, head=adapter.head)
        return zip_directory(folder)


def merged_adapter_zip(adapters: dict[str, Adapter], name: str, method: str, **options) -> bytes:
    """A zip of the merged adapter folder ``name/`` that
    :func:`osrm_core.workflows.build_merged_adapter` writes (``options``: ``lam``, ``stats``,
    the method's parameters)."""
    from osrm_core.workflows import build_merged_adapter

    with tempfile.TemporaryDirectory(prefix="osrm-out-") as tmp:
        folder, _ = build_merged_adapter(adapters, Path(tmp) / safe_name(name, "merged"), method, **options)
        return zip_directory(folder)
