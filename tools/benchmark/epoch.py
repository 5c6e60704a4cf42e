"""The benchmark's `epoch` part: where one real training epoch's time goes.

It runs `configs/train.yaml` itself (through MONAI's `ConfigWorkflow`, as `monai.bundle run
training` does) for one epoch per variant and precision, on the bundle's dataset and volume
cache, and splits the wall time at the events the trainer fires:

| phase | from -> to |
|---|---|
| data | ignite GET_BATCH_STARTED -> GET_BATCH_COMPLETED (sampler, cache reads, collate) |
| forward | ITERATION_STARTED -> FORWARD_COMPLETED (to device, the drawn transform, K forwards over [x; pi(x)]) |
| objective | FORWARD_COMPLETED -> LOSS_COMPLETED (Eq. 8 for every network) |
| gradient shares | `CMERTrainer._record_grad_shares` (one partial backward per term, every `grad_share_interval`) |
| backward | LOSS_COMPLETED -> BACKWARD_COMPLETED, less the gradient shares |
| optimiser | BACKWARD_COMPLETED -> MODEL_COMPLETED |
| validation | the validator's run (every network over every validation volume) |
| other | the rest: handlers (logging, EMA, TensorBoard, progress bar, checkpoints) |

Beside it, the bare networks' forward + backward over the same slices (`BareStep`, timed
alone) times the epoch's steps: what the epoch would cost if nothing but the networks ran.
The first epoch of a fresh process pays oneDNN's primitive creation; it is a real cost of
the main job, so it is kept (a warm-up epoch would double the part's time).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tools.benchmark.core import BUNDLE_ROOT, Row

PHASES = ("data", "forward", "objective", "gradient shares", "backward", "optimiser", "validation", "other")


def parse_variant(text: str) -> dict:
    """'base_channels=8;val_interval=2' -> {'base_channels': 8, 'val_interval': 2} (values as YAML)."""
    import yaml

    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--epoch-variants: {item!r} is not KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


class PhaseClock:
    """Wall-clock seconds per phase of a CMERTrainer's epoch, from the events it fires."""

    def __init__(self):
        import time

        self.now = time.perf_counter
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.marks: dict = {}

    def mark(self, _engine, name: str) -> None:
        self.marks[name] = self.now()

    def span(self, _engine, phase: str, start: str) -> None:
        if start in self.marks:
            self.seconds[phase] += self.now() - self.marks.pop(start)

    def attach(self, trainer, validator) -> None:
        from ignite.engine import Events
        from monai.engines.utils import IterationEvents

        # (event, phase that ends there and the mark it started from, mark set there)
        steps = ((Events.GET_BATCH_STARTED, None, "batch"), (Events.GET_BATCH_COMPLETED, ("data", "batch"), None),
                 (Events.ITERATION_STARTED, None, "iteration"),
                 (IterationEvents.FORWARD_COMPLETED, ("forward", "iteration"), "forwarded"),
                 (IterationEvents.LOSS_COMPLETED, ("objective", "forwarded"), "loss"),
                 (IterationEvents.BACKWARD_COMPLETED, ("backward", "loss"), "backward"),
                 (IterationEvents.MODEL_COMPLETED, ("optimiser", "backward"), None))
        for event, ends, starts in steps:
            if ends:
                trainer.add_event_handler(event, self.span, *ends)
            if starts:
                trainer.add_event_handler(event, self.mark, starts)
        validator.add_event_handler(Events.STARTED, self.mark, "validation")
        validator.add_event_handler(Events.COMPLETED, self.span, "validation", "validation")
        # The gradient shares are measured inside the LOSS -> BACKWARD span: time the call
        # itself (an instance attribute, so only this trainer is wrapped) and move it out.
        measure = trainer._record_grad_shares

        def timed_shares(result):
            start = self.now()
            measure(result)
            spent = self.now() - start
            self.seconds["gradient shares"] += spent
            self.seconds["backward"] -= spent

        trainer._record_grad_shares = timed_shares


def run_epoch(overrides: dict, precision: str, dataset_dir: str, cache_dir: str, work: Path) -> tuple[dict, float, dict]:
    """One epoch of configs/train.yaml with these overrides -> (phase seconds, total, facts)."""
    from monai.bundle import ConfigWorkflow

    settings = {"epochs": 1, "precision": precision, "dataset_dir": dataset_dir, "cache_dir": cache_dir,
                "ckpt_dir": str(work / "models"), "output_dir": str(work / "runs"), "resume": False, **overrides}
    workflow = ConfigWorkflow(config_file=str(BUNDLE_ROOT / "configs" / "train.yaml"), run_id="training",
                              meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"), logging_file=False,
                              bundle_root=str(BUNDLE_ROOT), **settings)
    workflow.initialize()
    parser = workflow.parser
    trainer = parser.get_parsed_content("train#trainer")
    clock = PhaseClock()
    clock.attach(trainer, parser.get_parsed_content("validate#evaluator"))
    start = clock.now()
    workflow.run()
    total = clock.now() - start
    workflow.finalize()
    clock.seconds["other"] = max(total - sum(clock.seconds.values()), 0.0)
    facts = {key: parser.get_parsed_content(key) for key in
             ("base_channels", "spatial_size", "batch_size", "modalities", "grad_share_interval")}
    facts["steps"] = trainer.state.iteration
    return clock.seconds, total, facts


def bare_epoch_seconds(facts: dict, precision: str, s) -> float:
    """The bare networks' forward + backward over the epoch's slices (K nets, 2B per step)."""
    from dataclasses import replace

    from tools.benchmark.core import build_network, synthetic_batch, time_calls
    from tools.benchmark.training import BareStep

    size = facts["spatial_size"][0]
    sp = replace(s, precision=precision, amp=precision != "fp32", base_channels=facts["base_channels"],
                 batch_size=facts["batch_size"])
    k = len(facts["modalities"])
    step = time_calls(BareStep(build_network(k, sp), synthetic_batch(sp.batch_size, k, size), sp), sp)
    return step * facts["steps"]


def epoch_rows(s, variants: list[str], dataset_dir: str | None, cache_dir: str | None,
               progress=lambda message: None) -> list[Row]:
    """Per variant and precision: the phase split of one epoch and its ratio to the bare networks."""
    dataset_dir = dataset_dir or str(BUNDLE_ROOT / "data" / "phantom")
    cache_dir = cache_dir or str(BUNDLE_ROOT / "data" / "cache")
    rows = []
    for variant in variants or [""]:
        overrides = parse_variant(variant)
        name = variant or "as configured"
        for precision in s.precisions:
            with tempfile.TemporaryDirectory(prefix="cmer-epoch-") as tmp:
                progress(f"  epoch: {name}, {precision}")
                seconds, total, facts = run_epoch(overrides, precision, dataset_dir, cache_dir, Path(tmp))
            bare = bare_epoch_seconds(facts, precision, s)
            case = (f"one epoch of configs/train.yaml ({name}; base {facts['base_channels']}, "
                    f"{facts['spatial_size'][0]}x{facts['spatial_size'][1]}, B={facts['batch_size']}, "
                    f"K={len(facts['modalities'])}, {facts['steps']} steps), {precision}")
            split = ", ".join(f"{phase} {sec:.1f} s ({sec / total:.0%})" for phase, sec in seconds.items())
            rows.append(Row("epoch", case, f"{total:.1f} s: {split}",
                            f"bare nets fwd+bwd x {facts['steps']} steps: {bare:.1f} s",
                            f"outside the networks {max(total - bare, 0.0) / total:.0%}"))
            progress(f"  {case}: {total:.1f} s ({split})")
    return rows
