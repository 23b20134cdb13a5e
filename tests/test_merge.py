"""Streaming mergers against the reference, optimality and exact properties, and bad inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from lorm_testing import assert_rel_close, random_gram, with_nan

from lorm_ext import AdapterMerger, AStepMerger, BStepMerger, LayerError, RegMeanMerger, ops, project_client
from lorm_ext import reference as ref

# (out, in) of a few layers: a ViT-like mix where two layers share a shape (batched into one solve).
LAYERS = {"blocks.0.attn.qkv": (24, 16), "blocks.0.mlp.fc2": (16, 40), "blocks.1.attn.qkv": (24, 16)}


def make_clients(k, r, *, diagonal=False, tokens=None, device="cpu", dtype=torch.float32, layers=LAYERS):
    """k clients: per layer A_k (r × in), B_k (out × r) and a Gram (fewer tokens than features when asked)."""
    clients = []
    for _ in range(k):
        c = {"A": {}, "B": {}, "G": {}}
        for name, (out, width) in layers.items():
            c["A"][name] = torch.randn(r, width, device=device, dtype=dtype)
            c["B"][name] = torch.randn(out, r, device=device, dtype=dtype)
            c["G"][name] = random_gram(width, tokens or width + 7, dtype=dtype, device=device, diagonal=diagonal)
        clients.append(c)
    return clients


def _memory_mb(device, *, reset_peak: bool = False, peak: bool = False) -> float:
    """Memory in use (or its peak since the last reset) in MB: the CUDA allocator's, or this process's resident
    set on the CPU (Linux: VmRSS / VmHWM, the peak reset through /proc/self/clear_refs)."""
    if torch.device(device).type == "cuda":
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
        return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**20
    if reset_peak:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def column(clients, key, name):
    return [c[key][name] for c in clients]


def state_of(merger) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in merger.state_dict()["sums"].items()}


@pytest.mark.parametrize("k", [1, 2, 7, 50])
@pytest.mark.parametrize("r", [1, 16, 64])
@pytest.mark.parametrize("diagonal", [False, True])
def test_a_step_matches_reference(device, k, r, diagonal):
    clients = make_clients(k, r, diagonal=diagonal, device=device)
    merger = AStepMerger()
    for c in clients:
        merger.add_client(c["A"], c["G"])
    merged = merger.merge()
    for name in LAYERS:
        expected = ref.a_step_ref(column(clients, "A", name), column(clients, "G", name))
        assert_rel_close(merged[name], expected, 1e-8)


@pytest.mark.parametrize("k", [1, 3, 50])
@pytest.mark.parametrize("r", [1, 4, 64])
@pytest.mark.parametrize("diagonal", [False, True])
def test_b_step_matches_reference(device, k, r, diagonal):
    clients = make_clients(k, r, diagonal=diagonal, device=device)
    shared_a = clients[0]["A"]
    merger = BStepMerger(shared_a)
    for c in clients:
        merger.add_client(c["B"], c["G"])
    merged = merger.merge()
    for name in LAYERS:
        expected = ref.b_step_ref(column(clients, "B", name), shared_a[name], column(clients, "G", name))
        assert_rel_close(merged[name], expected, 1e-8)


def test_general_a_step_with_per_client_b_matches_reference(device):
    clients = make_clients(5, 3, device=device)
    shared_b = {name: torch.randn(out, 3, device=device) for name, (out, _) in LAYERS.items()}
    merger = AStepMerger(shared_b)
    for c in clients:
        merger.add_client(c["A"], c["G"], factors_b=c["B"])
    merged = merger.merge()
    for name in LAYERS:
        expected = ref.a_step_ref(
            column(clients, "A", name),
            column(clients, "G", name),
            Bs=column(clients, "B", name),
            shared_b=shared_b[name],
        )
        assert_rel_close(merged[name], expected, 1e-8)


def test_regmean_head_and_cross_task_merge(device):
    heads = [torch.randn(10, 16, device=device) for _ in range(4)]
    grams = [random_gram(16, 5, dtype=torch.float32, device=device) for _ in range(4)]  # singular Grams
    regmean = RegMeanMerger()
    for w, g in zip(heads, grams):
        regmean.add_client({"head": w}, {"head": g})
    assert_rel_close(regmean.merge()["head"], ref.regmean_ref(heads, grams), 1e-8)

    tasks = make_clients(3, 4, device=device)  # one (B_t, A_t, G_t) per task
    across = RegMeanMerger()
    for t in tasks:
        across.add_client(t["A"], t["G"], lefts=t["B"])
    merged = across.merge()
    for name in LAYERS:
        expected = ref.cross_task_ref(column(tasks, "B", name), column(tasks, "A", name), column(tasks, "G", name))
        assert_rel_close(merged[name], expected, 1e-8)


def test_pre_reduced_clients_give_the_same_b_step(device):
    clients = make_clients(6, 8, device=device)
    shared_a = clients[0]["A"]
    raw, reduced = BStepMerger(shared_a), BStepMerger(shared_a)
    for i, c in enumerate(clients):
        raw.add_client(c["B"], c["G"])
        if i % 2:  # a round may mix raw and pre-reduced clients
            reduced.add_client(c["B"], c["G"])
        else:
            reduced.add_projections(*project_client(shared_a, c["B"], c["G"]))
    a, b = raw.merge(), reduced.merge()
    for name in LAYERS:
        assert_rel_close(b[name], a[name], 1e-12)


class TestProperties:
    def test_one_client_returns_its_own_factors(self, device):
        (c,) = make_clients(1, 5, device=device)
        a_merged = AStepMerger()
        a_merged.add_client(c["A"], c["G"])
        b_merged = BStepMerger(c["A"])
        b_merged.add_client(c["B"], c["G"])
        for name in LAYERS:
            assert_rel_close(a_merged.merge()[name], c["A"][name].double(), 1e-9)
            assert_rel_close(b_merged.merge()[name], c["B"][name].double(), 1e-9)

    def test_isotropic_grams_give_the_sample_weighted_average(self, device):
        samples = [3, 10, 1, 40]
        width = LAYERS["blocks.0.mlp.fc2"][1]
        factors = [torch.randn(4, width, device=device, dtype=torch.float64) for _ in samples]
        merger = AStepMerger()
        for n, a in zip(samples, factors):
            merger.add_client({"l": a}, {"l": n * torch.eye(width, device=device, dtype=torch.float64)})
        average = sum(n * a for n, a in zip(samples, factors)) / sum(samples)
        assert_rel_close(merger.merge()["l"], average, 1e-12)

    def test_client_order_does_not_matter(self, device):
        clients = make_clients(5, 3, device=device)
        results = []
        for order in (range(5), [4, 2, 0, 3, 1]):
            merger = BStepMerger(clients[0]["A"])
            for i in order:
                merger.add_client(clients[i]["B"], clients[i]["G"])
            results.append(merger.merge())
        for name in LAYERS:
            assert_rel_close(results[1][name], results[0][name], 1e-10)

    def test_optimality_gradient_vanishes_and_beats_averaging(self, device):
        clients = make_clients(6, 4, device=device, dtype=torch.float64)
        name = "blocks.0.mlp.fc2"
        As, Bs, Gs = (column(clients, key, name) for key in "ABG")
        shared_b = Bs[0]
        merger = AStepMerger()
        for c in clients:
            merger.add_client(c["A"], c["G"])
        merged_a = merger.merge()[name].cpu().requires_grad_()
        targets = [shared_b.cpu() @ a.cpu() for a in As]
        grams = [g.cpu() for g in Gs]
        loss = ref.objective_ref(shared_b.cpu() @ merged_a, targets, grams)
        (grad,) = torch.autograd.grad(loss, merged_a)
        average = torch.stack(As).mean(0).cpu().requires_grad_()
        (grad_at_average,) = torch.autograd.grad(ref.objective_ref(shared_b.cpu() @ average, targets, grams), average)
        assert grad.abs().max() <= 1e-9 * grad_at_average.abs().max()
        assert loss <= ref.objective_ref(shared_b.cpu() @ average.detach(), targets, grams)

    def test_b_step_gradient_vanishes(self, device):
        clients = make_clients(4, 6, device=device, dtype=torch.float64)
        name = "blocks.0.attn.qkv"
        shared_a = clients[0]["A"]
        merger = BStepMerger(shared_a)
        for c in clients:
            merger.add_client(c["B"], c["G"])
        merged_b = merger.merge()[name].cpu().requires_grad_()
        a = shared_a[name].cpu()
        targets = [b.cpu() @ a for b in column(clients, "B", name)]
        grams = [g.cpu() for g in column(clients, "G", name)]
        (grad,) = torch.autograd.grad(ref.objective_ref(merged_b @ a, targets, grams), merged_b)
        average = torch.stack(column(clients, "B", name)).mean(0).cpu().requires_grad_()
        (grad_at_average,) = torch.autograd.grad(ref.objective_ref(average @ a, targets, grams), average)
        assert grad.abs().max() <= 1e-9 * grad_at_average.abs().max()

    def test_memory_does_not_grow_with_clients(self, device):
        # Peak memory of streaming k clients (made one at a time, each dropped after add_client) above the start:
        # one client's tensors and the sums, whatever k; keeping the clients would add 4.5 MB each (768² fp32).
        layers = {"wide": (64, 768)}

        def peak_growth_mb(k: int) -> float:
            merger = AStepMerger()
            start = _memory_mb(device, reset_peak=True)
            for _ in range(k):
                c = make_clients(1, 4, device=device, layers=layers)[0]
                merger.add_client(c["A"], c["G"])
                del c
            return _memory_mb(device, peak=True) - start

        peak_growth_mb(2)  # allocator warm-up
        few, many = peak_growth_mb(2), peak_growth_mb(40)
        assert many <= few + 20, (few, many)

    def test_checkpoint_mid_stream_equals_uninterrupted(self, device):
        clients = make_clients(6, 3, device=device)
        whole = RegMeanMerger()
        first = RegMeanMerger()
        for c in clients:
            whole.add_client(c["A"], c["G"], lefts=c["B"])
        for c in clients[:3]:
            first.add_client(c["A"], c["G"], lefts=c["B"])
        resumed = RegMeanMerger()
        state = first.state_dict()
        resumed.load_state_dict({**state, "sums": {k: v.clone() for k, v in state["sums"].items()}})
        for c in clients[3:]:
            resumed.add_client(c["A"], c["G"], lefts=c["B"])
        assert resumed.num_clients == 6
        for name, merged in whole.merge().items():
            assert torch.equal(resumed.merge()[name], merged)


class TestAdapterMerging:
    """Heterogeneous ranks merged into one rank-r adapter."""

    def make(self, device, ranks=(1, 4, 9), diagonal=False, tokens=None):
        layers = {"a": (12, 20), "b": (30, 8)}
        clients = [
            make_clients(1, r, device=device, dtype=torch.float64, layers=layers, diagonal=diagonal, tokens=tokens)[0]
            for r in ranks
        ]
        return layers, clients

    @pytest.mark.parametrize("diagonal", [False, True])
    def test_alternation_reaches_the_closed_form_optimum(self, device, diagonal):
        layers, clients = self.make(device, diagonal=diagonal)
        merger = AdapterMerger(3)
        for c in clients:
            merger.add_client(c["B"], c["A"], c["G"])
        exact = merger.objective(merger.merge("exact"))
        alternating = merger.objective(merger.merge("alternating"))
        starts = {n: torch.randn(3, w, device=device, dtype=torch.float64) for n, (_, w) in layers.items()}
        random_start = merger.objective(merger.merge("alternating", init_a=starts))
        for name in layers:
            assert alternating[name] == pytest.approx(exact[name], rel=1e-7)
            B, A = ref.rank_r_optimum_ref(*(column(clients, key, name) for key in "BAG"), 3)
            deltas = [b @ a for b, a in zip(column(clients, "B", name), column(clients, "A", name))]
            assert exact[name] == pytest.approx(
                ref.objective_ref(
                    B.cpu() @ A.cpu(), [d.cpu() for d in deltas], [g.cpu() for g in column(clients, "G", name)]
                ).item(),
                rel=1e-9,
            )
            assert random_start[name] == pytest.approx(exact[name], rel=1e-6)

    def test_alternation_matches_the_reference_and_never_increases(self, device):
        layers, clients = self.make(device)
        merger = AdapterMerger(2)
        for c in clients:
            merger.add_client(c["B"], c["A"], c["G"])
        merged = merger.merge("alternating")
        for name in layers:
            B, A, history = ref.merge_adapters_ref(*(column(clients, key, name) for key in "BAG"), 2)
            assert all(later <= earlier * (1 + 1e-12) for earlier, later in itertools.pairwise(history))
            assert_rel_close(merged[name][0] @ merged[name][1], (B @ A).to(device), 1e-5)

    def test_exact_optimum_beats_averaging_and_any_rank_r_candidate(self, device):
        layers, clients = self.make(device, ranks=(2, 2, 2), tokens=6)  # singular Grams
        merger = AdapterMerger(2)
        for c in clients:
            merger.add_client(c["B"], c["A"], c["G"])
        exact = merger.objective(merger.merge("exact"))
        averaged = {
            n: (torch.stack(column(clients, "B", n)).mean(0), torch.stack(column(clients, "A", n)).mean(0))
            for n in layers
        }
        for name, value in merger.objective(averaged).items():
            assert exact[name] <= value
        for _ in range(5):
            candidate = {
                n: (torch.randn(out, 2, device=device), torch.randn(2, w, device=device))
                for n, (out, w) in layers.items()
            }
            for name, value in merger.objective(candidate).items():
                assert exact[name] <= value


class TestBadInputs:
    """Every rejected client names the layer and the problem and leaves the sums unchanged."""

    def setup_merger(self, device):
        clients = make_clients(2, 4, device=device)
        merger = AStepMerger()
        merger.add_client(clients[0]["A"], clients[0]["G"])
        return merger, clients[1]

    def expect(self, merger, error, match, *args, **kwargs):
        before = state_of(merger)
        with pytest.raises(error, match=match):
            merger.add_client(*args, **kwargs)
        after = state_of(merger)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    def test_layer_names(self, device):
        merger, c = self.setup_merger(device)
        missing = {k: v for k, v in c["A"].items() if k != "blocks.0.mlp.fc2"}
        self.expect(merger, ValueError, r"missing \['blocks.0.mlp.fc2'\]", missing, c["G"])
        self.expect(
            merger, ValueError, r"unexpected \['extra'\]", {**c["A"], "extra": c["A"]["blocks.0.mlp.fc2"]}, c["G"]
        )

    @pytest.mark.parametrize(
        "corrupt,match",
        [
            (lambda g: g[:-1, :-1], r"layer 'blocks.0.mlp.fc2': gram is for 39 features, expected 40"),
            (lambda g: g[:, :-1], r"layer 'blocks.0.mlp.fc2': gram must be square"),
            (lambda g: g + torch.triu(torch.ones_like(g), 1), r"layer 'blocks.0.mlp.fc2': gram is not symmetric"),
            (lambda g: g.index_fill(0, torch.tensor([3], device=g.device), float("nan")), r"gram contains NaN or Inf"),
            (lambda g: g - 2 * torch.diag(torch.diagonal(g)), r"negative diagonal"),
            (lambda g: g.long(), r"gram must be floating point, got torch.int64"),
            (lambda g: torch.diagonal(g).clone(), r"gram is diagonal but this layer's Grams are full"),
        ],
    )
    def test_bad_grams(self, device, corrupt, match):
        merger, c = self.setup_merger(device)
        grams = {**c["G"], "blocks.0.mlp.fc2": corrupt(c["G"]["blocks.0.mlp.fc2"])}
        self.expect(merger, LayerError, match, c["A"], grams)

    def test_bad_factors(self, device):
        merger, c = self.setup_merger(device)
        name = "blocks.0.attn.qkv"
        self.expect(
            merger,
            LayerError,
            rf"layer '{name}': factor has shape \(5, 16\), expected \(4, 16\)",
            {**c["A"], name: torch.randn(5, 16, device=device)},
            c["G"],
        )
        self.expect(
            merger, LayerError, "factor contains NaN or Inf", {**c["A"], name: c["A"][name] * float("inf")}, c["G"]
        )
        self.expect(merger, LayerError, "factor must be a torch.Tensor", {**c["A"], name: [[1.0]]}, c["G"])

    def test_later_clients_leave_the_structure_checks_to_the_op_until_it_refuses_one(self, device, monkeypatch):
        # a client with the layer names, in order, of the last one that passed goes straight to the fused op; one
        # it refuses, and one with its layers in another order, get the Python checks (which name the problem)
        clients = make_clients(4, 4, device=device)
        merger, checked = AStepMerger(), []
        check = merger._check_client_structure
        monkeypatch.setattr(merger, "_check_client_structure", lambda *args: checked.append(1) or check(*args))
        merger.add_client(clients[0]["A"], clients[0]["G"])
        merger.add_client(clients[1]["A"], clients[1]["G"])
        assert len(checked) == 1
        name = "blocks.0.attn.qkv"
        bad = {**clients[2]["A"], name: torch.randn(4, 17, device=device)}
        self.expect(
            merger, LayerError, rf"layer '{name}': factor has shape \(4, 17\), expected \(4, 16\)", bad, clients[2]["G"]
        )
        assert len(checked) == 2
        merger.add_client(dict(reversed(clients[2]["A"].items())), clients[2]["G"])
        merger.add_client(clients[3]["A"], dict(reversed(clients[3]["G"].items())))
        assert len(checked) == 4
        merged = merger.merge()
        for name in LAYERS:
            expected = ref.a_step_ref(column(clients, "A", name), column(clients, "G", name))
            assert_rel_close(merged[name], expected, 1e-8)

    def test_an_op_failure_that_is_no_argument_check_is_raised_as_it_is(self, device, monkeypatch):
        # only the native argument checks (which run before any write) send a client back to the Python checks
        clients = make_clients(2, 4, device=device)
        merger = AStepMerger()
        merger.add_client(clients[0]["A"], clients[0]["G"])

        calls = []

        def out_of_memory(*args):
            calls.append(1)
            raise RuntimeError("CPU out of memory")

        monkeypatch.setattr(ops, "gram_weighted_accumulate_", out_of_memory)
        with pytest.raises(RuntimeError, match="^CPU out of memory$"):
            merger.add_client(clients[1]["A"], clients[1]["G"])
        assert len(calls) == 1  # not tried again after the checks: part of the sums may have been written

    def test_structure_checks_follow_a_loaded_state(self, device):
        # a client rejected for its values leaves its (valid) structure remembered and no sums; a state of other
        # shapes loaded then must be what the next client of that structure is checked against
        c, other = make_clients(1, 4, device=device)[0], make_clients(1, 5, device=device)[0]
        merger = AStepMerger()
        with pytest.raises(LayerError, match="NaN or Inf"):
            merger.add_client({k: v * float("nan") for k, v in c["A"].items()}, c["G"])
        wider = AStepMerger()
        wider.add_client(other["A"], other["G"])
        merger.load_state_dict(wider.state_dict())
        self.expect(merger, LayerError, r"factor has shape \(4, 16\), expected \(5, 16\)", c["A"], c["G"])

    def test_no_clients(self):
        for merger in (RegMeanMerger(), BStepMerger({"l": torch.randn(2, 3)}), AdapterMerger(1)):
            with pytest.raises(ValueError, match="no clients were added"):
                merger.merge()

    def test_b_step_rank_and_projection_errors(self, device):
        clients = make_clients(2, 4, device=device)
        merger = BStepMerger(clients[0]["A"])
        merger.add_client(clients[0]["B"], clients[0]["G"])
        name = "blocks.0.attn.qkv"
        self.expect(
            merger,
            LayerError,
            rf"layer '{name}': factor has shape \(24, 3\), expected \(24, 4\)",
            {**clients[1]["B"], name: torch.randn(24, 3, device=device)},
            clients[1]["G"],
        )
        weighted, projections = project_client(clients[0]["A"], clients[1]["B"], clients[1]["G"])
        projections[name] = projections[name] + torch.triu(torch.ones_like(projections[name]), 1)
        before = state_of(merger)
        with pytest.raises(LayerError, match=f"layer '{name}': gram is not symmetric"):
            merger.add_projections(weighted, projections)
        assert all(torch.equal(before[k], v) for k, v in state_of(merger).items())

    def test_lefts_must_be_consistent(self, device):
        clients = make_clients(2, 4, device=device)
        merger = RegMeanMerger()
        merger.add_client(clients[0]["A"], clients[0]["G"], lefts=clients[0]["B"])
        self.expect(
            merger, ValueError, "lefts must be sent by every client or by none", clients[1]["A"], clients[1]["G"]
        )

    def test_adapter_rank_above_layer_width(self, device):
        clients = make_clients(1, 2, device=device)
        merger = AdapterMerger(17)
        with pytest.raises(LayerError, match=r"layer 'blocks.0.attn.qkv': rank 17 exceeds"):
            merger.add_client(clients[0]["B"], clients[0]["A"], clients[0]["G"])
        assert merger.num_clients == 0


def _full_state(merger) -> dict:
    """state_dict() with the sums cloned and the scalars as they are: what a checkpoint holds."""
    state = merger.state_dict()
    return {**state, "sums": {k: v.clone() for k, v in state["sums"].items()}}


def _everything_of(merger) -> tuple:
    state = _full_state(merger)
    return state.pop("sums"), state


def _assert_unchanged(merger, before) -> None:
    sums, scalars = _everything_of(merger)
    assert scalars == before[1] and sums.keys() == before[0].keys()
    assert all(torch.equal(sums[k], before[0][k]) for k in sums)


QKV1 = "blocks.1.attn.qkv"  # the last layer of LAYERS: a bad entry there must not let the others be copied first


def _sums_changed(key: str, change):
    return lambda state: {**state, "sums": {**state["sums"], key: change(state["sums"][key])}}


# change of a RegMeanMerger state (float64, lefts, full Grams over LAYERS), the error; for a fresh merger too?
BAD_STATES = {
    "later layer's shape": (
        _sums_changed(f"{QKV1}.numerator", lambda t: t[:, :-1]),
        rf"load_state_dict: layer '{QKV1}': numerator has shape \(24, 15\), expected \((24|\*), 16\)",
        True,
    ),
    "(1, n) numerator": (
        _sums_changed(f"{QKV1}.numerator", lambda t: t[:1]),
        rf"load_state_dict: layer '{QKV1}': numerator has shape \(1, 16\), expected \(24, 16\)",
        False,  # a fresh merger cannot know the layer is not 1 × 16
    ),
    "(1, n) denominator": (
        _sums_changed(f"{QKV1}.denominator", lambda t: t[:1]),
        rf"layer '{QKV1}': denominator (has shape \(1, 16\), expected \(16, 16\)|must be \(n, n\) or a diagonal)",
        True,
    ),
    "diagonal denominator": (
        _sums_changed(f"{QKV1}.denominator", lambda t: t.diagonal().clone()),
        rf"layer '{QKV1}': denominator has shape \(16,\), expected \(16, 16\)",
        False,
    ),
    "NaN": (
        _sums_changed(f"{QKV1}.numerator", lambda t: with_nan(t, 5)),
        rf"load_state_dict: layer '{QKV1}': numerator contains NaN or Inf \(1 entries\)",
        True,
    ),
    "Inf": (
        _sums_changed(f"{QKV1}.denominator", lambda t: t * float("inf")),
        rf"load_state_dict: layer '{QKV1}': denominator contains NaN or Inf",
        True,
    ),
    "float32": (
        _sums_changed(f"{QKV1}.denominator", lambda t: t.float()),
        rf"layer '{QKV1}': denominator must be a torch.float64 tensor like the sums, got torch.float32",
        True,
    ),
    "integers": (
        _sums_changed(f"{QKV1}.numerator", lambda t: t.long()),
        rf"layer '{QKV1}': numerator must be a torch.float64 tensor like the sums, got torch.int64",
        True,
    ),
    "not a tensor": (
        _sums_changed(f"{QKV1}.numerator", lambda t: t.tolist()),
        rf"layer '{QKV1}': numerator must be a torch.float64 tensor like the sums, got list",
        True,
    ),
    "a missing half": (
        lambda s: {**s, "sums": {k: v for k, v in s["sums"].items() if k != f"{QKV1}.denominator"}},
        rf"the sums lack \['{QKV1}.denominator'\]",
        True,
    ),
    "another layer": (
        lambda s: {**s, "sums": {k.replace(QKV1, "extra"): v for k, v in s["sums"].items()}},
        r"load_state_dict: layer names differ from the expected ones: missing \['blocks.1.attn.qkv'\]; "
        r"unexpected \['extra'\]",
        False,
    ),
    "an odd key": (
        lambda s: {**s, "sums": {**s["sums"], "blocks.0.attn.qkv.weight": torch.zeros(1)}},
        r"the sums have keys \['blocks.0.attn.qkv.weight'\] that end in neither .numerator nor .denominator",
        True,
    ),
    "sums not a dict": (lambda s: {**s, "sums": list(s["sums"].values())}, "the sums must be a dict", True),
    "negative client count": (lambda s: {**s, "num_clients": -1}, "num_clients must be a non-negative integer", True),
    "client count a float": (lambda s: {**s, "num_clients": 2.0}, "num_clients must be a non-negative integer", True),
    "client count a tensor": (
        lambda s: {**s, "num_clients": torch.tensor(2)},
        "num_clients must be a non-negative integer",
        True,
    ),
    "no clients but sums": (lambda s: {**s, "num_clients": 0}, "num_clients is 0 but the sums hold 6 tensors", True),
    "uses_lefts not a bool": (lambda s: {**s, "uses_lefts": "yes"}, "uses_lefts must be None without clients", True),
    "a missing key": (
        lambda s: {k: v for k, v in s.items() if k != "uses_lefts"},
        r"expected a dict with the keys \['sums', 'num_clients', 'uses_lefts'\], got \['num_clients', 'sums'\]",
        True,
    ),
    "an extra key": (lambda s: {**s, "rcond": 1e-6}, "expected a dict with the keys", True),
}


class TestLoadStateDict:
    """A state is checked whole before anything is copied: every bad state names its problem and leaves the
    merger (allocated or fresh) unchanged; a good one resumes exactly."""

    def merger_with(self, clients, device, **kwargs):
        merger = RegMeanMerger(device=device, **kwargs)
        for c in clients:
            merger.add_client(c["A"], c["G"], lefts=c["B"])
        return merger

    @pytest.mark.parametrize("kind", BAD_STATES)
    def test_bad_state_is_refused_and_changes_nothing(self, device, kind):
        change, match, also_fresh = BAD_STATES[kind]
        clients = make_clients(3, 4, device=device)
        bad = change(_full_state(self.merger_with(clients[:2], device)))
        targets = [self.merger_with(clients[2:], device)] + [RegMeanMerger(device=device)] * also_fresh
        for target in targets:
            before = _everything_of(target)
            with pytest.raises(ValueError, match=match):
                target.load_state_dict(bad)
            _assert_unchanged(target, before)
            assert target.num_clients == before[1]["num_clients"]

    def test_values_are_not_checked_with_validate_false_but_shapes_are(self, device):
        clients = make_clients(2, 4, device=device)
        state = _full_state(self.merger_with(clients, device))
        unchecked = RegMeanMerger(device=device, validate=False)
        unchecked.load_state_dict(BAD_STATES["NaN"][0](state))
        assert unchecked.num_clients == 2
        with pytest.raises(ValueError, match="numerator has shape"):
            unchecked.load_state_dict(BAD_STATES["later layer's shape"][0](state))

    def test_a_good_state_replaces_everything_and_an_empty_one_resets(self, device):
        clients = make_clients(4, 4, device=device)
        source, target = self.merger_with(clients[:3], device), self.merger_with(clients[3:], device)
        target.load_state_dict(_full_state(source))
        assert all(torch.equal(target.merge()[n], m) for n, m in source.merge().items())
        target.load_state_dict(RegMeanMerger().state_dict())
        assert (target.num_clients, target.layers) == (0, [])
        target.add_client(clients[0]["A"], clients[0]["G"])  # a fresh stream: lefts are no longer required
        assert target.num_clients == 1

    def test_b_step_state_must_fit_the_shared_a(self, device):
        clients = make_clients(2, 4, device=device)
        source = BStepMerger(clients[0]["A"])
        source.add_client(clients[0]["B"], clients[0]["G"])
        state = _full_state(source)
        other_rank = BStepMerger({n: torch.randn(5, a.shape[1], device=device) for n, a in clients[0]["A"].items()})
        wrong_rank = r"layer 'blocks.0.attn.qkv': denominator has shape \(4, 4\), expected \(5, 5\)"
        with pytest.raises(ValueError, match=wrong_rank):
            other_rank.load_state_dict(state)
        assert other_rank.num_clients == 0 and other_rank.layers == []
        fewer_layers = BStepMerger({"blocks.0.attn.qkv": clients[0]["A"]["blocks.0.attn.qkv"]})
        with pytest.raises(ValueError, match=r"unexpected \['blocks.0.mlp.fc2', 'blocks.1.attn.qkv'\]"):
            fewer_layers.load_state_dict(state)
        resumed = BStepMerger(clients[0]["A"])
        resumed.load_state_dict(state)
        resumed.add_client(clients[1]["B"], clients[1]["G"])
        source.add_client(clients[1]["B"], clients[1]["G"])
        assert all(torch.equal(resumed.merge()[n], m) for n, m in source.merge().items())

    def test_a_step_state_must_match_shared_b(self, device):
        clients = make_clients(1, 4, device=device)
        plain = AStepMerger()
        plain.add_client(clients[0]["A"], clients[0]["G"])
        shared_b = {name: torch.randn(out, 4, device=device) for name, (out, _) in LAYERS.items()}
        general = AStepMerger(shared_b)
        with pytest.raises(ValueError, match="an A-step without per-client B factors .* merger has a shared_b"):
            general.load_state_dict(_full_state(plain))
        narrower = AStepMerger({n: b[:-1] for n, b in shared_b.items()})
        general.add_client(clients[0]["A"], clients[0]["G"], factors_b=clients[0]["B"])
        with pytest.raises(ValueError, match=r"numerator has shape \(24, 16\), expected \(23, 16\)"):
            narrower.load_state_dict(_full_state(general))
        with pytest.raises(ValueError, match="state is of an A-step with per-client B factors .* this merger has no"):
            AStepMerger().load_state_dict(_full_state(general))


def _adapter_merger_with(clients, device, **kwargs):
    merger = AdapterMerger(2, **kwargs)
    for c in clients:
        merger.add_client(c["B"], c["A"], c["G"])
    return merger


def _adapter_state(merger) -> dict:
    state = merger.state_dict()
    return {"stream": _full_state(merger._stream), "constants": {k: v.clone() for k, v in state["constants"].items()}}


def _constants_changed(change):
    return lambda s: {**s, "constants": change(dict(s["constants"]))}


BAD_ADAPTER_STATES = {
    "stream: later layer's shape": (
        lambda s: {**s, "stream": BAD_STATES["later layer's shape"][0](s["stream"])},
        "numerator has shape",
    ),
    "constant missing": (
        _constants_changed(lambda c: {k: v for k, v in c.items() if k != QKV1}),
        rf"constants: layer names differ from the expected ones: missing \['{QKV1}'\]",
    ),
    "no constants": (lambda s: {"stream": s["stream"]}, "the state has no objective constants"),
    "constant NaN": (_constants_changed(lambda c: {**c, QKV1: c[QKV1] * float("nan")}), "constant is nan, not finite"),
    "constant float32": (
        _constants_changed(lambda c: {**c, QKV1: c[QKV1].float()}),
        rf"layer '{QKV1}': constant must be a torch.float64 scalar, got torch.float32 \(\)",
    ),
    "constant a vector": (_constants_changed(lambda c: {**c, QKV1: c[QKV1][None]}), r"got torch.float64 \(1,\)"),
    "constant a float": (_constants_changed(lambda c: {**c, QKV1: float(c[QKV1])}), "got <class 'float'>"),
    "an extra key": (lambda s: {**s, "rank": 2}, r"expected a dict with the keys \['stream', 'constants'\]"),
}


class TestAdapterMergerState:
    @pytest.mark.parametrize("kind", BAD_ADAPTER_STATES)
    def test_bad_state_is_refused_and_changes_nothing(self, device, kind):
        change, match = BAD_ADAPTER_STATES[kind]
        clients = make_clients(3, 2, device=device, dtype=torch.float64)
        bad = change(_adapter_state(_adapter_merger_with(clients[:2], device)))
        target = _adapter_merger_with(clients[2:], device)
        before = _adapter_state(target)
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        after = _adapter_state(target)
        assert after["constants"].keys() == before["constants"].keys()
        assert all(torch.equal(after["constants"][k], v) for k, v in before["constants"].items())
        assert {**after["stream"], "sums": None} == {**before["stream"], "sums": None}
        assert all(torch.equal(after["stream"]["sums"][k], v) for k, v in before["stream"]["sums"].items())

    def test_a_state_resumes_the_objective_exactly_and_tracking_must_agree(self, device):
        clients = make_clients(3, 2, device=device, dtype=torch.float64)
        whole, first = _adapter_merger_with(clients, device), _adapter_merger_with(clients[:2], device)
        resumed = AdapterMerger(2)
        resumed.load_state_dict(_adapter_state(first))
        resumed.add_client(clients[2]["B"], clients[2]["A"], clients[2]["G"])
        candidate = whole.merge("exact")
        assert resumed.objective(candidate) == whole.objective(candidate)
        with pytest.raises(ValueError, match="state has objective constants; this merger: track_objective=False"):
            AdapterMerger(2, track_objective=False).load_state_dict(_adapter_state(first))
        untracked = _adapter_merger_with(clients[:1], device, track_objective=False)
        AdapterMerger(2, track_objective=False).load_state_dict(_adapter_state(untracked))


def test_errors_name_the_layer_and_the_argument_the_user_wrote(device):
    """What the user passed (a dict of layers, under its argument's name) is checked before any op sees a list:
    no message names an op or a list index."""
    A, B, G = (
        {"l": torch.randn(2, 5, device=device)},
        {"l": torch.randn(4, 2, device=device)},
        {"l": torch.eye(5, device=device)},
    )
    f8 = {"l": B["l"].to(torch.float8_e4m3fn)}
    scalar = {"l": torch.tensor(1.0, device=device)}
    shared_b = {"l": torch.randn(4, 2, device=device)}
    cases = [
        (
            lambda: project_client(A, B, scalar),
            r"layer 'l': gram must be square \(n, n\) or a diagonal \(n,\), got shape \(\)",
        ),
        (
            lambda: project_client(A, {"l": torch.randn(4, 3, device=device)}, G),
            r"layer 'l': factors_b has shape \(4, 3\), expected \(\*, 2\)",
        ),
        (
            lambda: project_client({"l": torch.randn(2, 6, device=device)}, B, G),
            r"layer 'l': shared_a has shape \(2, 6\), expected \(\*, 5\)",
        ),
        (lambda: project_client(A, B, {}), r"grams: layer names differ from the expected ones: missing \['l'\]"),
        (
            lambda: project_client(A, f8, G),
            "layer 'l': factors_b must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn",
        ),
        (
            lambda: project_client(A, B, G, dtype=torch.float16),
            "project_client: dtype must be torch.float32 or torch.float64",
        ),
        (
            lambda: AdapterMerger(1).add_client(scalar, A, G),
            r"layer 'l': factors_b has shape \(\), expected \(\*, \*\)",
        ),
        (lambda: AdapterMerger(1).add_client(B, scalar, G), r"layer 'l': factors_a has shape \(\), expected \(2, 5\)"),
        (lambda: AdapterMerger(1).add_client(B, A, scalar), r"layer 'l': gram must be square"),
        (
            lambda: AdapterMerger(1).add_client(B, {"l": torch.randn(3, 5, device=device)}, G),
            r"layer 'l': factors_a has shape \(3, 5\), expected \(2, 5\)",
        ),
        (
            lambda: AdapterMerger(1).add_client(f8, A, G),
            "layer 'l': factors_b must be float16, bfloat16, float32 or float64",
        ),
        (
            lambda: AdapterMerger(1).add_client([B["l"]], A, G),
            "factors_b: expected a dict of tensors keyed by layer name, got list",
        ),
        (
            lambda: RegMeanMerger().add_client({"l": A["l"].to(torch.float8_e5m2)}, G),
            "layer 'l': factor must be float16, bfloat16",
        ),
        (
            lambda: RegMeanMerger().add_client(A, {"l": G["l"].to(torch.float8_e4m3fn)}),
            "layer 'l': gram must be float16, bfloat16",
        ),
        (
            lambda: AStepMerger(shared_b).add_client(A, G, factors_b={"l": B["l"] * float("nan")}),
            "layer 'l': factors_b contains NaN or Inf",
        ),
        (
            lambda: AStepMerger(shared_b).add_client(A, G, factors_b=f8),
            "layer 'l': factors_b must be float16, bfloat16",
        ),
        (
            lambda: AStepMerger(shared_b).add_client({"l": torch.randn(3, 5, device=device)}, G, factors_b=B),
            r"layer 'l': factor has shape \(3, 5\), expected \(2, 5\)",
        ),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as error:
            call()
        assert "lorm_ext::" not in str(error.value) and "[0]" not in str(error.value)


def test_finite_values_whose_sum_overflows_are_accepted():
    """Validation counts non-finite entries (it never sums them): finite values whose sum overflows pass."""
    merger = AStepMerger()
    factor = torch.full((2, 3), 1e308, dtype=torch.float64)  # finite entries, infinite sum
    merger.add_client({"l": factor}, {"l": torch.eye(3, dtype=torch.float64)})
    assert torch.equal(merger.merge()["l"], factor)


def test_the_public_sums_are_the_numerators_and_denominators_of_the_reference(device):
    """sum_groups: per shape, the layers' numerators Σ B_k A_k G_k and denominators Σ G_k, in the merger's dtype;
    merge_key: equal exactly for mergers whose sums may be added."""
    clients = make_clients(3, 4, device=device)
    merger = RegMeanMerger()
    assert merger.sum_groups == [] and merger.device is None
    for c in clients:
        merger.add_client(c["A"], c["G"], lefts=c["B"])
    groups = merger.sum_groups
    assert sorted(n for g in groups for n in g.names) == sorted(LAYERS)
    assert len(groups) == 2  # the two qkv layers share a shape: one stack
    for group in groups:
        assert group.numerators.dtype == group.denominators.dtype == merger.dtype == torch.float64
        for i, name in enumerate(group.names):
            gram, numerator = ref.gram_and_product_sums_ref(
                column(clients, "B", name), column(clients, "A", name), column(clients, "G", name), torch.float64
            )
            assert_rel_close(group.numerators[i], numerator, 1e-12)
            assert_rel_close(group.denominators[i], gram, 1e-12)
    shared = {"q": torch.randn(2, 5)}
    keys = [
        RegMeanMerger().merge_key, AStepMerger().merge_key, AStepMerger(shared).merge_key,
        BStepMerger(shared).merge_key, BStepMerger({"q": torch.randn(3, 5)}).merge_key,
        AdapterMerger(2).merge_key, AdapterMerger(3).merge_key, AdapterMerger(2, track_objective=False).merge_key,
    ]  # fmt: skip
    assert len(set(keys)) == len(keys)
    assert BStepMerger(shared).merge_key == BStepMerger({"q": torch.zeros(2, 5)}).merge_key
