"""The Home page's settings form as one table: each :class:`FormField` maps a ``RunConfig`` field
(a dotted path) to its ``home_*`` widget, label, help and kind. :func:`config_to_form` (a preset
into the widgets), :func:`settings_widgets` (the widgets) and :func:`form_to_config` (the
widgets into a config) all read it, so a new setting is one row here. Per-init settings (one
row of widgets per selected init), the merge methods' parameters and the inits' own options
come from their registries in the same way."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import streamlit as st

from osrm_core.constraints import CONSTRAINTS
from osrm_core.inits import INITS
from osrm_core.merge import MERGE_METHODS, all_param_specs
from osrm_core.settings import ConfigError, RunConfig, demo_config, merge_ready_config, parse_values

Kind = Literal["int", "float", "optional_int", "optional_float", "words", "numbers", "values", "choice", "choices"]


@dataclass(frozen=True)
class FormField:
    """One setting of the form: ``path`` in ``RunConfig`` (``train.steps``), its widget
    ``key``, ``label``, ``kind`` (how the value shows in the widget and comes back: ``optional_*``
    shows None as 0, ``words`` a list as comma-separated text, ``numbers`` and ``values`` a sweep
    list), the number range and step or the choices, whether it sits in "More settings", and the
    number format."""

    path: str
    key: str
    label: str
    kind: Kind
    low: float | None = None
    high: float | None = None
    step: float | None = None
    options: tuple = ()
    help: str | None = None
    more: bool = False
    format: str | None = None


def parse_numbers(text: str, what: str) -> list[float]:
    """Comma-separated numbers (:func:`osrm_core.settings.parse_values`); ConfigError naming
    ``what`` when a value is not a number or none is given."""
    values = parse_values(text)
    words = [v for v in values if not isinstance(v, float)]
    if words or not values:
        found = f" ({words[0]!r} is not one)" if words else ""
        raise ConfigError(f"{what} {text!r}: give numbers separated by commas{found}")
    return values


#: The merge methods' parameters besides density (which has its own list), each a sweep list.
OTHER_PARAMS = [spec for spec in all_param_specs().values() if spec.name != "density"]

FORM: tuple[FormField, ...] = (
    FormField("rank", "home_rank", "LoRA rank r", "int", 1, 256, 1),
    FormField("alpha", "home_alpha", "alpha", "float", 0.1, 1024.0, 1.0),
    FormField("samples", "home_samples", "Samples per task for the statistics", "int", 1, 100_000, 16),
    FormField("target_modules", "home_targets", "Target modules (comma separated; empty: by architecture)", "words"),
    FormField("train.steps", "home_steps", "Training steps", "int", 1, 100_000, 10),
    FormField("train.lr", "home_lr", "Learning rate", "float", 1e-6, 1.0, 1e-4, format="%.1e"),
    FormField("train.batch_size", "home_batch", "Batch size", "int", 1, 1024, 1),
    FormField("seed", "home_seed", "Seed", "int", 0, 2**31 - 1, 1),
    FormField("inits", "home_inits", "Inits", "choices", options=tuple(INITS),
              help="; ".join(f"{n}: {m.description}" for n, m in INITS.items())),
    FormField("merge.methods", "home_methods", "Merge methods", "choices", options=tuple(MERGE_METHODS)),
    FormField("merge.lambdas", "home_lambdas", "Lambda grid", "numbers"),
    FormField("max_length", "home_max_length", "Max tokens per example", "int", 2, 4096, 8, more=True),
    FormField("max_test", "home_max_test", "Test examples per task (0: all)", "optional_int", 0, 1_000_000, 50,
              more=True),
    FormField("merge.densities", "home_densities", "Densities (TIES/DARE)", "numbers", more=True),
    FormField("train.constraint", "home_constraint", "Constraint during training", "choice",
              options=tuple(CONSTRAINTS), more=True),
    FormField("osrm_weighting", "home_weighting", "OSRM weighting of the other tasks", "choice",
              options=("equal", "tokens"), more=True),
    FormField("device", "home_device", "Device", "choice", options=("cpu", "auto", "cuda", "mps"), more=True),
    FormField("train.head_lr", "home_head_lr", "Head learning rate (0: the LoRA learning rate)", "optional_float",
              0.0, 1.0, 1e-3, more=True, format="%.1e"),
    FormField("train.penalty_beta", "home_penalty_beta", "Penalty weight beta (penalty, penalty_ratio)", "float",
              0.0, 1e6, 1e-3, more=True, format="%.1e"),
    FormField("train.b_density", "home_b_density", "sparse_B: share of B's entries kept", "float", 0.0, 1.0, 0.05,
              more=True),
    FormField("train.calibration", "home_calibration", "sparse_B: share of the steps before B's mask is fixed",
              "float", 0.0, 1.0, 0.05, more=True),
    *(FormField(f"merge.params.{s.name}", f"home_param_{s.name}",
                f"Sweep {s.name} (comma separated; empty: {s.default})", "values", help=s.help, more=True)
      for s in OTHER_PARAMS),
)

#: Settings without a widget: they keep the preset's (or the opened config's) value.
NO_WIDGET = ("a_scale", "device_map", "stats_dtype", "layers_per_pass", "train.a_lr_scale", "train.weight_decay",
             "train.warmup_ratio", "train.max_grad_norm", "train.eval_batch_size", "train.length_group")

#: An init's own settings (``per_init``): a widget per selected init; empty takes the run's.
PER_INIT: dict[str, dict[str, Any]] = {
    "rank": {"label": "rank", "low": 1, "high": 256, "step": 1},
    "alpha": {"label": "alpha", "low": 0.1, "high": 1024.0, "step": 1.0},
    "constraint": {"label": "constraint", "options": list(CONSTRAINTS)},
    "lr": {"label": "learning rate", "low": 1e-6, "high": 1.0, "step": 1e-4, "format": "%.1e"},
    "a_lr_scale": {"label": "lr scale of A", "low": 0.0, "high": 1000.0, "step": 0.5},
}


def _get(data: Mapping, path: str, default=None):
    for part in path.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return default
        data = data[part]
    return data


def _to_widget(f: FormField, value):
    if f.kind in ("optional_int", "optional_float"):
        return (int if f.kind == "optional_int" else float)(value or 0)
    if f.kind == "float":
        return float(value)
    if f.kind == "words":
        return ", ".join(value or [])
    if f.kind == "numbers":
        return ", ".join(f"{x:g}" for x in value)
    if f.kind == "values":
        return ", ".join(str(v) for v in value or [])
    return list(value) if f.kind == "choices" else value


def _from_widget(f: FormField, value):
    if f.kind == "int":
        return int(value)
    if f.kind == "float":
        return float(value)
    if f.kind in ("optional_int", "optional_float"):
        return (int if f.kind == "optional_int" else float)(value) or None
    if f.kind == "words":
        return [t.strip() for t in value.split(",") if t.strip()] or None
    if f.kind == "numbers":
        return parse_numbers(value, f.label.lower())
    if f.kind == "values":
        return parse_values(value) or None
    return list(value) if f.kind == "choices" else value


def init_option_key(init: str, name: str) -> str:
    return f"home_init_{init}_{name}"


def config_to_form(config: RunConfig) -> dict[str, Any]:
    """Every widget value of the settings form for ``config`` (a preset or an opened run), by
    widget key; ``home_base`` holds the whole config (the settings without a widget)."""
    data = config.model_dump(mode="json")
    form = {f.key: _to_widget(f, _get(data, f.path)) for f in FORM}
    own_options = getattr(config, "init_params", {})
    for init, entry in INITS.items():
        for spec in getattr(entry, "params", ()):
            form[init_option_key(init, spec.name)] = own_options.get(init, {}).get(spec.name, spec.default)
    return {
        **form,
        "home_base": data,
        "home_model_kind": "packaged" if config.model is None else "hub",
        "home_model_name": config.model or "",
        "home_demo_tasks": [t.spec[5:] for t in config.tasks if t.spec.startswith("demo:")],
        "home_name": config.name,
        "home_per_init": {init: own.model_dump() for init, own in config.per_init.items()},
    }


def form_to_config(form: Mapping[str, Any], *, name: str, model: str | None, tasks: list[dict]) -> RunConfig:
    """The config of the widget values ``form`` (by key, as :func:`config_to_form` gives them),
    on top of ``form["home_base"]``; ConfigError naming the field when a value is not allowed."""
    data = copy.deepcopy(form["home_base"])
    data.update(name=name, model=model, tasks=tasks)
    data["merge"]["params"] = {}
    for f in FORM:
        value = _from_widget(f, form[f.key])
        *parents, last = f.path.split(".")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
        if f.kind == "values" and value is None:
            continue  # a parameter not swept keeps its default
        target[last] = value
    inits = list(form["home_inits"])
    own = {i: {k: v for k, v in form.get("home_per_init", {}).get(i, {}).items() if v is not None} for i in inits}
    data["per_init"] = {i: values for i, values in own.items() if values}
    options = {i: {s.name: form[init_option_key(i, s.name)] for s in getattr(INITS[i], "params", ())} for i in inits}
    # The selected inits' options from their widgets; the others keep the base config's.
    data["init_params"] = {**data.get("init_params", {}), **{i: values for i, values in options.items() if values}}
    return RunConfig.validate_dict(data, where="settings")


#: The preset buttons: key, label, config and what it is.
PRESETS = {
    "home_preset_quick": (
        "Quick preset", demo_config(quick=True),
        "demo_config(quick=True): four demo tasks, 80 steps, standard LoRA (rank 8) against osrm_gen with "
        "A frozen at rank 32. Measured: 17.5 minutes on a 2-core CPU that was busy with other work "
        "(issue 23); less on a quiet machine or a GPU. The run shows its time left as it goes"),
    "home_preset_full": (
        "Full demo preset", demo_config(),
        "demo_config(): four demo tasks, 200 steps, five merge methods, the same two recipes"),
    "home_preset_merge_ready": (
        "Merge-ready preset", merge_ready_config(),
        "merge_ready_config(): osrm_gen with A frozen at rank 32, 1,000 steps, the recipe that merged "
        "best at full length (reports/long-training); about 20 minutes on a 2-core CPU"),
}

def apply_preset(config: RunConfig) -> None:
    """Put a config's values into the settings widgets (a button callback, before they draw)."""
    ss = st.session_state
    for key, value in config_to_form(config).items():
        ss[key] = value
    for key in [k for k in ss if str(k).startswith("home_per_") and k != "home_per_init"]:
        del ss[key]  # the per-init widgets start again from home_per_init


def _widget(f: FormField, where) -> None:
    if f.kind == "choice":
        where.selectbox(f.label, list(f.options), key=f.key, help=f.help)
    elif f.kind == "choices":
        where.multiselect(f.label, list(f.options), key=f.key, help=f.help)
    elif f.kind in ("words", "numbers", "values"):
        where.text_input(f.label, key=f.key, help=f.help)
    else:
        where.number_input(f.label, f.low, f.high, step=f.step, key=f.key, help=f.help, format=f.format)


def settings_widgets() -> None:
    """The settings form: the main settings, then "More settings" with the rest, the per-init
    settings and the selected inits' own options."""
    main = [f for f in FORM if not f.more]
    for start in range(0, len(main), 4):
        for col, f in zip(st.columns(4), main[start:start + 4]):
            _widget(f, col)
    with st.expander("More settings"):
        more = [f for f in FORM if f.more]
        for start in range(0, len(more), 3):
            for col, f in zip(st.columns(3), more[start:start + 3]):
                _widget(f, col)
        inits = list(st.session_state.home_inits)
        per_init_widgets(inits)
        init_option_widgets(inits)
        st.caption("Kept from the preset (no widget): " + ", ".join(NO_WIDGET))


def _per_init_key(init: str, field: str) -> str:
    return f"home_per_{init}_{field}"


def per_init_widgets(inits: list[str]) -> None:
    """One row of widgets per selected init (:data:`PER_INIT`); empty takes the run's.

    The values live in ``home_per_init`` (by init), so an init taken out of the run and put back
    gets its settings back (Streamlit forgets the state of a widget it did not draw)."""
    ss = st.session_state
    saved = ss.setdefault("home_per_init", {})
    st.markdown("**Per-init settings** (empty: the run's; e.g. a higher rank with A frozen for osrm_gen)")
    for init in inits:
        cols = st.columns([1] * (len(PER_INIT) + 1))
        cols[0].markdown(f"`{init}`")
        for col, (field, w) in zip(cols[1:], PER_INIT.items()):
            key = _per_init_key(init, field)
            if key not in ss:
                ss[key] = saved.get(init, {}).get(field)
            if "options" in w:
                col.selectbox(w["label"], w["options"], index=None, key=key, placeholder="run's")
            else:
                col.number_input(w["label"], w["low"], w["high"], value=None, step=w["step"], key=key,
                                 format=w.get("format"), placeholder="run's")
        saved[init] = {field: ss[_per_init_key(init, field)] for field in PER_INIT}


def init_option_widgets(inits: list[str]) -> None:
    """The selected inits' own options (each init registry entry's ``params``, ``ParamSpec``s)."""
    ss = st.session_state
    specs = [(init, spec) for init in inits for spec in getattr(INITS[init], "params", ())]
    cols = st.columns(3) if specs else []
    for k, (init, spec) in enumerate(specs):
        key = init_option_key(init, spec.name)
        ss.setdefault(key, spec.default)
        where = cols[k % 3]
        if spec.choices is not None:
            where.selectbox(f"{init}: {spec.name}", spec.choices, key=key, help=spec.help)
        else:
            low, high = spec.range or (None, None)
            where.number_input(f"{init}: {spec.name}", low, high, key=key, help=spec.help)
