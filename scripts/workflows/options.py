"""Option values checked where the config is read, with the allowed values in the error.

`check_options(**settings)` is an `initialize:` step of train.yaml, evaluate.yaml and
inference.yaml (before any lock, file or network): a value outside its choices or range is
one `OptionError` line naming the option, the value, what is allowed and a value to pass.
`MapEngine` and the stage-2 evaluator call the same functions, so a workflow built in Python
gets the same messages. Without these, `--fusion median` or `--threshold high` ended in two
tracebacks whose last line was a config expression, and `--threshold 1.5` gave empty masks
without a word (the maps lie in [0, 1) and a mask is map > threshold).
"""

from __future__ import annotations

import math

import torch

from scripts.model.cams import FUSIONS, GATE_SOURCES, METHODS, TTA_CHOICES
from scripts.precision import PRECISIONS
from scripts.runtime import BundleError, as_flag

CHOICES: dict[str, tuple] = {
    "method": METHODS,
    "fusion": FUSIONS,
    "gate_source": GATE_SOURCES,
    "tta": TTA_CHOICES,
    "precision": PRECISIONS,
    "serve": ("cam", "stage2", "both"),
    "slice_normalization": ("none", "zscore"),
}
# Probabilities compared with `>`: a value outside [0, 1) keeps everything or nothing.
UNIT_INTERVAL: dict[str, str] = {
    "threshold": "a mask is fused map > threshold and the maps lie in [0, 1)",
    "gate_threshold": "a slice keeps its map when its tumour probability (in [0, 1]) is above it",
    "stage2_threshold": "the stage-2 mask is tumour probability > stage2_threshold",
}
FLAGS = ("gate", "overwrite", "allow_missing", "channels_last", "stage2_write_probability", "choose_fusion")


class OptionError(BundleError, ValueError):
    """An option value outside its choices or range (a ValueError too, for Python callers)."""


def _shown(value) -> str:
    return "None" if value is None else str(value)


def check_choice(name: str, value, allowed) -> None:
    """Raise OptionError when `value` is not one of `allowed`.

    Args:
        name: the option, as on the command line without `--`.
        value: the value given.
        allowed: the allowed values (None allowed = the option can be switched off with None).
    """
    if value in allowed:
        return
    shown = ", ".join(_shown(a) for a in allowed)
    example = next(a for a in allowed if a is not None)
    raise OptionError(f"--{name} must be one of {shown}, got {value!r}. Fix: pass e.g. --{name} {example}"
                      + (" (None switches it off)." if None in allowed else "."))


def check_unit_interval(name: str, value, why: str = "") -> float:
    """The value as a float in [0, 1), or an OptionError saying why that range.

    Args:
        name: the option, as on the command line without `--`.
        value: the value given (a number, or a string that reads as one).
        why: what the option is compared with (for the message).
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (0.0 <= number < 1.0):
        reason = f" ({why}: outside [0, 1) every mask is empty or everything)" if why else ""
        raise OptionError(f"--{name} must be a number in [0, 1), got {value!r}{reason}. Fix: pass e.g. --{name} 0.5.")
    return number


def check_device(device) -> torch.device:
    """The device as a torch.device, or an OptionError when it cannot be used on this machine.

    Args:
        device: a torch.device or its name ("cpu", "cuda:0").
    """
    fix = "Fix: pass --device \"$torch.device('cpu')\", or leave --device out (a GPU when there is one, else the CPU)."
    try:
        parsed = torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise OptionError(f"--device {device!r} is not a device name (e.g. cpu, cuda, cuda:0). {fix}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"--device {parsed} is not available here (torch.cuda.is_available() is False: no CUDA "
                              f"GPU, or a CPU-only PyTorch). {fix}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise OptionError(f"--device {parsed} is not available here (this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s): cuda:0 ... "
                              f"cuda:{torch.cuda.device_count() - 1}). {fix}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"--device {parsed} is not available here (no Apple GPU). {fix}")
    return parsed


def check_options(**settings) -> None:
    """Check each named option against its rule: a choice (`CHOICES`), a probability in [0, 1)
    (`UNIT_INTERVAL`), a yes / no flag (`FLAGS`) or the device. e.g.
    `check_options(fusion=@fusion, threshold=@threshold, device=@device)` in a config's `initialize`.

    Args:
        settings: option name (as on the command line without `--`) -> value; a prefixed name takes
            the rule of the rest (`pseudo_fusion` is a fusion).
    """
    for name, value in settings.items():
        rule = _rule(name)
        if rule in CHOICES:
            check_choice(name, value, CHOICES[rule])
        elif rule in UNIT_INTERVAL:
            check_unit_interval(name, value, UNIT_INTERVAL[rule])
        elif rule in FLAGS:
            as_flag(value, name)
        elif rule == "device":
            check_device(value)
        else:
            raise TypeError(f"check_options has no rule for {name!r}")


def _rule(name: str) -> str:
    """The rule of an option: its own name, else the name after its prefix (`pseudo_fusion` -> `fusion`)."""
    known = (*CHOICES, *UNIT_INTERVAL, *FLAGS, "device")
    if name in known:
        return name
    rest = name.partition("_")[2]
    return rest if rest in known else name
