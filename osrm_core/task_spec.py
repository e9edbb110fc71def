"""Task specs, the one way tasks are named on the command line and in configs: ``demo:KEY``
(built-in synthetic tasks), ``hf:DATASET[/CONFIG]:SPLIT``, a folder with ``train.csv`` and
``test.csv``, or one CSV/JSONL file (split 80/20)."""

from __future__ import annotations

from pathlib import Path

from osrm_core.data import DataError, TaskData, load_hf_task, load_task, load_task_dir
from osrm_core.demo import demo_task


def parse_task_spec(spec: str, name: str | None = None, **kwargs) -> TaskData:
    """Resolve a task spec: ``demo:KEY``, ``hf:DATASET[/CONFIG]:SPLIT``, a directory or a file.

    A file is split into train and test; a directory holds ``train.csv``/``test.csv``.
    """
    if spec.startswith("demo:"):
        key = spec[5:]
        task = demo_task(key, **{k: v for k, v in kwargs.items() if k == "seed"})
        if name and name != task.name:
            task.name = name
        return task
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) not in (1, 2) or not parts[0]:
            raise DataError(f"task spec {spec!r}: use hf:DATASET[/CONFIG][:TEST_SPLIT]")
        dataset, _, config = parts[0].partition("/")
        test_split = parts[1] if len(parts) == 2 else "test"
        return load_hf_task(name or dataset.replace("/", "_"), dataset, config or None, test_split=test_split)
    path = Path(spec)
    task_name = name or path.stem
    if path.is_dir():
        return load_task_dir(task_name, path, **kwargs)
    if not path.exists():
        raise DataError(
            f"task spec {spec!r} is neither demo:KEY, hf:DATASET, a directory nor an existing file"
        )
    return load_task(task_name, path, **kwargs)
