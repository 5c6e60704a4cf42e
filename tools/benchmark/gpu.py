"""The benchmark's `gpu` part (cuda only): every op of one training step audited for CPU
fallbacks and host syncs, attributed to their caller.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from scripts.method.trainer import loss_scalars
from tools.benchmark.core import Row, Settings, build_network, synthetic_batch, verdict
from tools.benchmark.training import make_trainer


def _dispatch_mode_base():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


_HERE = str(Path(__file__).resolve().parent) + "/"  # tools/benchmark/: its frames are not the caller


def _is_view(func) -> bool:
    """True for an op whose outputs alias its inputs without writing (detach, unbind, view)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class DeviceAudit(_dispatch_mode_base()):
    """Every aten op of a training step: CPU fallbacks and host syncs, with their callers.

    A fallback is an op that produces a CPU tensor of at least one slice's size (the transform
    parameters drawn on the CPU by design are far smaller); views (detach, unbind: MONAI's
    decollation of the host batch) compute nothing and are not counted. A host sync is an op
    that turns device data into a Python value or a CPU tensor (.item(), .cpu(), nonzero, ...).
    """

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "unique", "masked_select", "is_nonzero", "equal")
    # From pageable host memory a blocking upload waits for the queued GPU work: a hidden sync.
    UPLOAD_OPS = ("_to_copy", "copy_", "_copy_from", "_copy_from_and_resize")

    def __init__(self, slice_numel: int):
        super().__init__()
        self.slice_numel = slice_numel
        self.ops = 0
        self.fallbacks: Counter = Counter()
        self.syncs: Counter = Counter()
        self.uploads: Counter = Counter()

    @staticmethod
    def _caller() -> str:
        """The innermost frame outside torch and the benchmark itself: who asked for the op."""
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename and not frame.filename.startswith(_HERE):
                return f"{Path(frame.filename).name}:{frame.name}"
        return "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        from_device = any(t.device.type != "cpu" for t in inputs)
        name = func.overloadpacket.__name__
        if name in self.UPLOAD_OPS and any(t.device.type == "cpu" for t in inputs) and \
                any(t.device.type != "cpu" for t in outputs):
            self.uploads[f"{name} from {self._caller()}"] += 1
        elif from_device and (name in self.SYNC_OPS or any(t.device.type == "cpu" for t in outputs)):
            self.syncs[f"{name} from {self._caller()}"] += 1
        elif not _is_view(func) and any(t.device.type == "cpu" and t.numel() >= self.slice_numel for t in outputs):
            self.fallbacks[f"{name} from {self._caller()}"] += 1
        return out


def gpu_path_rows(s: Settings) -> list[Row]:
    if s.device.type == "cpu":
        return [Row("gpu path", "CPU fallbacks / host syncs in the step", "not checked (CPU run)", verdict="n/a")]
    k, size = max(s.ks), s.largest
    trainer = make_trainer(build_network(k, s), synthetic_batch(s.batch_size, k, size), 1, s)
    audit = DeviceAudit(size * size)
    with audit:
        trainer.run()
    logged = len([key for key in loss_scalars(trainer.state.output) if key != "lambda_e"])  # each one .item()
    syncs = sum(audit.syncs.values())
    detail = "; ".join(f"{n}x {what}" for what, n in audit.syncs.most_common(6))
    fallback_detail = "; ".join(f"{n}x {what}" for what, n in audit.fallbacks.most_common(4)) or "none"
    extra = syncs - logged
    return [
        Row("gpu path", f"one step K={k} {size}x{size}: ops producing data-sized CPU tensors",
            f"{sum(audit.fallbacks.values())} of {audit.ops} ops", fallback_detail, "", "0",
            verdict(not audit.fallbacks)),
        Row("gpu path", f"one step K={k} {size}x{size}: host syncs", f"{syncs}", detail,
            f"{logged} logged scalars + {extra} other", "only the logged scalars (and AMP's inf checks)",
            verdict(extra <= (k + 1 if s.amp else 0))),
        Row("gpu path", f"one step K={k} {size}x{size}: host-to-device copies", f"{sum(audit.uploads.values())}",
            "; ".join(f"{n}x {what}" for what, n in audit.uploads.most_common(6)) or "none", "",
            "the batch and the transform's parameters, before the forward", "n/a"),
    ]
