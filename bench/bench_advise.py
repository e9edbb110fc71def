"""Item 7: the merge advisor's latency on the default model, three adapters, 40 sample texts each.

7a. First chart after the last upload: on the Adapter diagnosis page (``AppTest``, as item 5),
    three adapters uploaded as zips, then one labelled CSV of 40 texts per task; the figure is
    the time of the run that follows the last CSV upload, which collects the texts' statistics
    and draws the interference heatmaps (the base model is already loaded by then: it was
    needed to read the adapters). Goal: <= 3 s.
7b. The whole advice: :func:`osrm_core.advisor.advise` with its defaults (task arithmetic and
    TIES, five lambdas, three densities, ``ADVISE_BUDGET`` evaluations of per-adapter weights from
    the best grid point, the finalists on the held-out share) on the same adapters and texts.
    Goal: <= 20 s.

Adapters are random rank-8 adapters on query/value with random heads (``bench_sweep``): the
values do not change the cost. The texts are the demo tasks' (sentiment, topic, question).
"""

from __future__ import annotations

import sys
import time

from bench._common import ROOT, Context, Row, median

TASKS = ("sentiment", "topic", "question")
N_TEXTS = 40


def _inputs(ctx: Context):
    from bench.bench_sweep import make_adapters
    from osrm_core.demo import demo_task

    model, _ = ctx.base_model()
    tasks = [demo_task(t, n_train=N_TEXTS, n_test=10) for t in TASKS]
    return tasks, make_adapters(model, tasks, seed=ctx.seed)


def first_chart_seconds(tasks, adapters) -> float:
    """Seconds of the page run that follows the last sample-file upload (fresh session and caches)."""
    import pandas as pd
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from app_helpers import adapter_zip

    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.run()
    at.switch_page("pages/5_Adapter_diagnosis.py").run()
    up = at.file_uploader(key="diag_files")
    for name, adapter in adapters.items():
        up.upload(f"{name}.zip", adapter_zip(adapter, name), "application/zip")
    at.run()
    for task in tasks[:-1]:
        csv = pd.DataFrame({"text": task.train.text, "label": task.train.label}).to_csv(index=False).encode()
        at.file_uploader(key=f"diag_csv_{task.name}").upload(f"{task.name}.csv", csv, "text/csv")
        at.run()
    last = tasks[-1]
    csv = pd.DataFrame({"text": last.train.text, "label": last.train.label}).to_csv(index=False).encode()
    at.file_uploader(key=f"diag_csv_{last.name}").upload(f"{last.name}.csv", csv, "text/csv")
    start = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(f"diagnosis page: {[e.value for e in at.exception]}")
    if not at.get("plotly_chart"):
        raise RuntimeError("diagnosis page: no chart drawn after the last upload")
    return seconds


def advice_seconds(ctx: Context, tasks, adapters) -> tuple[float, int]:
    import copy

    from osrm_core.advisor import advise

    model, tokenizer = ctx.base_model()
    model = copy.deepcopy(model)  # the search writes merged weights in place
    start = time.perf_counter()
    advice = advise(model, tokenizer, adapters, tasks, max_length=64, seed=ctx.seed)
    return time.perf_counter() - start, advice.evaluations


def run(ctx: Context, items: set[str]) -> list[Row]:
    wanted = items & {"7a", "7b"}
    if not wanted:
        return []
    from streamlit.logger import set_log_level

    set_log_level("error")
    sys.path.insert(0, str(ROOT))
    tasks, adapters = _inputs(ctx)
    rows = []
    if "7a" in wanted:
        ctx.log("7a advisor: first chart after the last upload")
        samples = [round(first_chart_seconds(tasks, adapters), 3) for _ in range(ctx.repeats)]
        rows.append(Row(
            "7a", "advisor: first chart after the last upload (3 adapters, 40 texts each)", median(samples),
            "<=", 3.0, unit="s", ours=median(samples), repeats=ctx.repeats,
            detail="Adapter diagnosis page via AppTest; run after the third CSV upload; default model",
            command=ctx.cmd("7a"), samples={"seconds": samples},
        ))
    if "7b" in wanted:
        ctx.log("7b advisor: whole advice")
        runs = [advice_seconds(ctx, tasks, adapters) for _ in range(ctx.repeats)]
        samples = [round(s, 3) for s, _ in runs]
        rows.append(Row(
            "7b", "advisor: whole advice (3 adapters, 40 texts each)", median(samples), "<=", 20.0, unit="s",
            ours=median(samples), repeats=ctx.repeats,
            detail=f"advise() defaults, max_length 64; {runs[0][1]} evaluations; default model",
            command=ctx.cmd("7b"), samples={"seconds": samples},
        ))
    return rows
