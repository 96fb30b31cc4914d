"""The training configuration: typed dataclasses are the single source of truth; YAML files and
dotted ``key=value`` overrides are serialisations of them. Everything is checked here, before any
model is built, and every problem is a one-line ``ConfigError`` that names the key."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import dacite
import yaml

from zoscale.errors import ConfigError

BACKENDS = ("local", "ddp", "fsdp", "deepspeed")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # hub id or local directory (from_pretrained)
    gguf_file: str | None = None  # or a GGUF file, converted once to safetensors in RUN/cache (zoscale/gguf.py)
    config: dict | None = None  # or a config dict {model_type: opt, ...}, or a config.json path (configs/models/)
    tokenizer: str | None = None  # hub id or local directory; defaults to name_or_path
    kind: str = "causal"  # causal (OPT, Llama, GPT-2, ...) | masked (RoBERTa, BERT: the answer fills a mask)
    dtype: str = "float32"
    trainable: str = "all"  # "all", or a regex: parameters whose names match train
    master_weights: bool = False  # fp32 master copies of half-precision weights (docs/numerics.md)
    lora: dict | None = None  # peft LoraConfig fields, e.g. {r: 8, lora_alpha: 16} (pip install peft)
    init_seed: int = 0  # for models built from a config
    init_device: str = "cpu"  # where a config's random weights are drawn: cpu (the same everywhere) | device (fast)
    # the decoder layers below the first trainable one run once per example, not every forward
    # (train/frozen_layers.py; backends local and ddp)
    cache_frozen_layers: bool = False

    def __post_init__(self):
        sources = [k for k in ("name_or_path", "config", "gguf_file") if getattr(self, k) is not None]
        _require(len(sources) == 1, "model", f"set exactly one of model.name_or_path, model.config and "
                 f"model.gguf_file (got {', '.join(sources) or 'none'})")
        _require(self.gguf_file is None or Path(self.gguf_file).is_file(), "model.gguf_file",
                 f"no such file {self.gguf_file}")
        if self.gguf_file is not None:
            check_gguf(self.gguf_file)
        _require(self.config is None or "model_type" in self.config, "model.config", "needs a model_type (e.g. opt)")
        _require(self.config is None or self.tokenizer is not None, "model.tokenizer",
                 "is required when the model is built from a config")
        _choice(self.dtype, DTYPES, "model.dtype")
        _choice(self.kind, ("causal", "masked"), "model.kind")
        _choice(self.init_device, ("cpu", "device"), "model.init_device")
        if self.trainable != "all":
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise ConfigError(f"model.trainable: not a valid regex ({e})") from None


@dataclass
class DataConfig:
    task: str = "sst2"
    path: str | None = None  # a directory of local files (docs/tasks.md); default: the task's hub dataset
    num_train: int = 1000
    num_dev: int = 500
    num_test: int = 1000
    seed: int = 13  # MeZO's data seeds are 13, 21, 42, 87, 100
    max_length: int = 2048
    max_new_tokens: int = 50  # greedy decoding for generation tasks
    balance: bool = False  # equal numbers of each label in train, dev and test (skewed label sets)

    def __post_init__(self):
        for key in ("num_train", "num_dev", "num_test", "max_length", "max_new_tokens"):
            _require(getattr(self, key) >= 0, f"data.{key}", f"must be >= 0, got {getattr(self, key)}")
        _require(self.max_length > 0, "data.max_length", "must be > 0")


OBJECTIVES = ("loss", "accuracy", "f1", "exact_match", "reward")
GENERATING = ("f1", "exact_match", "reward")  # the objectives that score generated text


@dataclass
class ObjectiveConfig:
    """What a step minimizes (docs/training.md, "Objectives"); the measured ones as minus their value."""

    name: str = "loss"  # loss | accuracy | f1 | exact_match | reward
    rewards: list[str] = field(default_factory=list)  # reward: MODULE:FUNCTION or path/file.py:FUNCTION each
    weights: list[float] | None = None  # reward: one per function (default: 1 each)
    max_new_tokens: int = 16  # generation (f1, exact_match, reward): greedy, with the KV cache
    stop: list[str] = field(default_factory=lambda: ["\n"])  # a completion ends before the first of these

    def __post_init__(self):
        _choice(self.name, OBJECTIVES, "objective.name")
        _require(self.max_new_tokens > 0, "objective.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _require((self.name == "reward") == bool(self.rewards), "objective.rewards",
                 "name the reward functions (MODULE:FUNCTION) of objective reward, and only of it")
        for spec in self.rewards:
            module, sep, function = spec.rpartition(":")
            _require(bool(sep and module and function.isidentifier()), "objective.rewards",
                     f"{spec!r} is not MODULE:FUNCTION (or path/to/file.py:FUNCTION)")
        if self.rewards:  # import errors and missing functions: before any run directory
            from zoscale.train.objectives import load_function

            for spec in self.rewards:
                load_function(spec)
        _require(self.weights is None or len(self.weights) == len(self.rewards), "objective.weights",
                 f"{len(self.weights or [])} weights for {len(self.rewards)} reward functions")
        _require(all(s for s in self.stop), "objective.stop", "stop strings must not be empty")

    @property
    def generates(self) -> bool:
        return self.name in GENERATING


@dataclass
class OptimConfig:
    name: str = "mezo"
    options: dict = field(default_factory=dict)  # the optimizer's own fields (lr, eps, ...)


SHARD_SIZE_KEYS = {"fsdp": "fsdp_shard_size", "deepspeed": "zero3_shard_size"}  # a sharded backend's layout key


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    steps: int = 20_000
    batch_size: int = 16
    eval_every: int = 4000  # 0: only before and after training
    eval_batch_size: int = 16
    save_every: int = 4000  # 0: only at the end
    keep_checkpoints: int = 0  # the newest N checkpoints stay, older ones are deleted; 0: keep all
    log_every: int = 10
    seed: int = 0  # the run seed; step seeds and data order derive from it
    backend: str = "local"
    tensorboard: bool = False
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops
    max_stalled_steps: int = 50  # consecutive steps that change nothing (train/stall.py) before the run stops; 0: never
    collective_timeout_s: float = 600.0  # a rank stuck longer in a collective fails the run
    check_sync: bool = False  # debug: assert every step that all ranks applied the same scalars
    memory_profile: bool = False  # memory/* metrics (NVML, allocator, host RSS) in metrics.jsonl
    memory_interval_s: float = 0.05
    deepspeed_config: str | None = None  # backend deepspeed: a ZeRO-3 JSON (default: generated, configs/deepspeed/)
    fsdp_compute_dtype: str | None = None  # backend fsdp: compute in this dtype, keep shards in model.dtype
    fsdp_cpu_offload: bool = False  # backend fsdp: shards in host memory (CUDA only)
    # backend fsdp: ranks per shard group, replicas across groups, which exchange no parameter (only
    # the losses); auto: the ranks of one node (LOCAL_WORLD_SIZE); default: the whole world
    fsdp_shard_size: int | str | None = None
    zero3_shard_size: int | str | None = None  # backend deepspeed: the same, for ZeRO-3's partition groups
    # backends fsdp and deepspeed: parameters of at most this many elements (norms, biases) are kept
    # whole on every rank of a shard group, never gathered (ZeRO-3's persistence threshold); 0: none
    replicate_small_params: int = 0
    # the +eps and -eps forwards as one forward of the batch taken twice: each layer gathered once a
    # step, the shards take only the update (engine/dual.py; optimizers that declare `pairs`)
    dual_forward: bool = False
    comm_ledger_steps: int = 2  # RUN/comm.json: the collectives of the first steps, per group and kind
    eval_before: bool = True
    eval_test: bool = False  # also the test split at every periodic evaluation (learning curves)

    def __post_init__(self):
        for key in ("steps", "batch_size", "eval_batch_size", "log_every"):
            _require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        _require(self.collective_timeout_s > 0, "collective_timeout_s", f"must be > 0, got {self.collective_timeout_s}")
        from zoscale.optim import REGISTRY

        needs = getattr(REGISTRY.get(self.optim.name), "needs", ())
        _require(self.model.kind == "causal" or "outputs" not in needs, "optim.name",
                 f"{self.optim.name} needs a causal LM (its body/head split), but model.kind is masked")
        _require(self.backend not in ("fsdp", "deepspeed") or "gradient" not in needs, "optim.name",
                 f"{self.optim.name} backpropagates through whole parameters: backend local or ddp (fsdp and "
                 f"deepspeed shard them without the gradient machinery zoscale's baselines use)")
        if self.objective.name != "loss":
            loss_only = [n for n, cls in REGISTRY.items() if not {"outputs", "gradient"} & set(cls.needs)]
            _require("outputs" not in needs and "gradient" not in needs, "objective.name",
                     f"{self.optim.name} differentiates the loss; objective {self.objective.name} has no gradient "
                     f"(optimizers that need only its values: {', '.join(loss_only)})")
            _require(self.model.kind == "causal" or not self.objective.generates, "objective.name",
                     f"{self.objective.name} scores generated text; a masked LM (model.kind masked) does not generate")
        if self.dual_forward:
            cls = REGISTRY.get(self.optim.name)
            _require(getattr(cls, "pairs", False), "dual_forward", f"{self.optim.name} does not take its losses as "
                     f"(+eps, -eps) pairs around theta; optimizers that do: "
                     f"{', '.join(n for n, c in REGISTRY.items() if c.pairs)}")
            _require(self.objective.name == "loss", "dual_forward", f"the objective must be the loss (objective "
                     f"{self.objective.name} is measured on generations or predictions, one forward per side)")
            _require(self.model.kind == "causal", "dual_forward", "needs a causal LM's body/head split")
            _require(not self.model.master_weights, "dual_forward", "not with model.master_weights (the copies "
                     "would be made from the half-precision weights, not the fp32 masters)")
        if self.model.cache_frozen_layers:
            _require(self.backend in ("local", "ddp"), "model.cache_frozen_layers", f"backend {self.backend} "
                     f"gathers the layers' parameters in its own forward; backends local and ddp only")
            _require(self.model.kind == "causal", "model.cache_frozen_layers", "needs a causal LM's decoder layers")
            _require(not self.objective.generates, "model.cache_frozen_layers", f"objective {self.objective.name} "
                     f"generates, and generation keeps every layer's keys and values")
        for key in ("eval_every", "save_every", "keep_checkpoints", "max_nonfinite", "max_stalled_steps",
                    "comm_ledger_steps"):
            _require(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        _choice(self.backend, BACKENDS, "backend")
        if self.fsdp_compute_dtype is not None:
            _choice(self.fsdp_compute_dtype, DTYPES, "fsdp_compute_dtype")
        for backend, key in SHARD_SIZE_KEYS.items():
            size = getattr(self, key)
            if size is None:
                continue
            _require(size == "auto" or (isinstance(size, int) and not isinstance(size, bool) and size > 0),
                     key, f"must be a positive integer or auto, got {size!r}")
            other = SHARD_SIZE_KEYS.get(self.backend)
            _require(self.backend == backend, key, f"shard groups of backend {backend}; backend {self.backend} "
                     f"{f'takes {other}' if other else 'holds whole replicas'}")
        _require(self.replicate_small_params >= 0, "replicate_small_params",
                 f"must be >= 0, got {self.replicate_small_params}")
        if self.replicate_small_params:
            _require(self.backend in ("fsdp", "deepspeed"), "replicate_small_params",
                     f"backend {self.backend} holds every parameter whole already")
            _require(self.deepspeed_config is None, "replicate_small_params", "the DeepSpeed JSON sets it "
                     "(zero_optimization.stage3_param_persistence_threshold)")
            _require(self.fsdp_compute_dtype is None, "replicate_small_params", "not with fsdp_compute_dtype "
                     "(FSDP2 casts only the parameters it shards)")
        if self.deepspeed_config is not None:
            check_deepspeed_json(self.deepspeed_config)
        if self.tensorboard:
            import importlib.util

            _require(importlib.util.find_spec("tensorboard") is not None, "tensorboard",
                     "needs the tensorboard package (pip install 'zoscale[tensorboard]')")


def check_gguf(path: str) -> None:
    """The file opens as a GGUF (its header and tensor index parse, the tensors memory-mapped, not
    read), so a damaged one is refused before any run directory is made."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError("model.gguf_file: reading GGUF needs the gguf package (pip install 'zoscale[real]')") \
            from None
    try:
        GGUFReader(path)
    except Exception as e:  # what a damaged file raises varies: ValueError, struct.error, IndexError, OSError
        detail = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"model.gguf_file: {path} is not a readable GGUF ({type(e).__name__}"
                          f"{': ' + detail if detail else ''})") from None


def check_deepspeed_json(path: str) -> None:
    _require(Path(path).is_file(), "deepspeed_config", f"no such file {path}")
    try:
        zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config: {path} is not valid JSON ({e})") from None
    _require(zero.get("stage") == 3, "deepspeed_config", f"{path}: zero_optimization.stage must be 3")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value, choices, key: str) -> None:
    _require(value in choices, key, f"must be one of {list(choices)}, got {value!r}")


# PyYAML follows YAML 1.1, where 1e-6 (no dot) is a string; accept it as a float.
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?\d+\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def parse_value(text: str):
    """A command-line value as YAML would read it (numbers, booleans, null, lists, strings)."""
    return yaml.load(text, Loader=_Loader)


def apply_override(raw: dict, assignment: str) -> None:
    """Set a dotted key (``optim.lr=1e-6``) in a raw config dict."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r}: expected key=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[leaf] = parse_value(value)
    _expand_objective(raw)  # objective=NAME, then objective.KEY=VALUE


def from_dict(raw: dict) -> TrainConfig:
    """Validate a raw dict (from YAML plus overrides) into a TrainConfig."""
    raw = dict(raw)
    _expand_objective(raw)
    optim = dict(raw.pop("optim", None) or {})
    raw["optim"] = {"name": optim.pop("name", "mezo"), "options": optim}
    if "model" not in raw:
        raise ConfigError("model: missing (set model.name_or_path, model.config or model.gguf_file)")
    _check_keys(raw)
    try:
        cfg = dacite.from_dict(TrainConfig, raw, config=dacite.Config(strict=True))
    except dacite.WrongTypeError as e:
        raise ConfigError(f"{e.field_path}: expected {_type_name(e.field_type)}, got {e.value!r}") from None
    except dacite.DaciteError as e:
        raise ConfigError(str(e)) from None
    _check_types(cfg)
    check_model_config(cfg.model)
    validate_optimizer(cfg.optim)
    return cfg


def validate_optimizer(optim: OptimConfig):
    """The optimizer's own config dataclass from the options (the checks of every entry point);
    the options become the checked values (integers where floats belong become floats)."""
    from zoscale.optim import optimizer_config

    config = optimizer_config(optim.name, optim.options, prefix="optim.")
    optim.options = {k: getattr(config, k) for k in optim.options}
    return config


def _check_types(cfg) -> None:
    """dacite takes booleans for numbers (bool is an int in Python): refuse them, naming the key."""
    from zoscale.optim.base import coerce

    for section, node in (("", cfg), ("model.", cfg.model), ("data.", cfg.data), ("objective.", cfg.objective)):
        for f in dataclasses.fields(node):
            coerce(getattr(node, f.name), f.type, f"{section}{f.name}")


# Fields of a model config that count or size something: a zero or negative value is a mistake.
_SIZE_FIELD = re.compile(r"^num_|(_size|_dim|_layers|_heads|_embeddings)$")


def check_model_config(model: ModelConfig) -> None:
    """A config dict the model would be built from, checked before anything is built: every key a
    field of that model type's config class (a typo would silently keep the class's default), each
    value of its field's type, sizes positive, then transformers' own checks."""
    if model.config is None:
        return
    import difflib
    import inspect

    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    model_type = model.config["model_type"]
    # an unknown type: transformers' own error below names the known ones (the lazy mapping's get() finds nothing)
    cls = CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None
    defaults = {**PretrainedConfig().to_dict(), **(cls().to_dict() if cls else {})}
    known = set(defaults) | set(getattr(cls, "attribute_map", {})) | \
        (set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"} if cls else set())
    for key, value in model.config.items() if cls else ():
        if key not in known and not key.startswith("_"):
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; valid: {sorted(known)}"
            raise ConfigError(f"model.config.{key}: not a field of {model_type}'s config{hint}")
        default = defaults.get(key)
        if isinstance(default, bool):
            _require(isinstance(value, bool), f"model.config.{key}", f"must be true or false, got {value!r}")
        elif isinstance(default, int) and _SIZE_FIELD.search(key) and value is not None:
            _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"model.config.{key}",
                     f"must be a positive integer, got {value!r}")
    fields = {k: v for k, v in model.config.items() if k != "model_type"}
    try:
        AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers raises ValueError, KeyError or its own validation errors
        raise ConfigError(f"model.config: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") \
            from None


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _check_keys(raw: dict) -> None:
    """Unknown keys, named with their section and the valid choices."""
    for section, cls in (("", TrainConfig), ("model.", ModelConfig), ("data.", DataConfig),
                         ("objective.", ObjectiveConfig)):
        node = raw if not section else raw.get(section[:-1])
        if not isinstance(node, dict):
            continue
        names = sorted(f.name for f in dataclasses.fields(cls))
        for key in node:
            if key not in names:
                raise ConfigError(f"{section}{key}: unknown key; valid: {names}")


def load(path: Path | None, overrides: list[str] = (), defaults: Path | None = None) -> TrainConfig:
    """A YAML file (or ``defaults``) plus dotted overrides -> a validated TrainConfig."""
    source = path or defaults
    raw: dict = {}
    if source is not None:
        if not Path(source).is_file():
            raise ConfigError(f"--config: no such file {source}")
        try:
            raw = yaml.load(Path(source).read_text(), Loader=_Loader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {source}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {source}: the top level must be a mapping")
        _resolve_paths(raw, Path(source).resolve().parent)
    for assignment in overrides:
        apply_override(raw, assignment)
    launcher_shard_size = os.environ.get("ZOSCALE_SHARD_SIZE")  # the SLURM scripts' default: one node
    key = SHARD_SIZE_KEYS.get(raw.get("backend"))
    if launcher_shard_size and key and key not in raw:
        raw[key] = parse_value(launcher_shard_size)
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("config"), str):  # a config.json, e.g. configs/models/
        _require(Path(model["config"]).is_file(), "model.config", f"no such file {model['config']}")
        try:
            model["config"] = json.loads(Path(model["config"]).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.config: {model['config']} is not valid JSON ({e})") from None
    return from_dict(raw)


# Keys that may hold a local path: a relative one is read against the config file's directory
# when something exists there (hub ids such as facebook/opt-13b are left alone).
PATH_KEYS = (("model", "name_or_path"), ("model", "gguf_file"), ("model", "config"), ("model", "tokenizer"),
             ("data", "path"), ("data", "task"), (None, "deepspeed_config"))


def _resolve_paths(raw: dict, base: Path) -> None:
    _expand_objective(raw, base)
    for section, key in PATH_KEYS:
        node = raw if section is None else (raw.get(section) or {})
        value = node.get(key)
        if key == "task" and not str(value).endswith((".yaml", ".yml")):
            continue  # a task name, not a file
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
            node[key] = str((base / value).resolve())


def _expand_objective(raw: dict, base: Path | None = None) -> None:
    """``objective: accuracy`` or ``objective: MODULE:FUNCTION`` (one reward) as the section they
    stand for; reward files found relative to ``base`` (default: the working directory) as
    absolute paths; integer weights as floats."""
    objective = raw.get("objective")
    if isinstance(objective, str):
        _require(objective in OBJECTIVES or ":" in objective, "objective",
                 f"{objective!r} is neither one of {list(OBJECTIVES[:-1])} nor a reward function MODULE:FUNCTION")
        objective = raw["objective"] = {"name": objective} if objective in OBJECTIVES else \
            {"name": "reward", "rewards": [objective]}
    if isinstance(objective, dict) and isinstance(objective.get("rewards"), list):  # files as absolute paths
        objective["rewards"] = [_resolve_file_spec(spec, base or Path.cwd()) for spec in objective["rewards"]]
    if isinstance(objective, dict) and isinstance(objective.get("weights"), list):
        objective["weights"] = [float(w) if isinstance(w, int) and not isinstance(w, bool) else w
                                for w in objective["weights"]]


def _resolve_file_spec(spec, base: Path):
    """path/file.py:FUNCTION with a relative path that exists under ``base``: made absolute."""
    if not isinstance(spec, str):
        return spec
    path, sep, function = spec.rpartition(":")
    if sep and path.endswith(".py") and not Path(path).is_absolute() and (base / path).is_file():
        return f"{(base / path).resolve()}:{function}"
    return spec


def to_dict(cfg: TrainConfig) -> dict:
    """The resolved config as saved with a run (optimizer options back at optim's top level)."""
    raw = dataclasses.asdict(cfg)
    optim = raw.pop("optim")
    raw["optim"] = {"name": optim["name"], **optim["options"]}
    return raw
