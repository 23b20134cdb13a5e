"""Streaming mergers against the reference, optimality and exact properties, and bad inputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from lorm_testing import assert_rel_close, random_gram

from lorm_ext import AdapterMerger, AStepMerger, BStepMerger, LayerError, RegMeanMerger, project_client
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
            column(clients, "A", name), column(clients, "G", name), Bs=column(clients, "B", name), shared_b=shared_b[name]
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
        sizes = []
        for k in (1, 30):
            merger = AStepMerger()
            for c in make_clients(k, 4, device=device):
                merger.add_client(c["A"], c["G"])
            sizes.append(sum(t.numel() for t in merger.state_dict()["sums"].values()))
        assert sizes[0] == sizes[1]

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
        clients = [make_clients(1, r, device=device, dtype=torch.float64, layers=layers, diagonal=diagonal, tokens=tokens)[0] for r in ranks]
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
            assert exact[name] == pytest.approx(ref.objective_ref(B.cpu() @ A.cpu(), [d.cpu() for d in deltas], [g.cpu() for g in column(clients, "G", name)]).item(), rel=1e-9)
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
        averaged = {n: (torch.stack(column(clients, "B", n)).mean(0), torch.stack(column(clients, "A", n)).mean(0)) for n in layers}
        for name, value in merger.objective(averaged).items():
            assert exact[name] <= value
        for _ in range(5):
            candidate = {n: (torch.randn(out, 2, device=device), torch.randn(2, w, device=device)) for n, (out, w) in layers.items()}
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
        self.expect(merger, ValueError, r"unexpected \['extra'\]", {**c["A"], "extra": c["A"]["blocks.0.mlp.fc2"]}, c["G"])

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
        self.expect(merger, LayerError, rf"layer '{name}': factor has shape \(5, 16\), expected \(4, 16\)", {**c["A"], name: torch.randn(5, 16, device=device)}, c["G"])
        self.expect(merger, LayerError, "factor contains NaN or Inf", {**c["A"], name: c["A"][name] * float("inf")}, c["G"])
        self.expect(merger, LayerError, "factor must be a torch.Tensor", {**c["A"], name: [[1.0]]}, c["G"])

    def test_no_clients(self):
        for merger in (RegMeanMerger(), BStepMerger({"l": torch.randn(2, 3)}), AdapterMerger(1)):
            with pytest.raises(ValueError, match="no clients were added"):
                merger.merge()

    def test_b_step_rank_and_projection_errors(self, device):
        clients = make_clients(2, 4, device=device)
        merger = BStepMerger(clients[0]["A"])
        merger.add_client(clients[0]["B"], clients[0]["G"])
        name = "blocks.0.attn.qkv"
        self.expect(merger, LayerError, rf"layer '{name}': factor has shape \(24, 3\), expected \(24, 4\)", {**clients[1]["B"], name: torch.randn(24, 3, device=device)}, clients[1]["G"])
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
        self.expect(merger, ValueError, "lefts must be sent by every client or by none", clients[1]["A"], clients[1]["G"])

    def test_adapter_rank_above_layer_width(self, device):
        clients = make_clients(1, 2, device=device)
        merger = AdapterMerger(17)
        with pytest.raises(LayerError, match=r"layer 'blocks.0.attn.qkv': rank 17 exceeds"):
            merger.add_client(clients[0]["B"], clients[0]["A"], clients[0]["G"])
        assert merger.num_clients == 0


def test_finite_values_whose_sum_overflows_are_accepted():
    """Validation counts non-finite entries (it never sums them): finite values whose sum overflows pass."""
    merger = AStepMerger()
    factor = torch.full((2, 3), 1e308, dtype=torch.float64)  # finite entries, infinite sum
    merger.add_client({"l": factor}, {"l": torch.eye(3, dtype=torch.float64)})
    assert torch.equal(merger.merge()["l"], factor)
