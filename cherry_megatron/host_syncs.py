"""Count the points where the host waits for the accelerator, on any device, CPU included.

On a GPU the host runs ahead of the kernels it queues until something needs a value computed there: a
Python number from a tensor (`.item()`, `int()`, `bool()`), a shape that depends on data (`nonzero`, boolean
indexing, `masked_select`, `unique`), or a copy to host memory. Each such point drains the queue, and a few
per micro-step cost more than the kernels between them. `torch.cuda.set_sync_debug_mode` finds them on a GPU
only; this counter finds the same points on CPU by following where values come from: a tensor made from
Python numbers (`torch.tensor(3.0)`, a capacity computed from shapes) and everything computed from such
tensors alone stays on the host on a GPU too, and reading it costs nothing; everything else would live on
the device. So the count a CPU test asserts is the count a GPU run has.
"""
from __future__ import annotations

import contextlib
import traceback
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# Tensors made from Python data: host-resident on every device.
_HOST_FACTORIES = {aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.scalar_tensor.default}
# Ops whose result (a value or an output shape) the host needs before it can go on.
_SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
          aten.is_nonzero.default, aten.equal.default, aten.bincount.default, aten._unique2.default,
          aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor}
_BOOL_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs() as s: ...` then `s.count`, and `s.sites` (op and calling line -> count)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.sites: Counter = Counter()
        self._quiet = 0
        self._host: dict[int, weakref.ref] = {}  # by id: a tensor's == is elementwise, so no WeakSet

    def _device_born(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._host.get(id(t))
        return ref is None or ref() is not t

    def _record(self, what: str) -> None:
        self.count += 1
        # The innermost caller outside torch: the line that asked for the value.
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename
                  and f.filename != __file__]
        where = "/".join(frames[-1].filename.split("/")[-2:]) + f":{frames[-1].lineno}" if frames else "?"
        self.sites[f"{what} at {where}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if self._quiet:
            pass
        elif func in _SYNCS and any(self._device_born(t) for t in inputs):
            self._record(func.__name__)
        elif func in _BOOL_INDEXING and any(t.dtype == torch.bool and self._device_born(t) for t in inputs):
            self._record(f"{func.__name__} with a bool mask")
        out = func(*args, **kwargs)
        if func in _HOST_FACTORIES or (inputs and not any(self._device_born(t) for t in inputs)):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._host[id(t)] = weakref.ref(t)
        return out

    @contextlib.contextmanager
    def _copies_to_host(self):
        """`.tolist()`, `.numpy()` and `.cpu()` read a CPU tensor's memory without dispatching an op."""
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}

        def wrap(name, fn):
            def read(t, *a, **kw):
                if self._device_born(t):
                    self._record(name)
                return fn(t, *a, **kw)
            return read
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)

    @contextlib.contextmanager
    def _uploads(self):
        """`distributed.to_device` is where a host tensor becomes a device one; on CPU it returns its input, so
        here it returns a copy: the input is marked host-resident, the copy is not."""
        from cherry_megatron import distributed

        original = distributed.to_device

        def upload(t, device):
            self._host[id(t)] = weakref.ref(t)
            out = original(t, device)
            out = t.clone() if out is t else out
            self._host.pop(id(out), None)
            return out
        distributed.to_device = upload
        try:
            yield
        finally:
            distributed.to_device = original

    @contextlib.contextmanager
    def _one_hot_checks(self):
        """`one_hot` with `num_classes` range-checks its input with `.item()` on CPU only; on a GPU the check is
        a device-side assert (aten's one_hot), so those reads are not counted."""
        import torch.nn.functional as F

        original = F.one_hot

        def one_hot(t, num_classes=-1):
            self._quiet += num_classes >= 0
            try:
                return original(t, num_classes)
            finally:
                self._quiet -= num_classes >= 0
        F.one_hot = one_hot
        try:
            yield
        finally:
            F.one_hot = original

    def __enter__(self):
        self._patches = contextlib.ExitStack()
        self._patches.enter_context(self._one_hot_checks())
        self._patches.enter_context(self._copies_to_host())
        self._patches.enter_context(self._uploads())
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()
