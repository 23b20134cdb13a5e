"""One run's configuration: every knob of the protocol, checked before any work starts.

Flag names follow the authors' fed-mammoth (``--num_clients --num_comm_rounds --num_epochs --batch_size --lr
--r --distribution_alpha --participation_rate --train_matrix --alpha_regmean_head --alpha_regmean_backbone
--regmean_rounds --lr_A --lr_B --wd_reg --gram_dtype``); the defaults are the embedded default run (see
docs/fcil.md), the paper's commands spell their values out as the authors' README does.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("lorm", "fedit", "ffa-lora", "lora-fair", "centralized")
DATASETS = ("mnist", "cifar100", "imagefolder")
EMBEDDED_NETWORK = "digits-vit"  # the small ViT of the embedded default, pretrained on scikit-learn's digits
# Flags read by one strategy only.
STRATEGY_FIELDS = {
    "lorm": (
        "train_matrix",
        "alpha_regmean_head",
        "alpha_regmean_backbone",
        "regmean_rounds",
        "gram_dtype",
        "prereduce",
    ),
    "lora-fair": ("lora_fair_lambda", "lora_fair_steps", "lora_fair_lr"),
}
# The authors resample a task's split until every client holds this many training samples.
MIN_TRAIN_SAMPLES_PER_CLIENT = 6


# derive_seed purpose tags
SEED_SPLIT, SEED_PARTICIPATION, SEED_INIT, SEED_CLIENT, SEED_ROUND_TESTS = range(5)


def derive_seed(seed: int, *keys: int) -> int:
    """An independent seed for one use of the run seed (keys: a purpose tag, task, round, client...), so that
    every step draws the same numbers however the run got there: resumed, reordered, or in another process."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any work starts."""


@dataclass(frozen=True)
class RunConfig:
    strategy: str = "lorm"
    seed: int = 0
    # data
    dataset: str = "mnist"
    data_path: str | None = None
    n_tasks: int | None = None  # None: the dataset's usual number (mnist 5, cifar100 10, imagefolder 10)
    class_order: str = "label"  # "label" as the authors, or "permuted" (a permutation seeded by ``seed``)
    split_file: str | None = None  # None: the seeded Dirichlet split; else the split in this JSON file
    # model
    network: str = EMBEDDED_NETWORK
    pretrained: bool = True
    pretrained_path: str | None = None
    r: int = 4
    lora_alpha: float | None = None  # None: no scaling (the authors); else the update is (lora_alpha / r) B A
    # federation
    num_clients: int = 10
    num_comm_rounds: int = 5
    participation_rate: float = 1.0
    distribution_alpha: float = 0.5
    # local training
    num_epochs: int = 2
    batch_size: int = 16
    lr: float = 3e-3
    lr_A: float = -1.0  # < 0: use lr; 0 freezes A (the authors)
    lr_B: float = -1.0  # < 0: use lr; 0 freezes B
    wd_reg: float = 0.0
    # LoRM
    train_matrix: str = "alt"
    alpha_regmean_head: float = 0.5
    alpha_regmean_backbone: float = 0.0  # < 0: alpha_regmean_head (the authors' default, -1)
    regmean_rounds: int = 1
    gram_dtype: str = "32"
    prereduce: bool = False
    # LoRA-FAIR server correction
    lora_fair_lambda: float = 0.01
    lora_fair_steps: int = 100
    lora_fair_lr: float = 0.01
    # evaluation: task ends read every test sample (the accuracy matrix); a round, at most this many per seen
    # task, a fixed seeded sample (-1: all, as the authors' code)
    round_eval_samples: int = 200
    # execution
    device: str = "cpu"
    num_threads: int = 1

    @property
    def factor_lrs(self) -> dict[str, float]:
        """As the authors' LoRM (``lr_X if lr_X >= 0 else lr``): 0 is a learning rate, the factor stays put."""
        return {"A": self.lr_A if self.lr_A >= 0 else self.lr, "B": self.lr_B if self.lr_B >= 0 else self.lr}

    @property
    def backbone_alpha(self) -> float:
        """The Gram shrinkage of the adapted layers; below 0 it is the head's, as the authors' RegMean."""
        return self.alpha_regmean_head if self.alpha_regmean_backbone < 0 else self.alpha_regmean_backbone

    @property
    def lora_scaling(self) -> float:
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.r

    @classmethod
    def for_strategy(cls, strategy: str, **fields) -> RunConfig:
        """The configuration of one strategy: the flags only another strategy reads keep their defaults, so
        that its run folder (and its results) do not depend on them."""
        foreign = {f for other, names in STRATEGY_FIELDS.items() if other != strategy for f in names}
        defaults = cls()
        return cls(strategy=strategy, **{k: getattr(defaults, k) if k in foreign else v for k, v in fields.items()})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}")
        return cls(**data)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: RunConfig) -> None:
    """Every check that needs neither the data nor the model (those come in ``driver.prepare``)."""
    c = config
    _require(c.strategy in STRATEGIES, f"unknown strategy {c.strategy!r}; choose from {', '.join(STRATEGIES)}")
    _require(c.dataset in DATASETS, f"unknown dataset {c.dataset!r}; choose from {', '.join(DATASETS)}")
    _require(c.distribution_alpha > 0, f"--distribution_alpha (Dirichlet β) must be > 0, got {c.distribution_alpha}")
    _require(0 < c.participation_rate <= 1, f"--participation_rate must be in (0, 1], got {c.participation_rate}")
    _require(c.num_clients >= 1, f"--num_clients must be at least 1, got {c.num_clients}")
    _require(
        int(c.num_clients * c.participation_rate) >= 1,
        f"--participation_rate {c.participation_rate} of {c.num_clients} clients selects nobody",
    )
    for flag in ("num_comm_rounds", "num_epochs", "batch_size", "r", "regmean_rounds", "num_threads"):
        _require(getattr(c, flag) >= 1, f"--{flag} must be at least 1, got {getattr(c, flag)}")
    _require(
        c.round_eval_samples == -1 or c.round_eval_samples >= 1,
        f"--round_eval_samples must be at least 1 (or -1: every test sample), got {c.round_eval_samples}",
    )
    _require(c.lora_fair_steps >= 0, f"--lora_fair_steps must be >= 0, got {c.lora_fair_steps}")
    _require(c.n_tasks is None or c.n_tasks >= 1, f"--n_tasks must be at least 1, got {c.n_tasks}")
    _require(c.lr > 0, f"--lr must be > 0, got {c.lr}")
    _require(c.wd_reg >= 0, f"--wd_reg must be >= 0, got {c.wd_reg}")
    _require(c.lora_alpha is None or c.lora_alpha > 0, f"--lora_alpha must be > 0, got {c.lora_alpha}")
    _require(c.lora_fair_lambda >= 0 and c.lora_fair_lr > 0, "--lora_fair_lambda must be >= 0 and --lora_fair_lr > 0")
    _require(0 <= c.alpha_regmean_head <= 1, f"--alpha_regmean_head must be in [0, 1], got {c.alpha_regmean_head}")
    _require(
        c.alpha_regmean_backbone <= 1,
        f"--alpha_regmean_backbone must be in [0, 1] (or < 0: --alpha_regmean_head), got {c.alpha_regmean_backbone}",
    )
    _require(c.train_matrix.lower() in ("alt", "a", "b"), f"--train_matrix must be alt, A or B, got {c.train_matrix!r}")
    _require(c.gram_dtype in ("32", "64"), f"--gram_dtype must be 32 or 64, got {c.gram_dtype!r}")
    _require(c.class_order in ("label", "permuted"), f"--class_order must be label or permuted, got {c.class_order!r}")
    _require(not (c.prereduce and c.strategy != "lorm"), f"--prereduce applies to lorm only, not to {c.strategy!r}")
    if c.dataset != "mnist":
        _require(c.data_path is not None, f"--dataset {c.dataset} reads its data from disk: give --data_path")
        _require(os.path.exists(c.data_path), f"--data_path {c.data_path!r} does not exist")
    if c.split_file is not None:
        _require(os.path.isfile(c.split_file), f"--split_file {c.split_file!r}: no such file")
    if c.pretrained_path is not None:
        _require(os.path.isfile(c.pretrained_path), f"--pretrained_path {c.pretrained_path!r}: no such weights file")
        _require(c.pretrained, "--pretrained_path given together with --pretrained False")
    _require(c.device == "cpu" or c.device.startswith("cuda"), f"--device must be cpu or cuda[:N], got {c.device!r}")
    if c.device.startswith("cuda"):
        import torch

        try:
            index = torch.device(c.device).index
        except RuntimeError:
            raise ConfigError(f"--device must be cpu or cuda[:N], got {c.device!r}") from None
        _require(torch.cuda.is_available(), f"--device {c.device}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        _require(index is None or index < count, f"--device {c.device}: this machine has {count} CUDA device(s)")
