"""The frozen bottom of a causal LM, run once per example (`model.cache_frozen_layers`).

When every trainable parameter sits in decoder layer k or above (the top layers' norms, LoRA on
the top layers), the hidden state entering layer k is a function of the example alone: every
forward of a ZO step, and every evaluation, would compute it again. It is computed once per
example (the run's examples in data order, in fixed chunks, so a resumed run computes the same
values; on disk, keyed by the weights below the cut, runs share them), and fed to layer k: the
first k layers are replaced during the forward by modules that return it. Right padding with
causal attention keeps the real positions independent of the padding, so cached rows are padded
with zeros.

The cost moves from steps to examples: a forward costs the top layers only. Memory: one
(length, hidden) tensor per example. Checked against the uncached forward when a run starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zoscale.engine.comm import print0
from zoscale.errors import ConfigError
from zoscale.models import BodyHead, causal_lm, decoder_layers


def shared_store() -> Path:
    """Where runs share their entries: $ZOSCALE_CACHE/frozen-layers (default ~/.cache/zoscale)."""
    return Path(os.environ.get("ZOSCALE_CACHE", Path.home() / ".cache" / "zoscale")) / "frozen-layers"


class _Stop(Exception):
    pass


class _Replay(torch.nn.Module):
    """Stands in for a frozen layer: the last one returns the cached hidden states, the others
    pass their input through (their outputs are discarded by the last one anyway)."""

    def __init__(self, cache: FrozenLayers, last: bool):
        super().__init__()
        self.cache, self.last = cache, last

    def forward(self, hidden_states, *args, **kwargs):
        if not self.last:
            return (hidden_states,) if self.cache.returns_tuple else hidden_states
        return (self.cache.pending,) if self.cache.returns_tuple else self.cache.pending


class FrozenLayers:
    """The body of a causal LM whose first ``frozen`` decoder layers hold no trainable parameter."""

    def __init__(self, model: torch.nn.Module, store: Path | None = None):
        """``store``: a directory shared by runs (one subdirectory per model state below the cut)."""
        self.base = causal_lm(model).base_model
        self.layers = _layer_list(causal_lm(model))
        first = next((i for i, layer in enumerate(self.layers) if any(p.requires_grad for p in layer.parameters())),
                     len(self.layers))
        self.frozen = min(first, len(self.layers) - 1)  # the last layer runs, so the cut is a layer's input
        below = {id(p) for p in self.layers[:self.frozen].parameters()}
        below |= {id(p) for p in self.base.get_input_embeddings().parameters()}  # tied to the head too
        trained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) in below]
        if trained:
            raise ConfigError(f"model.cache_frozen_layers: {trained[0]} is trainable and feeds decoder layer "
                              f"{self.frozen}; only the layers from the first trainable one up may train")
        if self.frozen == 0:
            raise ConfigError("model.cache_frozen_layers: decoder layer 0 holds trainable parameters, so no layer "
                              "is frozen below them (train the top layers only, e.g. 'layers\\.(2[6-9])\\.')")
        self.device = next(self.base.parameters()).device
        self.entries: dict[tuple[int, ...], torch.Tensor] = {}
        self.pending: torch.Tensor | None = None
        self.returns_tuple = False  # what a layer returns (older layers: a tuple), seen by check()
        self.replays = [_Replay(self, last=i == self.frozen - 1) for i in range(self.frozen)]
        self.store = store / self._fingerprint() if store is not None else None
        self._read_store()

    def _read_store(self) -> None:
        if self.store is not None and self.store.is_dir():
            for file in sorted(self.store.glob("*.safetensors")):
                self._read(file)

    def _fingerprint(self) -> str:
        """What the cached values are a function of: the parameters below the cut, the model's
        config (rotary tables), the dtype, device type and torch version."""
        digest = hashlib.sha256(f"{self.frozen} {torch.__version__} {self.device.type} "
                                f"{self.base.config.to_json_string()}".encode())
        parameters = list(self.base.get_input_embeddings().parameters()) + list(self.layers[:self.frozen].parameters())
        for p in parameters:
            digest.update(str(p.dtype).encode())
            digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:24]

    def _read(self, file: Path) -> None:
        try:
            tensors = load_file(file, device=str(self.device))
        except Exception:  # a file another run is writing is never seen (renamed when complete): damage
            print0(f"model.cache_frozen_layers: {file} cannot be read; it is ignored")
            return
        for name, value in tensors.items():
            self.entries.setdefault(tuple(int(t) for t in name.split("-")), value)

    def _write(self, sequences: list[tuple[int, ...]]) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        tensors = {"-".join(map(str, s)): self.entries[s].contiguous() for s in sequences}
        name = hashlib.sha256("|".join(tensors).encode()).hexdigest()[:24]
        temporary = self.store / f".{name}.{os.getpid()}.tmp"
        save_file(tensors, temporary)
        os.replace(temporary, self.store / f"{name}.safetensors")

    @property
    def split(self) -> BodyHead:
        return BodyHead(body_fn=lambda model, ids, mask: self.body(ids, mask))

    def fill(self, sequences: list[list[int]], chunk: int = 16) -> None:
        """Entries for ``sequences`` not cached yet, computed ``chunk`` at a time in the order given
        (the run's own examples, in data order: the same chunks, so the same values, whenever the
        run is started or resumed). Runs that start together (a comparison's) take turns: the
        second reads what the first wrote."""
        if self.store is None or all(tuple(s) in self.entries for s in sequences):
            return self._compute(sequences, chunk)
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self.store / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._read_store()
            self._compute(sequences, chunk)

    def _compute(self, sequences: list[list[int]], chunk: int) -> None:
        missing = list(dict.fromkeys(tuple(s) for s in sequences if tuple(s) not in self.entries))
        for start in range(0, len(missing), chunk):
            group = missing[start:start + chunk]
            longest = max(len(s) for s in group)
            ids = torch.zeros(len(group), longest, dtype=torch.long, device=self.device)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(group):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            hidden = self._below(ids, mask)
            for i, s in enumerate(group):
                self.entries[s] = hidden[i, :len(s)].clone()
        if missing and self.store is not None:
            self._write(missing)

    def _below(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states entering layer ``frozen``: the model's forward, ended there."""
        captured = {}

        def capture(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        hook = self.layers[self.frozen].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                self.base(input_ids=input_ids, attention_mask=attention_mask)
        except _Stop:
            pass
        finally:
            hook.remove()
        return captured["hidden"].detach()

    def body(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        sequences = [tuple(ids[:n].tolist()) for ids, n in zip(input_ids, attention_mask.sum(dim=1).tolist())]
        for s in sequences:  # met outside the run's own examples: alone, so its value is its own
            if s not in self.entries:
                self._compute([s], 1)
        rows = [self.entries[s] for s in sequences]
        hidden = rows[0].new_zeros(input_ids.shape + rows[0].shape[-1:])
        for i, row in enumerate(rows):
            hidden[i, :len(row)] = row
        originals = [self.layers[i] for i in range(self.frozen)]
        self.pending = hidden
        try:
            for i, replay in enumerate(self.replays):
                self.layers[i] = replay
            return self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            self.pending = None

    def check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tolerance: float = 1e-4) -> None:
        """The cached body equals the model's own forward (else this architecture feeds its layers
        something the replay does not reproduce)."""
        def kind(module, args, output):
            self.returns_tuple = isinstance(output, tuple)

        hook = self.layers[self.frozen - 1].register_forward_hook(kind)
        with torch.no_grad():
            try:
                plain = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            finally:
                hook.remove()
            try:
                cached = self.body(input_ids, attention_mask)
            except Exception as e:
                raise ConfigError(f"model.cache_frozen_layers: the cached forward of {type(self.base).__name__} fails "
                                  f"({type(e).__name__}: {e}); this architecture is not supported") from None
        real = attention_mask.bool()
        error = (cached[real] - plain[real]).abs().max().item() / max(plain[real].abs().max().item(), 1e-12)
        if not error <= tolerance:
            raise ConfigError(f"model.cache_frozen_layers: the cached forward of {type(self.base).__name__} differs "
                              f"from its own by {error:.2g} (relative); this architecture is not supported")


def _layer_list(model) -> torch.nn.ModuleList:
    """The ModuleList that holds the model's decoder layers, in order (the cut swaps its entries)."""
    layers = decoder_layers(model)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and list(module) == layers:
            return module
    raise ConfigError(f"model.cache_frozen_layers: {type(model).__name__} names no decoder layer class "
                      f"(_no_split_modules) whose list could be cut")
