"""Reports written while training: the table of the best validation epoch and the curve.

`ValidationReport` remembers the best validation metrics and every epoch's metrics itself
(and checkpoints them) so a resumed run reports the best epoch and the learning curve of the
whole run, not of its own part.
"""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events

from scripts.common import MODALITIES, atomic_write_json, atomic_write_text


class ValidationReport:
    """At the end of training, print and save the table of the best validation epoch; after
    every validation, save the learning curve (every epoch's metrics) as JSON.

    Args:
        validator: the validation engine whose metrics are watched.
        output_path: where the table is written (None: printed only).
        name: logger name.
        history_path: where the curve is written after each validation, as
            {"epochs": [{"epoch": e, "val_dsc_<map>": ..., "val_acc_<net>": ...}, ...]}
            (None: not written).
    """

    def __init__(self, validator, output_path: str | None = None, name: str | None = None,
                 history_path: str | None = None):
        self.validator = validator
        self.output_path = output_path
        self.history_path = history_path
        self.logger = logging.getLogger(name or __name__)
        self.best: dict | None = None
        self.history: list[dict] = []

    def attach(self, engine: Engine) -> None:
        self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._remember_best)
        engine.add_event_handler(Events.COMPLETED, self.report)

    def _remember_best(self, validator: Engine) -> None:
        # Compared here rather than read from validator.state so a resumed run (whose new
        # validator starts with no best) keeps the best of the whole run.
        key = validator.state.key_metric_name
        score = float(validator.state.metrics[key])
        row = {"epoch": int(validator.state.epoch), **{k: float(v) for k, v in validator.state.metrics.items()}}
        if self.best is None or score > float(self.best[key]):
            self.best = row
        # a resumed run re-validates no epoch twice, but keep one row per epoch all the same
        self.history = [r for r in self.history if r.get("epoch") != row["epoch"]] + [row]
        if self.history_path:
            atomic_write_json(self.history_path, {"key_metric": key, "epochs": self.history})

    def state_dict(self) -> dict:
        return {"best": self.best or {}, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.best = dict(state.get("best") or {}) or None
        self.history = [dict(r) for r in state.get("history") or []]

    def report(self, engine: Engine) -> None:
        if self.best is None:
            self.logger.warning("no validation ran: no table to report")
            return
        table = format_validation_table(self.best)
        print(table, flush=True)
        if self.output_path:
            atomic_write_text(self.output_path, table + "\n")


def format_validation_table(metrics: dict) -> str:
    """Markdown table: rows = maps (modalities, fused), columns = DSC and slice accuracy."""
    found = {key.split("val_dsc_", 1)[1] for key in metrics if key.startswith("val_dsc_")}
    names = [m for m in MODALITIES if m in found] + sorted(found - set(MODALITIES))
    lines = [
        f"Validation at the best epoch ({metrics.get('epoch', '?')}): per-volume DSC at threshold 0.5",
        "",
        "| map | DSC (%) | slice accuracy (%) |",
        "|---|---|---|",
    ]
    for name in names:
        dsc = 100 * float(metrics[f"val_dsc_{name}"])
        acc = metrics.get(f"val_acc_{name}")
        acc_text = f"{100 * float(acc):.1f}" if acc is not None else "-"
        lines.append(f"| {name} | {dsc:.1f} | {acc_text} |")
    return "\n".join(lines)
