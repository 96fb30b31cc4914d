"""The shard seam and the perturbation engine.

A backend turns a model into a list of ``Shard``s: the local piece of each trainable parameter that
the forward reads, with its global offset in the flattened parameter. The optimizers see only
shards (through the engine) and a ``Comm``; they never learn how the model is distributed.

The engine keeps the parameters as a lazy affine form, per weight-decay group:

    theta = alpha * stored + sum_j c_j * z(seed_j)

``update`` only changes (alpha, c); ``perturb`` and ``flush`` are the passes that touch memory.
That one mechanism gives the fused restore+update (one pass), the deferred update (folded into
the next step's first pass) and memory-free n-SPSA.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from zoscale import kernels, rng

# Wrapper segments that frameworks insert into parameter names; the stream id must not see them.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.)")


def canonical_name(name: str) -> str:
    """The parameter's name as the unwrapped model spells it (DDP, DeepSpeed, compile, FSDP1)."""
    return _WRAPPER_SEGMENTS.sub("", name).lstrip(".")


def decays(name: str, shape: Sequence[int]) -> bool:
    """Weight decay applies to matrices, not to biases and norm weights (MeZO's rule)."""
    return len(shape) >= 2 and "norm" not in name.lower()


@dataclass
class Shard:
    """This rank's piece of one trainable parameter.

    tensor: the view the forward reads (contiguous; written in place)
    offset: global index of its first element in the flattened parameter
    master: optional higher-precision copy that holds the parameter's value when the forward reads
            a half-precision ``tensor``; perturbations are then written from it and never into it
    storage: set when the elements live on NVMe between uses (ZeRO-3 offload): ``tensor`` is then
             valid only inside ``resident()``, and a meta placeholder outside it
    compute_device: the GPU the forward runs on, for a shard held in host memory (CPU or NVMe
             offload): the engine generates its perturbations there, a chunk at a time
    """

    name: str
    tensor: torch.Tensor
    offset: int = 0
    global_numel: int | None = None
    weight_decay: bool = True
    master: torch.Tensor | None = None
    storage: Storage | None = field(default=None, repr=False)
    compute_device: torch.device | None = None
    stream: int = field(init=False)

    def __post_init__(self):
        self.name = canonical_name(self.name)
        self.stream = rng.stream_id(self.name)
        if self.global_numel is None:
            self.global_numel = self.offset + self.tensor.numel()
        if not self.tensor.is_contiguous():
            raise ValueError(f"shard {self.name}: the local tensor must be contiguous")
        if self.offset < 0 or self.offset + self.tensor.numel() > self.global_numel:
            raise ValueError(f"shard {self.name}: elements [{self.offset}, {self.offset + self.tensor.numel()})"
                             f" outside the parameter's {self.global_numel}")
        if self.master is not None and self.master.shape != self.tensor.shape:
            raise ValueError(f"shard {self.name}: master and tensor shapes differ")

    @property
    def numel(self) -> int:
        return self.tensor.numel()

    @property
    def value(self) -> torch.Tensor:
        """The tensor that holds the parameter's value: the master if there is one."""
        return self.tensor if self.master is None else self.master


class Storage(Protocol):
    """Elements that are swapped in for use and written back after (ZeRO-3's NVMe offload)."""

    capacity: int  # how many shards may be in memory at once

    def load(self, shards: Sequence[Shard]) -> None:
        """Read the shards' elements in; each ``shard.tensor`` becomes a view of them."""

    def store(self, shards: Sequence[Shard]) -> None:
        """Write the elements back and free their memory."""


def resident(shards: Sequence[Shard]) -> Iterator[list[Shard]]:
    """The shards in batches whose tensors are valid while the batch is in use: all at once when
    every shard is in memory; shards on NVMe a few at a time (read in, then written back when the
    caller moves on). Code that touches shard tensors goes through this."""
    in_memory = [s for s in shards if s.storage is None]
    swapped = [s for s in shards if s.storage is not None]
    if in_memory:
        yield in_memory
    if swapped:
        capacity = swapped[0].storage.capacity
        for i in range(0, len(swapped), capacity):
            batch = swapped[i : i + capacity]
            batch[0].storage.load(batch)
            try:
                yield batch
            finally:
                batch[0].storage.store(batch)


def offload_compute_device(t: torch.Tensor) -> torch.device | None:
    """The GPU the forward runs on, for a shard tensor held in host memory (offload), else None."""
    return torch.device("cuda", torch.cuda.current_device()) if not t.is_cuda and torch.cuda.is_available() else None


def local_shards(model: torch.nn.Module, master_dtype: torch.dtype | None = None) -> list[Shard]:
    """Every trainable parameter as one whole shard (single process, or replicated under DDP).

    With ``master_dtype`` (e.g. float32) each half-precision parameter gets a master copy: the
    forward still computes in half precision, but perturbations never accumulate rounding error."""
    shards = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        master = None
        if master_dtype is not None and p.dtype != master_dtype:
            master = p.detach().to(master_dtype).clone()
        shards.append(Shard(name, p.data, weight_decay=decays(name, p.shape), master=master))
    if not shards:
        raise ValueError("the model has no trainable parameters")
    return shards


class ShardBuffer:
    """A parameter-sized tensor per shard (momentum, anchor copy), laid out exactly like the shards,
    so it is sharded and checkpointed the same way."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)


# seed -> coefficient of z(seed); a ShardBuffer key adds coefficient * buffer instead.
Terms = Mapping["int | ShardBuffer", float]
# (buffer, gamma, {seed: e}): buffer <- gamma * buffer + sum e z(seed), in the pass that reads it
Advance = tuple["ShardBuffer", float, Mapping[int, float]]


@dataclass
class _Affine:
    alpha: float = 1.0
    terms: dict[int, float] = field(default_factory=dict)

    def plus(self, terms: Terms, scale: float = 1.0) -> dict[int, float]:
        out = dict(self.terms)
        for seed, coef in terms.items():
            out[seed] = out.get(seed, 0.0) + scale * coef
        return {s: c for s, c in out.items() if c != 0.0}

    @property
    def identity(self) -> bool:
        return self.alpha == 1.0 and not self.terms


class PerturbationEngine:
    """Adds seeded perturbations to shards, in place, in passes over local memory only.

    perturb(P):  the forward now reads theta + sum P  (one pass)
    update(U, decay): theta <- decay * theta + sum U for weight-decayed shards, theta + sum U for
                 the others (no pass: recorded, applied by the next perturb or flush)
    flush():     the forward reads theta itself (one pass, or none if nothing is pending)

    CUDA tensors go to the Triton kernels, all shards in one launch. Host tensors of offloaded shards
    are staged through the kernels on their compute device in chunks of ``chunk_numel`` elements;
    the rest are generated by rng.py in such chunks, so no full-size z is ever materialised.
    """

    def __init__(self, shards: Sequence[Shard], distribution: str = "gaussian", chunk_numel: int = 1 << 22,
                 version: str = "v1"):
        """``version``: the stream version (rng.py), a property of the run."""
        if distribution not in rng.DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; choose one of {rng.DISTRIBUTIONS}")
        if version not in rng.STREAMS:
            raise ValueError(f"unknown stream version {version!r}; choose one of {rng.STREAMS}")
        if not shards:
            raise ValueError("no shards to perturb")
        masters = {s.master is not None for s in shards}
        if len(masters) != 1:
            raise ValueError("either every shard has a master copy or none does")
        self.shards = list(shards)
        self.distribution, self.version = distribution, version
        self.chunk_numel = chunk_numel
        self.has_master = masters.pop()
        self._index = {id(s): i for i, s in enumerate(self.shards)}
        self._groups = {wd: [s for s in self.shards if s.weight_decay == wd] for wd in (True, False)}
        self._state = {wd: _Affine() for wd in (True, False)}
        self._perturbed = False  # master mode: the forward currently reads a perturbed copy
        self.traffic = 0  # bytes the passes read and wrote in memory (bench step reports them per parameter)
        # When a list, every update is appended as (seed terms, decay), or None when it used a
        # buffer: the trainer's seed log, from which `zoscale replay` rebuilds the parameters.
        self.journal: list | None = None
        self.phase = lambda name: contextlib.nullcontext()  # a MemorySampler's phase(), when profiling
        # Offloaded shards are generated on their compute device a chunk at a time: the kernels write
        # chunk_numel elements there faster than rng.py writes a few on the host.
        staging = {s.compute_device for s in self.shards if s.compute_device is not None}
        self.stage_device = staging.pop() if len(staging) == 1 and kernels.available() else None

    # -- the three operations -------------------------------------------------------------------
    def perturb(self, terms: Terms) -> None:
        with self.phase("perturbation"):
            self._perturb(terms)

    def _perturb(self, terms: Terms) -> None:
        for wd, group in self._groups.items():
            state = self._state[wd]
            if self.has_master:  # the master keeps theta; only the forward's copy is perturbed
                self._fold_into_master(wd)
                for batch in resident(group):
                    self.apply(batch, [s.tensor for s in batch], [s.master for s in batch], 1.0, dict(terms))
            else:
                for batch in resident(group):
                    self.apply(batch, [s.tensor for s in batch], [s.tensor for s in batch], state.alpha,
                               state.plus(terms))
                self._state[wd] = _Affine(1.0, {s: -c for s, c in terms.items() if c != 0.0})
        self._perturbed = self.has_master

    def update(self, terms: Terms, decay: float = 1.0) -> None:
        if self.journal is not None and (terms or decay != 1.0):
            replayable = all(isinstance(k, int) for k in terms)
            self.journal.append(({int(k): float(c) for k, c in terms.items()}, float(decay)) if replayable else None)
        for wd, state in self._state.items():
            d = decay if wd else 1.0
            decayed = _Affine(1.0, {s: d * c for s, c in state.terms.items()})
            self._state[wd] = _Affine(state.alpha * d, decayed.plus(terms))

    def flush(self, advance: Advance | None = None) -> float:
        """``advance``: also advance a buffer in the same pass (see ``apply``); returns this rank's
        sum of its squares."""
        with self.phase("update"):
            return self._flush(advance)

    def _flush(self, advance: Advance | None = None) -> float:
        squares = 0.0
        for wd, group in self._groups.items():
            if self.has_master:
                folded, squares_group = self._fold_into_master(wd, advance)
                squares += squares_group
                if folded or self._perturbed:
                    for batch in resident(group):
                        for s in batch:
                            s.tensor.copy_(s.master)
            elif not self._state[wd].identity or advance is not None:
                state = self._state[wd]
                for batch in resident(group):
                    squares += self.apply(batch, [s.tensor for s in batch], [s.tensor for s in batch], state.alpha,
                                          state.terms, advance)
                self._state[wd] = _Affine()
        self._perturbed = False
        return squares

    def _fold_into_master(self, wd: bool, advance: Advance | None = None) -> tuple[bool, float]:
        state, group = self._state[wd], self._groups[wd]
        if state.identity and advance is None:
            return False, 0.0
        squares = self.apply(group, [s.master for s in group], [s.master for s in group], state.alpha, state.terms,
                             advance)
        self._state[wd] = _Affine()
        return True, squares

    @property
    def pending(self) -> bool:
        """Whether the forward currently reads something other than theta."""
        return self._perturbed or not all(s.identity for s in self._state.values())

    # -- primitives over any tensors laid out like the shards (parameters, momentum, anchors) ----
    def apply(self, shards: Sequence[Shard], outs: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor],
              alpha: float, terms: Terms, advance: Advance | None = None) -> float:
        """outs[i] = alpha * srcs[i] + sum_j c_j z_i(seed_j) + sum_k b_k buffer_k[i], per shard i.

        ``advance`` = (buffer, gamma, seed terms): in the same pass, buffer <- gamma * buffer +
        sum_j e_j z(seed_j), the noise drawn once for both (ConMeZO's momentum rides on the pass
        that updates the parameters). Returns this rank's sum of the advanced buffer's squares (as
        stored), else 0."""
        seeds = {k: c for k, c in terms.items() if isinstance(k, int) and c != 0.0}
        buffers = [(k, c) for k, c in terms.items() if isinstance(k, ShardBuffer) and c != 0.0]
        if advance is not None:  # its buffer is the one the pass reads (coefficient 0 if unused), its seeds drawn
            buffers = [(advance[0], terms.get(advance[0], 0.0)), *((b, c) for b, c in buffers if b is not advance[0])]
            seeds.update({k: seeds.get(k, 0.0) for k, e in advance[2].items() if e != 0.0})
        elif alpha == 1.0 and not seeds and not buffers and all(o is s for o, s in zip(outs, srcs)):
            return 0.0
        self.traffic += sum(o.numel() * o.element_size() + s.numel() * s.element_size() for o, s in zip(outs, srcs))
        on_kernels, host = [], []
        for shard, out, src in zip(shards, outs, srcs):
            extra = [(b.tensors[self._index[id(shard)]].view(-1), c) for b, c in buffers]
            self.traffic += sum(b.numel() * b.element_size() for b, _ in extra) * (1 + (advance is not None))
            (on_kernels if self._on_kernels(out) else host).append((shard, out.view(-1), src.view(-1), extra))
        beta = buffers[0][1] if buffers else 0.0
        coefs = None if advance is None else (advance[1], [advance[2].get(k, 0.0) for k in seeds])
        squares = self._kernel_pass([(s.offset, s.stream, out, src, extra) for s, out, src, extra in on_kernels],
                                    alpha, seeds.items(), beta, coefs)
        if self.stage_device is not None:  # host shards (offload): a chunk at a time through the kernels
            device = self.stage_device
            staged_terms = kernels.Terms(seeds.items(), device)  # once, not once per chunk
            for chunk in self._chunks(host):
                staged = [(shard.offset + lo, shard.stream, torch.empty(hi - lo, dtype=out.dtype, device=device),
                           src[lo:hi].to(device), [(b[lo:hi].to(device), c) for b, c in extra])
                          for shard, out, src, extra, lo, hi in chunk]
                squares += self._kernel_pass(staged, alpha, staged_terms, beta, coefs)
                for (shard, out, _, extra, lo, hi), (_, _, result, _, moved) in zip(chunk, staged):
                    out[lo:hi].copy_(result)
                    if advance is not None:
                        extra[0][0][lo:hi].copy_(moved[0][0])
            return squares
        for chunk in self._chunks(host):
            wide = any(src.dtype == torch.float64 for _, _, src, _, _, _ in chunk)
            compute_noise = torch.float64 if wide else torch.float32
            if advance is None:
                noise, moved = self._noise(chunk, seeds, compute_noise), None
            else:
                noise, moved = self._noise(chunk, seeds, compute_noise, advance[2])
            if advance is None and noise is not None and all(
                    out.data_ptr() == src.data_ptr() and out.dtype == noise.dtype and not extra
                    for _, out, src, extra, _, _ in chunk):
                # in place, one dtype: two batched ops for the whole chunk (small models are bound by
                # per-op dispatch on the CPU)
                views = [out[lo:hi] for _, out, _, _, lo, hi in chunk]
                if alpha != 1.0:
                    torch._foreach_mul_(views, alpha)
                torch._foreach_add_(views, list(noise.split([v.numel() for v in views])))
                continue
            pos = 0
            for shard, out, src, extra, lo, hi in chunk:
                compute = torch.promote_types(src.dtype, torch.float32)
                value = src[lo:hi].to(compute)
                if alpha != 1.0:
                    value = value * alpha
                if noise is not None:
                    value = value + noise[pos : pos + hi - lo].to(compute)
                for buffer, coef in extra:
                    value = value + coef * buffer[lo:hi].to(compute)
                if advance is not None:  # after the parameters read the buffer's old values
                    buffer = extra[0][0][lo:hi]
                    step = buffer.to(compute) * advance[1]
                    if moved is not None:
                        step = step + moved[pos : pos + hi - lo].to(compute)
                    buffer.copy_(step)
                    squares += float(torch.linalg.vector_norm(buffer, dtype=torch.float64) ** 2)
                out[lo:hi].copy_(value)
                pos += hi - lo
        return squares

    def _kernel_pass(self, items, alpha: float, terms, beta: float, advance=None) -> float:
        """One launch over (start, stream, out, src, extra buffers) items; the first buffer is read in
        the same pass (and with ``advance``, written), any further ones are added after. ``terms``:
        (seed, coefficient) pairs or ``kernels.Terms`` already on the device."""
        if not items:
            return 0.0
        squares = kernels.affine_noise_([kernels.Segment(out, start, stream, src, extra[0][0] if extra else None)
                                         for start, stream, out, src, extra in items],
                                        distribution=self.distribution, terms=terms, alpha=alpha, beta=beta,
                                        version=self.version, advance=advance)
        for _, _, out, _, extra in items:
            for buffer, coef in extra[1:]:
                out.add_(buffer, alpha=coef)
        return 0.0 if squares is None else float(squares)

    def new_buffer(self, dtype: torch.dtype | None = None) -> ShardBuffer:
        """Zeros laid out like the shards (dtype defaults to that of the parameters' values), in host
        memory for NVMe shards, whose placeholders give the size without reading anything in."""
        return ShardBuffer([torch.zeros(s.value.shape, dtype=dtype or s.value.dtype,
                                        device="cpu" if s.storage is not None else s.value.device)
                            for s in self.shards])

    def swap(self, buffer: ShardBuffer) -> None:
        """Exchange the parameters' values with ``buffer`` (same dtype), a chunk at a time."""
        self.flush()
        for batch in resident(self.shards):
            for shard in batch:
                mine, other = shard.value.view(-1), buffer.tensors[self._index[id(shard)]].view(-1)
                for lo in range(0, mine.numel(), self.chunk_numel):
                    hi = min(mine.numel(), lo + self.chunk_numel)
                    held = mine[lo:hi].clone()
                    mine[lo:hi].copy_(other[lo:hi])
                    other[lo:hi].copy_(held)
                if shard.master is not None:
                    shard.tensor.copy_(shard.master)

    def norm2(self, tensors: Sequence[torch.Tensor]) -> float:
        """This rank's part of sum(v**2) over a shard-laid-out tensor list, accumulated in float64."""
        return float(sum(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2 for t in tensors))

    def dot(self, seed: int, tensors: Sequence[torch.Tensor] | None = None) -> float:
        """This rank's part of <v, z(seed)> (v defaults to the parameters' values), in float64.
        Sum it over ranks with Comm.all_reduce_sum."""
        return self._reduce_noise(seed, tensors, square=False)

    def noise_norm2(self, seed: int) -> float:
        """This rank's part of ||z(seed)||^2, in float64."""
        return self._reduce_noise(seed, None, square=True)

    def _reduce_noise(self, seed: int, tensors, square: bool) -> float:
        total = torch.zeros((), dtype=torch.float64)
        on_device = []  # the kernels' sums, brought to the host once at the end
        # sum(z**2) needs only sizes: NVMe shards are not read in for it
        for batch in [self.shards] if square else resident(self.shards):
            on_kernels, host = [], []
            for shard in batch:
                t = (shard.value if tensors is None else tensors[self._index[id(shard)]]).view(-1)
                if self._on_kernels(t):
                    on_kernels.append(kernels.Segment(t, shard.offset, shard.stream))
                else:
                    host.append((shard, t, t, ()))
            if on_kernels:
                on_device.append(kernels.dot_noise(on_kernels, distribution=self.distribution, seed=seed,
                                                   square=square, version=self.version))
            for chunk in self._chunks(host):
                if self.stage_device is not None:  # sum(z**2) needs only the size: nothing is copied
                    device = self.stage_device
                    staged = [kernels.Segment(torch.empty(hi - lo, device=device) if square else t[lo:hi].to(device),
                                              shard.offset + lo, shard.stream) for shard, t, _, _, lo, hi in chunk]
                    on_device.append(kernels.dot_noise(staged, distribution=self.distribution, seed=seed,
                                                       square=square, version=self.version))
                    continue
                z = self._noise(chunk, {seed: 1.0}, dtype=torch.float64)
                v = z if square else torch.cat([t[lo:hi] for _, t, _, _, lo, hi in chunk]).to(torch.float64)
                total += torch.dot(v, z)
        return float(total) + (float(torch.stack(on_device).sum()) if on_device else 0.0)

    def noise_like(self, shard: Shard, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This shard's slice of z(seed), materialised (tests and small-d reference code only)."""
        return rng.generate_segments(self.distribution, seed, [(shard.stream, shard.offset, shard.numel)],
                                     device=shard.tensor.device, dtype=dtype, version=self.version
                                     ).view_as(shard.tensor)

    @staticmethod
    def _on_kernels(t: torch.Tensor) -> bool:
        """Whether the Triton kernels write this tensor (CUDA); rng.py does the rest."""
        return t.is_cuda and kernels.available()

    # -- CPU chunking ------------------------------------------------------------------------------
    def _chunks(self, items):
        """Group (shard, out, src, extra) into pieces (shard, out, src, extra, lo, hi) of at most
        chunk_numel elements, merging small tensors so one rng call serves many of them."""
        chunk, size = [], 0
        for shard, out, src, extra in items:
            lo = 0
            while lo < out.numel():
                hi = min(out.numel(), lo + self.chunk_numel - size)
                chunk.append((shard, out, src, extra, lo, hi))
                size += hi - lo
                lo = hi
                if size >= self.chunk_numel:
                    yield chunk
                    chunk, size = [], 0
        if chunk:
            yield chunk

    def _noise(self, chunk, terms: Terms, dtype: torch.dtype = torch.float32, second: Terms | None = None):
        """sum_j c_j z_j over the chunk, or with ``second`` (other coefficients of the same seeds)
        the pair of sums, each z drawn once."""
        segments = [(shard.stream, shard.offset + lo, hi - lo) for shard, _, _, _, lo, hi in chunk]
        device = chunk[0][1].device if chunk[0][1].device.type != "meta" else "cpu"  # an NVMe placeholder
        totals = [None, None]
        for seed in terms:
            z = rng.generate_segments(self.distribution, seed, segments, device=device, dtype=dtype,
                                      version=self.version)
            for i, coef in enumerate((terms[seed], (second or {}).get(seed, 0.0))):
                if coef != 0.0:
                    totals[i] = z * coef if totals[i] is None else totals[i].add_(z, alpha=coef)
        return totals[0] if second is None else tuple(totals)
