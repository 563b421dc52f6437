"""The run configuration: one dataclass, the single source of truth.

Every field is a command-line flag of `cryknn.main` (and of the experiments) with the same
name, type, default and help (`cryknn.cli.command.define_dataclass_flags`). Fields marked
`defines_run` decide what a workdir's checkpoints mean: resuming a workdir with any of them
changed is refused (`cryknn.checkpoints`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cryknn import errors
from cryknn import elements as elements_lib
from cryknn.datasets.crystal_structures import DEFAULT_DATASET

CLASS_WEIGHTINGS = ("none", "inverse_frequency", "sqrt_inverse_frequency")
# Per-model defaults of the fields left at None (chosen on validation: docs/results.md).
# The graph model computes every atom of a structure as context anyway, so every atom
# carries a loss (the cap becomes a weight, `input_pipeline.class_weights`, and structures
# with rare elements come back more often, `class_repeats`: one epoch is ~11M loss atoms),
# a batch counts node slots; no dropout at that data volume. Directions cost 1.6x per step
# on CPU and gain 0.04 validation balanced accuracy; 16 angular channels beat 8 by 0.006-0.011
# on every seed (docs/results.md, A0.6).
_CAPPED = {"max_per_element": 40000, "epochs": 10, "batch_size": 512}
MODEL_DEFAULTS = {
    "graph": {"width": 64, "dropout": 0.0, "batch_size": 4096, "max_per_element": 40000,
              "epochs": 1, "directions": True, "angular_channels": 16},
    "mlp": {"width": 128, "dropout": 0.1, **_CAPPED},
    "tree": {"width": 64, "dropout": 0.1, **_CAPPED},
    "two_stage": {"dropout": 0.0, **_CAPPED},
}


def _field(default: Any, help_text: str, *, defines_run: bool = False) -> Any:
    return dataclasses.field(default=default,
                             metadata={"help": help_text, "defines_run": defines_run})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run depends on."""

    # Data.
    dataset: str = _field(DEFAULT_DATASET, "TFDS dataset name/config of crystal structures.",
                          defines_run=True)
    data_dir: str | None = _field(None, "TFDS data directory, also holding the feature cache "
                                  "(default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
    manual_dir: str | None = _field(None, "With --dataset=crystal_structures/cif_dir: the folder "
                                    "tree of CIF files the dataset is built from, if it is "
                                    "not built yet.")
    k: int = _field(5, "Nearest-neighbour distances per atom (>= 1).", defines_run=True)
    num_elements: int = _field(20, "Classify the N most abundant elements of the train split.")
    elements: str | None = _field(None, "Explicit element list, e.g. C,N,O,Li,Na,K "
                                  "(overrides --num_elements).")
    max_per_element: int | None = _field(
        None, "Cap on training atoms per element, the atoms that carry a loss (0: no cap; "
        "default: the model's, MODEL_DEFAULTS). Graph model: every atom carries a loss and "
        "each element weighs what this many of its atoms would.", defines_run=True)
    # Model.
    model: str = _field("tree", "tree (default: message passing over each atom's k-NN "
                        "neighbourhood unrolled on the host; the best on validation), graph "
                        "(message passing over whole structures on the device, optionally "
                        "with the directions of each atom's neighbours: linear cost in k and "
                        "hops), mlp (the atom's own distances only), or two_stage (the "
                        "original research's two-stage sigmoid model, called 'seed' there).",
                        defines_run=True)
    width: int | None = _field(None, "Hidden width of the mlp, graph and tree models (default: "
                               "the model's, MODEL_DEFAULTS: 128 for mlp, 64 for graph and "
                               "tree).", defines_run=True)
    depth: int = _field(2, "mlp: residual blocks.", defines_run=True)
    dropout: float | None = _field(None, "mlp, graph and tree: dropout rate in [0, 1) "
                                   "(default: the model's, MODEL_DEFAULTS).", defines_run=True)
    input_map: str = _field("raw", "mlp: input features, raw (the distances) or "
                            "inverse_log_diff ([1/d, log d, d[i+1]-d[i]]).", defines_run=True)
    hops: int = _field(2, "graph, tree: message-passing rounds over the periodic k-NN graph; each "
                       "atom sees its neighbours' distances up to this many hops away.",
                       defines_run=True)
    neighbour_elements: bool = _field(False, "Masked-atom mode (graph, tree): the model also "
                                      "sees the elements of each atom's neighbours, as when "
                                      "checking one site of a known structure.",
                                      defines_run=True)
    directions: bool | None = _field(None, "graph: also read the directions of each atom's "
                                     "neighbours (the shape of its shell), not only their "
                                     "distances (default: the model's, MODEL_DEFAULTS).",
                                     defines_run=True)
    angular_channels: int | None = _field(None, "graph with directions: message channels "
                                          "whose shell shape each layer reads (default: the "
                                          "model's, MODEL_DEFAULTS).", defines_run=True)
    element_states: bool = _field(False, "Masked-atom graph: each neighbour's element meets "
                                  "its geometry state in a small MLP before the element "
                                  "context pools it (exploratory; docs/results.md A0.7).",
                                  defines_run=True)
    # Optimisation.
    class_weighting: str = _field("sqrt_inverse_frequency", "Loss weight per element: none, "
                                  "inverse_frequency or sqrt_inverse_frequency.",
                                  defines_run=True)
    epochs: int | None = _field(None, "Passes over the selected training atoms (default: "
                                "the model's, MODEL_DEFAULTS).", defines_run=True)
    batch_size: int | None = _field(None, "Global batch size: atoms, or for the graph model "
                                    "node slots (default: the model's, MODEL_DEFAULTS).",
                                    defines_run=True)
    learning_rate: float = _field(2e-3, "Peak learning rate (AdamW, warmup + cosine decay).",
                                  defines_run=True)
    weight_decay: float = _field(1e-4, "AdamW weight decay.", defines_run=True)
    warmup_steps: int = _field(200, "Linear warmup steps (at most a tenth of the run).",
                               defines_run=True)
    seed: int = _field(0, "Random seed: initialisation, atom cap, batch order, dropout.",
                       defines_run=True)
    # Monitoring and scale-out.
    log_every: int = _field(200, "Steps between progress lines.")
    monitor_per_element: int = _field(2000, "Validation atoms per element for the per-epoch "
                                      "estimate (the training curves).")
    multihost: bool = _field(False, "Call jax.distributed.initialize() first (a multi-process "
                             "run; each process reads its own part of the data; build the "
                             "dataset first).")

    def __post_init__(self):
        for name, value in MODEL_DEFAULTS.get(self.model, {}).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model reads of each atom: its k distances and, for graph models, its
    neighbourhood up to `hops` hops (in masked-atom mode with the neighbours' elements).

    reads: 'atoms', 'tree' or 'graph' (`models.ModelKind.reads`).
    """

    k: int
    hops: int = 0
    neighbour_elements: bool = False
    reads: str = "tree"

    @property
    def receptive_hops(self) -> int:
        """Hops of the k-NN graph one prediction depends on (its receptive field): the
        graph model's element context reads two shells."""
        return max(self.hops, 2 if self.neighbour_elements else 0)


def input_spec(config: Config) -> InputSpec:
    from cryknn import models  # flax: only once a model is built

    reads = models.kind_of(config).reads
    if reads == "atoms":
        return InputSpec(config.k, reads=reads)
    return InputSpec(config.k, config.hops, config.neighbour_elements, reads)


def run_defining_fields() -> tuple[str, ...]:
    """Names of the Config fields that define what a workdir's checkpoints mean."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["defines_run"])


def from_dict(values: dict) -> Config:
    """A Config from a stored dict (config.json), ignoring keys it does not know."""
    names = {f.name for f in dataclasses.fields(Config)}
    renamed = {"features": "input_map"}  # the field's name before cryknn 0.2
    values = {renamed.get(key, key): value for key, value in values.items()}
    if values.get("model") == "seed":
        values["model"] = "two_stage"  # saved by cryknn 0.2, which took the research's name
    if values.get("model") == "graph" and "directions" not in values:
        values["model"] = "tree"  # before cryknn 0.3, 'graph' was the tree model
    if values.get("model") == "graph" and "angular_channels" not in values:
        values["angular_channels"] = 16  # graph models saved before the field existed
    return Config(**{key: value for key, value in values.items() if key in names})


def validate(config: Config) -> None:
    """Raise ConfigError (one line) for values that cannot work, before any data is read."""
    from cryknn import models  # flax: only once a run is really starting

    if config.k < 1:
        raise errors.ConfigError(f"--k must be at least 1, got {config.k}")
    models.check_model_config(config)
    if config.class_weighting not in CLASS_WEIGHTINGS:
        raise errors.ConfigError(f"--class_weighting must be one of "
                                 f"{', '.join(CLASS_WEIGHTINGS)}, got {config.class_weighting!r}")
    if config.elements:
        try:
            chosen = elements_lib.parse_element_list(config.elements)
        except errors.UnknownElementError as e:
            raise errors.ConfigError(f"--elements: {e}") from None
        if len(chosen) < 2:
            raise errors.ConfigError(f"--elements: need at least 2 elements to classify, "
                                     f"got {config.elements!r}")
    elif config.num_elements < 2:
        raise errors.ConfigError(f"--num_elements must be at least 2, got {config.num_elements}")
    for name in ("epochs", "batch_size", "log_every"):
        if getattr(config, name) < 1:
            raise errors.ConfigError(f"--{name} must be at least 1, got {getattr(config, name)}")
    if config.max_per_element < 0:
        raise errors.ConfigError(f"--max_per_element must be >= 0 (0: no cap), "
                                 f"got {config.max_per_element}")
    if config.monitor_per_element < 1:
        raise errors.ConfigError(f"--monitor_per_element must be at least 1, "
                                 f"got {config.monitor_per_element}")
    if not 0 < config.learning_rate < float("inf"):
        raise errors.ConfigError(f"--learning_rate must be positive, got {config.learning_rate}")
    if not 0 <= config.weight_decay < float("inf") or config.warmup_steps < 0:
        raise errors.ConfigError("--weight_decay and --warmup_steps must be >= 0")
