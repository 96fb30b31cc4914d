"""Both sides of a two-sided step in one forward (`dual_forward`).

The batch goes in twice along dim 0 (the + stream, then the - stream) and every module that holds
trainable parameters runs twice: on the first half with its parameters at theta + eps z, on the
second at theta - eps z. Each side is written into a copy of the parameters as the forward sees
them (under FSDP2 or ZeRO-3: the layer just gathered), with z regenerated for the whole parameter
from (seed, name, element index), so a sharded layer is gathered once for both streams and the
stored shards are never perturbed: they take only the step's update (one pass).

The copies are made as the two-forward step makes its perturbations (w + eps z, then - 2 eps z
from there), so the step's two losses are the same numbers; the update then lands on w itself
rather than on w after the +eps/-2eps/+eps round trip, so later steps agree to rounding, not bit
for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch

from zoscale.engine.perturb import PerturbationEngine
from zoscale.engine.shard import Shard

_ACTIVE: DualForward | None = None


def active() -> DualForward | None:
    """The DualForward whose pair is being evaluated (a head applied outside its module asks)."""
    return _ACTIVE


class DualForward:
    def __init__(self, model: torch.nn.Module, distribution: str = "gaussian", version: str = "v1"):
        self.distribution, self.version = distribution, version
        names = {}
        for name, p in model.named_parameters():  # tied parameters under their first name, as the shards
            names.setdefault(id(p), name)
        # module -> [(attribute, parameter name)] for the trainable parameters the module holds itself
        self.owned = {}
        for module in model.modules():
            own = [(leaf, names[id(p)]) for leaf, p in module._parameters.items() if p is not None and p.requires_grad]
            if own:
                self.owned[module] = own
        if not self.owned:
            raise ValueError("dual_forward: the model has no trainable parameters")
        for module in self.owned:  # a side of it would run its children's sides again
            inner = next((m for m in module.modules() if m is not module and m in self.owned), None)
            if inner is not None:
                raise ValueError(f"dual_forward: {type(module).__name__} holds trainable parameters of its own and "
                                 f"a module that does ({type(inner).__name__}); not supported")
        self.terms: dict[int, float] | None = None
        self.rows = 0  # the doubled batch's size
        self.generated = 0  # elements of z generated on this rank (whole gathered parameters, both sides)

    @contextlib.contextmanager
    def pair(self, terms: Mapping[int, float], rows: int):
        """Inside, a forward of a doubled batch (``rows`` sequences) computes theta + terms on its
        first half and theta - terms on its second (terms: seed -> coefficient, eps included)."""
        global _ACTIVE
        self.terms, self.rows = dict(terms), rows
        originals = {}
        for module in self.owned:
            originals[module] = module.forward
            module.forward = self._wrapped(module, module.forward)
        _ACTIVE = self
        try:
            yield
        finally:
            _ACTIVE, self.terms = None, None
            for module in originals:
                del module.forward  # the class's forward again

    def _wrapped(self, module, forward):
        def run(*args, **kwargs):
            held = {leaf: module._parameters[leaf] for leaf, _ in self.owned[module]}

            def side(values, *a, **k):
                module._parameters.update(values)
                try:
                    return forward(*a, **k)
                finally:
                    module._parameters.update(held)

            return self.run(module, held, side, *args, **kwargs)

        return run

    def run(self, module, tensors: Mapping[str, torch.Tensor], fn: Callable, *args, **kwargs):
        """``fn(values, *half_args)`` on each half of the inputs, ``values`` the module's trainable
        ``tensors`` (attribute -> tensor as the forward reads it) at + then - terms; the two outputs
        concatenated along dim 0. Inputs of size 1 in dim 0 (broadcast, e.g. GPT-2's position ids)
        go whole to both sides, and both outputs are then expanded to half the batch."""
        named = [(leaf, name) for leaf, name in self.owned.get(module, ()) if tensors.get(leaf) is not None]
        copies = {leaf: tensors[leaf].detach().clone(memory_format=torch.contiguous_format) for leaf, _ in named}
        shards = [Shard(name, copies[leaf]) for leaf, name in named]
        engine = PerturbationEngine(shards, self.distribution, version=self.version) if shards else None
        outputs, sizes = [], set()
        for half, sign in ((0, 1.0), (1, -2.0)):  # w + eps z, then (w + eps z) - 2 eps z, as perturb() does
            if engine is not None:
                values = [s.tensor for s in shards]
                engine.apply(shards, values, values, 1.0, {seed: sign * c for seed, c in self.terms.items()})
                self.generated += sum(s.numel for s in shards) * len(self.terms)
            a = [_half(x, half, sizes) for x in args]
            k = {key: _half(x, half, sizes) for key, x in kwargs.items()}
            outputs.append(fn({**tensors, **copies}, *a, **k))
        plus, minus = outputs
        if not isinstance(plus, torch.Tensor):
            raise TypeError(f"dual_forward: {type(module).__name__} returns {type(plus).__name__}, not a tensor")
        if not sizes:  # every input was broadcast: give each side its half of the batch
            rows = self.rows // 2
            plus, minus = plus.expand(rows, *plus.shape[1:]), minus.expand(rows, *minus.shape[1:])
        return torch.cat([plus, minus])


def _half(x, half: int, sizes: set):
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 1:
        return x
    if x.shape[0] % 2:
        raise ValueError(f"dual_forward: an input of shape {tuple(x.shape)} does not split into the two streams")
    sizes.add(x.shape[0])
    return x.chunk(2)[half]
