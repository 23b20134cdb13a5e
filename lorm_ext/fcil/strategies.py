"""Server side of each strategy: the state clients start from, and how their messages become the new state.

A server takes part in the protocol of ``protocol`` (``open_unit``, ``receive`` per client, ``close_unit``):
a round is ``open_round`` / ``close``, a task end ``open_task_end`` (LoRM asks the clients for the Grams of
the task's final model; None for the others) / ``close_task``. A server reads each message as the instruction
it sent lays it out (``protocol.layout``). ``state_dict`` / ``load_state_dict`` checkpoint it between units.
Seeds are derived from (seed, task, round, client), so a run split over processes reproduces the in-process run
bit for bit as long as messages are added in the same order. The server never holds more than one client's
message: every merge is a running sum.

Strategies (all train the head in full; all but LoRM average it by samples):
- ``lorm``: rounds alternate the trained factor, B first (``--train_matrix alt``); the B-step with A shared
  is B = (Σ B_k P_k)(Σ P_k)⁺, the A-step with B shared A = (Σ A_k G_k) G⁺, the head is merged by RegMean
  (bias: sample-weighted mean). After each task the clients' Grams of the final model feed the cross-task
  merge ΔW = (Σ_t s·B_t A_t G_t)(Σ_t G_t)⁺, which is the evaluated model from the second task on (solved
  once per task end, not per evaluation).
- ``fedit``: both factors trained, averaged separately (FedAvg of A and of B).
- ``ffa-lora``: A frozen at its random initialisation, B trained and averaged.
- ``lora-fair``: FedIT's averages Ā, B̄, then B = B̄ + ΔB with ΔB = argmin 1 − cos(ΔW, (B̄ + ΔB) Ā) + λ‖ΔB‖²,
  ΔW = Σ p_k B_k A_k (p_k ∝ samples). Pinned choices: ΔB starts at 0; the cosine is over the flattened
  out × in matrices, per layer; ``lora_fair_steps`` Adam steps with step size ``lora_fair_lr`` × RMS(B̄) (1 − cos
  is blind to the scale of B, so the step follows it); float64.
- ``centralized``: FedIT's server with a single client holding the union of the clients' data.
Across tasks the baselines evaluate the mean of the task updates, W0 + (1/T) Σ_t s·B_t A_t, as the authors'
LoRA baseline (``cl_merge=individual_mean``); every strategy trains task t from W0 + s·B_t A_t alone.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..merge import AStepMerger, BStepMerger, RegMeanMerger
from ..validation import LayerError, check_layer_names, check_values
from .config import SEED_INIT, RunConfig, derive_seed
from .protocol import (
    FIT,
    HEAD,
    HEAD_BIAS,
    HEAD_WEIGHT,
    NUM_SAMPLES,
    TASK_GRAMS,
    Instruction,
    delta_weight,
    factor_key,
    gram_key,
    layout,
    projection_keys,
    scaled_b,
    task_factor_key,
)


class Server(ABC):
    """State shared by every strategy: the current factors and head ("A/<layer>", "B/<layer>", "head/weight",
    "head/bias"), the sum of finished tasks' updates ("past") and the finished tasks' adapters."""

    name = ""
    trains = "AB"
    pooled = False  # True: one client holding the union of all clients' data

    def __init__(self, config: RunConfig, layer_shapes: Mapping[str, tuple[int, int]], head: Mapping[str, Tensor]):
        self.config = config
        self.shapes = dict(layer_shapes)
        self.device = head["weight"].device
        self.current: dict[str, Tensor] = {f"head/{k}": v.detach().clone() for k, v in head.items()}
        self.task_adapters: dict[str, Tensor] = {}
        self.task = -1
        self.finished = 0  # tasks folded into past
        self._rebuild_past()

    def start_task(self, task: int) -> None:
        """Both factors re-initialised: B = 0, A Kaiming-uniform (a = √5), seeded by (seed, task)."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, SEED_INIT, task))
        for name, (out_features, in_features) in self.shapes.items():
            a = torch.empty(self.config.r, in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.current[factor_key("A", name)] = a.to(self.device)
            self.current[factor_key("B", name)] = torch.zeros(out_features, self.config.r, device=self.device)
        self.task = task

    def update(self, name: str) -> Tensor:
        """s·B A of the current factors for one layer."""
        return delta_weight(self.config, self.current[factor_key("B", name)], self.current[factor_key("A", name)])

    def _instruction(self, phase: str, round: int, classes: tuple[int, int], **kwargs) -> Instruction:
        return Instruction(phase, self.task, round, *classes, **kwargs)

    @abstractmethod
    def open_round(self, round: int, classes: tuple[int, int]) -> Instruction:
        """Starts a round; the instruction every selected client gets."""

    @abstractmethod
    def receive(self, message: Mapping[str, Tensor]) -> None:
        """Folds one client's message into the running sums."""

    @abstractmethod
    def close(self) -> None:
        """Ends the round: the merge."""

    def open_task_end(self, classes: tuple[int, int]) -> Instruction | None:
        """What clients report at the end of a task; None: nothing."""
        return None

    def close_task(self) -> None:
        """Keeps the finished task's adapter and folds its update into the running sum."""
        for name in self.shapes:
            for factor in "AB":
                adapter = self.current[factor_key(factor, name)].clone()
                self.task_adapters[task_factor_key(self.task, factor, name)] = adapter
        self._fold(self.task)
        self.finished = self.task + 1

    def _rebuild_past(self) -> None:
        self.past = {n: torch.zeros(shape, device=self.device) for n, shape in self.shapes.items()}
        for task in range(self.finished):
            self._fold(task)

    def _fold(self, task: int) -> None:
        """past += s·B_t A_t, the same floats whether at the task's end or rebuilt from a checkpoint."""
        for name in self.shapes:
            b, a = (self.task_adapters[task_factor_key(task, factor, name)] for factor in "BA")
            self.past[name] += delta_weight(self.config, b, a)

    def evaluation_deltas(self) -> dict[str, Tensor]:
        """The update the server's model adds to W0: the mean over tasks so far of s·B_t A_t."""
        if self.finished == self.task + 1:
            return {n: p / self.finished for n, p in self.past.items()}
        return {n: (p + self.update(n)) / (self.finished + 1) for n, p in self.past.items()}

    def head(self) -> dict[str, Tensor]:
        return {"weight": self.current[HEAD_WEIGHT], "bias": self.current[HEAD_BIAS]}

    def model_tensors(self) -> dict[str, Tensor]:
        """The server's model as tensors (the run's adapters.safetensors): the update W0 gets in every adapted
        layer ("delta/<layer>"), the head ("head/weight", "head/bias") and every finished task's factors
        ("task<t>/A/<layer>", "task<t>/B/<layer>")."""
        tensors = {f"delta/{n}": d for n, d in self.evaluation_deltas().items()}
        return tensors | {f"head/{k}": v for k, v in self.head().items()} | self.task_adapters

    def state_dict(self) -> dict:
        return {
            "current": self.current,
            "task_adapters": self.task_adapters,
            "task": self.task,
            "finished": self.finished,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """``state_dict()`` output of a server of this run, checked whole before anything changes: a ValueError
        names the first problem (``_check_state``)."""
        self._check_state(state)
        self._set_state(state)

    def _check_state(self, state) -> None:
        """The keys of ``state_dict()``; task counters with task ≥ -1 and finished ∈ {task, task + 1}; the current
        tensors (the head, and the factors once a task started) and the finished tasks' adapters, each with its
        name, shape and dtype and finite."""
        expected_keys = set(self.state_dict())
        if not isinstance(state, Mapping) or set(state) != expected_keys:
            got = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"server state: expected the keys {sorted(expected_keys)}, got {got}")
        task, finished = state["task"], state["finished"]
        if not all(type(n) is int for n in (task, finished)) or task < -1 or finished not in (task, task + 1):
            raise ValueError(f"server state: task {task!r} and finished {finished!r} are not a stage of a run")
        head = {f"head/{k}": v for k, v in self.head().items()}
        factors = {
            (factor, name): shape
            for name, (out_features, in_features) in self.shapes.items()
            for factor, shape in (("A", (self.config.r, in_features)), ("B", (out_features, self.config.r)))
        }
        current = {factor_key(*key): shape for key, shape in factors.items()} if task >= 0 else {}
        expected = {
            "current": {k: tuple(v.shape) for k, v in head.items()} | current,
            "task_adapters": {
                task_factor_key(t, *key): shape for t in range(finished) for key, shape in factors.items()
            },
        }
        dtype = head[HEAD_WEIGHT].dtype
        for part, shapes in expected.items():
            tensors = state[part]
            if not isinstance(tensors, Mapping):
                raise ValueError(f"server state: {part} must be a dict of tensors, got {type(tensors).__name__}")
            check_layer_names(shapes, tensors, f"server state: {part}")
            for key, shape in shapes.items():
                t = tensors[key]
                if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                    got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"server state: {part} {key!r} must be {dtype} {shape}, got {got}")
            if tensors:
                try:
                    check_values({}, [(key, f"{part} tensor", t) for key, t in tensors.items()])
                except LayerError as error:
                    raise ValueError(f"server state: {error}") from None

    def _set_state(self, state: Mapping) -> None:
        self.current, self.task_adapters = dict(state["current"]), dict(state["task_adapters"])
        self.task, self.finished = state["task"], state["finished"]
        self._rebuild_past()


class FedIT(Server):
    """Sample-weighted FedAvg of whatever the clients trained (A and B separately) and of the head."""

    name = "fedit"

    def open_round(self, round: int, classes: tuple[int, int]) -> Instruction:
        self._sums: dict[str, Tensor] = {}
        self._samples = 0
        return self._instruction(FIT, round, classes, train=self.trains, tensors=dict(self.current))

    def receive(self, message: Mapping[str, Tensor]) -> None:
        weight = int(message[NUM_SAMPLES])
        self._samples += weight
        for key, value in message.items():
            if key in self.current:
                self._sums[key] = self._sums.get(key, 0) + weight * value.to(torch.float64)

    def close(self) -> None:
        for key, total in self._sums.items():
            self.current[key] = (total / self._samples).to(self.current[key].dtype)


class FFALoRA(FedIT):
    """FedIT with A frozen: only B (and the head) is trained and averaged."""

    name = "ffa-lora"
    trains = "B"


class Centralized(FedIT):
    """The same LoRA model trained on the union of all clients' data: one client, so averaging is the identity."""

    name = "centralized"
    pooled = True


def lora_fair_correction(
    targets: Mapping[str, Tensor],
    b_means: Mapping[str, Tensor],
    a_means: Mapping[str, Tensor],
    *,
    lam: float,
    steps: int,
    lr: float,
) -> dict[str, Tensor]:
    """ΔB per layer minimising 1 − cos(ΔW, (B̄ + ΔB) Ā) + λ‖ΔB‖² (see the module docstring), float64.

    The cosine never forms an out × in product: ⟨ΔW, B Ā⟩ = ⟨B, ΔW Āᵀ⟩ and ‖B Ā‖² = ⟨BᵀB, Ā Āᵀ⟩."""
    names = list(b_means)
    b = {n: b_means[n].to(torch.float64) for n in names}
    target_a = {n: targets[n].to(torch.float64) @ a_means[n].to(torch.float64).T for n in names}
    a_gram = {n: a_means[n].to(torch.float64) @ a_means[n].to(torch.float64).T for n in names}
    target_norm = {n: targets[n].to(torch.float64).norm() for n in names}
    deltas = {n: torch.zeros_like(b[n], requires_grad=True) for n in names}
    optimizer = torch.optim.Adam([{"params": [deltas[n]], "lr": lr * float(b[n].pow(2).mean().sqrt())} for n in names])
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(steps):
        loss = 0.0
        for n in names:
            merged = b[n] + deltas[n]
            norm = ((merged.T @ merged) * a_gram[n]).sum().clamp_min(tiny).sqrt()
            cosine = (merged * target_a[n]).sum() / (target_norm[n] * norm).clamp_min(tiny)
            loss = loss + 1 - cosine + lam * deltas[n].pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {n: d.detach() for n, d in deltas.items()}


class LoRAFAIR(FedIT):
    """FedIT's averages, then the server-side correction of B (``lora_fair_correction``)."""

    name = "lora-fair"

    def open_round(self, round: int, classes: tuple[int, int]) -> Instruction:
        self._targets: dict[str, Tensor] = {}
        return super().open_round(round, classes)

    def receive(self, message: Mapping[str, Tensor]) -> None:
        super().receive(message)
        weight = int(message[NUM_SAMPLES])
        for name in self.shapes:
            b, a = (message[factor_key(factor, name)].to(torch.float64) for factor in "BA")
            product = b @ a  # B_k A_k without s: the cosine the correction maximises is blind to it
            self._targets[name] = self._targets.get(name, 0) + weight * product

    def close(self) -> None:
        super().close()
        corrections = lora_fair_correction(
            {n: t / self._samples for n, t in self._targets.items()},
            {n: self.current[factor_key("B", n)] for n in self.shapes},
            {n: self.current[factor_key("A", n)] for n in self.shapes},
            lam=self.config.lora_fair_lambda,
            steps=self.config.lora_fair_steps,
            lr=self.config.lora_fair_lr,
        )
        for name, delta in corrections.items():
            b = self.current[factor_key("B", name)]
            self.current[factor_key("B", name)] = b + delta.to(b.dtype)


class LoRM(Server):
    """Closed-form merges with the fused streaming mergers of lorm_ext.merge (see the module docstring)."""

    name = "lorm"

    def __init__(self, config: RunConfig, layer_shapes: Mapping[str, tuple[int, int]], head: Mapping[str, Tensor]):
        super().__init__(config, layer_shapes, head)
        self._across_tasks = RegMeanMerger()
        self._across_tasks_merged: dict[str, Tensor] | None = None  # the solve of _across_tasks' current sums
        self._sent: Instruction | None = None  # what the unit in progress asked the clients

    def trained_factor(self, round: int) -> str:
        """B in round 0, then A, B, A, ... (``alt``); or always the one named by --train_matrix."""
        if self.config.train_matrix.lower() == "alt":
            return "B" if round % 2 == 0 else "A"
        return self.config.train_matrix.upper()

    def _tensors(self) -> dict[str, Tensor]:
        return dict(self.current) | self.task_adapters

    def _factors(self, factor: str, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: tensors[factor_key(factor, n)] for n in self.shapes}

    def open_round(self, round: int, classes: tuple[int, int]) -> Instruction:
        factor = self.trained_factor(round)
        shared_a = self._factors("A", self.current)
        self._factor_merger = AStepMerger() if factor == "A" else BStepMerger(shared_a)
        self._head_merger = RegMeanMerger()
        self._bias_sum, self._samples = 0, 0
        self._sent = self._instruction(
            FIT, round, classes, train=factor, grams=True, prereduce=self.config.prereduce, tensors=self._tensors()
        )
        return self._sent

    def open_task_end(self, classes: tuple[int, int]) -> Instruction:
        self._sent = self._instruction(
            TASK_GRAMS, self.config.num_comm_rounds, classes, grams=True, tensors=self._tensors()
        )
        return self._sent

    def receive(self, message: Mapping[str, Tensor]) -> None:
        """One client's reply to the instruction of the unit in progress, read as that instruction laid it out."""
        what = layout(self._sent)
        grams = {n: message[gram_key(n)] for n in self.shapes} if what.layer_grams else {}
        if self._sent.phase == TASK_GRAMS:
            self._across_tasks.add_client(
                self._factors("A", self.current),
                grams,
                lefts={n: scaled_b(self.config, b) for n, b in self._factors("B", self.current).items()},
            )
            self._across_tasks_merged = None
            return
        if what.projections:
            weighted, projections = ({n: message[projection_keys(n)[i]] for n in self.shapes} for i in (0, 1))
            self._factor_merger.add_projections(weighted, projections)
        else:
            self._factor_merger.add_client(self._factors(self._sent.train, message), grams)
        self._head_merger.add_client({"head": message[HEAD_WEIGHT]}, {"head": message[gram_key(HEAD)]})
        weight = int(message[NUM_SAMPLES])
        self._bias_sum = self._bias_sum + weight * message[HEAD_BIAS].to(torch.float64)
        self._samples += weight

    def close(self) -> None:
        for name, merged in self._factor_merger.merge().items():
            self.current[factor_key(self._sent.train, name)] = merged.to(torch.float32)
        self.current[HEAD_WEIGHT] = self._head_merger.merge()["head"].to(torch.float32)
        self.current[HEAD_BIAS] = (self._bias_sum / self._samples).to(torch.float32)

    def evaluation_deltas(self) -> dict[str, Tensor]:
        """From the second task on, once the task is finished: the cross-task merge (solved once per change of
        its sums)."""
        if self.finished == self.task + 1 and self.task > 0:
            if self._across_tasks_merged is None:
                self._across_tasks_merged = {n: d.to(torch.float32) for n, d in self._across_tasks.merge().items()}
            return dict(self._across_tasks_merged)
        return super().evaluation_deltas()

    def state_dict(self) -> dict:
        return super().state_dict() | {"across_tasks": self._across_tasks.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """As ``Server.load_state_dict``; the cross-task sums are loaded into a new merger (which checks them) and
        must be those of this run's layers: (out, in) numerators from the first finished task on, none before."""
        self._check_state(state)
        across_tasks = RegMeanMerger()
        try:
            across_tasks.load_state_dict(state["across_tasks"])
        except ValueError as error:
            raise ValueError(f"server state: across_tasks: {error}") from None
        numerators = {
            name.removesuffix(".numerator"): tuple(t.shape)
            for name, t in state["across_tasks"]["sums"].items()
            if name.endswith(".numerator")
        }
        wanted = {name: tuple(shape) for name, shape in self.shapes.items()} if state["finished"] else {}
        if numerators != wanted:
            wrong = sorted(set(numerators) ^ set(wanted)) or [n for n in wanted if numerators[n] != wanted[n]]
            raise ValueError(
                f"server state: across_tasks must hold an (out, in) sum for every layer of this run once a task "
                f"finished, none before ({state['finished']} finished); layer {wrong[0]!r} does not fit"
            )
        self._set_state(state)
        self._across_tasks, self._across_tasks_merged = across_tasks, None


SERVERS: dict[str, type[Server]] = {cls.name: cls for cls in (LoRM, FedIT, FFALoRA, LoRAFAIR, Centralized)}
