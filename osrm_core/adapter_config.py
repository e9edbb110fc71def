"""The ``adapter_config.json`` of a PEFT LoRA adapter: the fields the workbench relies on, checked
(one line naming the field, the value and what is allowed), and the per-layer rank, alpha and
scale they give."""

from __future__ import annotations

import math

from osrm_core.errors import AdapterError

#: Longest ``rank_pattern``/``alpha_pattern`` key accepted: peft evaluates the keys as regular
#: expressions, and a long hostile one could take exponential time.
MAX_PATTERN_CHARS = 500


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_adapter_config(config, where: str = "adapter") -> None:
    """Check the fields of an ``adapter_config.json`` that this tool relies on.

    ``r`` a positive integer, ``lora_alpha`` a positive number, ``target_modules`` a list of
    names or one pattern string, ``base_model_name_or_path`` a string or null,
    ``rank_pattern``/``alpha_pattern`` maps of names to numbers; LoRA only, no DoRA.
    Raises :class:`AdapterError` naming the field, the value and what is allowed.
    """
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: adapter_config.json must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type is {config.get('peft_type')!r}; only LORA is supported")

    def shown(key: str) -> str:
        return repr(config[key]) if key in config else "missing"

    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{where}: adapter_config.json field 'r' is {shown('r')}; it must be a positive integer")
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha) or alpha <= 0:
        raise AdapterError(
            f"{where}: adapter_config.json field 'lora_alpha' is {alpha!r}; it must be a positive number"
        )
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise AdapterError(
            f"{where}: adapter_config.json field 'target_modules' is {shown('target_modules')}; "
            "it must be a list of module names or one pattern string"
        )
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(
            f"{where}: adapter_config.json field 'base_model_name_or_path' is {base!r}; it must be a string"
        )
    for field_name, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(field_name) or {}
        ok = isinstance(pattern, dict) and all(
            isinstance(k, str)
            and _is_number(v)
            and v > 0
            and (not positive_int or (isinstance(v, int) and not isinstance(v, bool)))
            for k, v in pattern.items()
        )
        if not ok:
            kind = "positive integers" if positive_int else "positive numbers"
            raise AdapterError(
                f"{where}: adapter_config.json field {field_name!r} must map module names to {kind}"
            )
        too_long = [k for k in pattern if len(k) > MAX_PATTERN_CHARS] if isinstance(pattern, dict) else []
        if too_long:
            raise AdapterError(
                f"{where}: adapter_config.json field {field_name!r} has a key of {len(too_long[0])} characters; "
                f"at most {MAX_PATTERN_CHARS} are allowed"
            )
    if config.get("use_dora"):
        raise AdapterError(f"{where}: a DoRA adapter (use_dora: true); only plain LoRA is supported")


def lora_scale(config: dict, layer: str, rank: int) -> float:
    """The LoRA scale of ``layer`` at ``rank``: alpha (its ``alpha_pattern`` value) over the rank, or over its root (rsLoRA)."""
    alpha = pattern_value(config.get("alpha_pattern"), layer, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def pattern_value(pattern: dict | None, layer: str, default):
    """The value of ``layer`` in a ``rank_pattern``/``alpha_pattern``, matched by peft's own rule
    (``peft.utils.other.get_pattern_key``: a key is a regular expression for the name's end)."""
    from peft.utils.other import get_pattern_key

    if not pattern:
        return default
    return pattern.get(get_pattern_key(pattern.keys(), layer), default)


def targets_layer(targets, layer: str) -> bool:
    """Whether a list ``target_modules`` names ``layer`` (peft's rule: the name or a suffix of it).

    A pattern string is not evaluated: a hostile regular expression could take exponential time.
    """
    if isinstance(targets, str):
        return True
    return any(layer == t or layer.endswith("." + t) for t in targets)
