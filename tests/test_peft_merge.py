"""PEFT adapters in and out, checked against a real ``peft`` install and lorm_ext.reference.

A tiny residual MLP (no downloads) gets three LoRA adapters from PEFT with random factors and different
data; the merged adapter is loaded back with PEFT and its outputs compared with the reference merge.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from lorm_testing import right_padding_mask, seeded_model
from safetensors.torch import load_file, save_file
from torch import nn

peft = pytest.importorskip("peft", reason="the PEFT tests need `pip install peft` (see docs/peft.md)")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lorm_ext import adapters, merge_cli, reference  # noqa: E402
from lorm_ext.adapter_merge import merge_lora_adapters  # noqa: E402
from lorm_ext.adapters import AdapterFileError, collect_grams, read_lora_adapter  # noqa: E402

WIDTH, IN_FEATURES, CLASSES = 8, 6, 3
TARGETS = ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
RANK, MERGED_RANK = 4, 3


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(IN_FEATURES, WIDTH)
        self.blocks = nn.ModuleList([Block(WIDTH) for _ in range(2)])
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_model() -> TinyNet:
    return seeded_model(TinyNet)


def grams_argv(adapter, out, *options: str, model="build_model", batches="calibration_batches") -> list[str]:
    """`lorm-merge grams` of an adapter, over the model and the batches that the named functions of this file
    make."""
    model, batches = (f"{os.path.abspath(__file__)}:{name}" for name in (model, batches))
    return ["grams", "--adapter", str(adapter), "--model", model, "--batches", batches, "-o", str(out), *options]


def peft_argv(dirs, gram_files, rank: int, *options: str) -> list[str]:
    """`lorm-merge peft` of these adapters and Gram files."""
    return ["peft", *map(str, dirs), "--grams", *map(str, gram_files), "--rank", str(rank), *options]


def calibration_batches(seed: int = 0) -> list[torch.Tensor]:
    """Client data: (batch, tokens, features) with a client-specific scale and shift."""
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(2, 5, IN_FEATURES, generator=g) * (1 + seed) + seed for _ in range(4)]


def lora_model(seed: int, **config) -> PeftModel:
    base = build_model()
    torch.manual_seed(seed)  # the LoRA factors differ per client; init_lora_weights=False makes B non-zero
    options = dict(r=RANK, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False) | config
    return get_peft_model(base, LoraConfig(**options)).eval()


def peft_update(model: PeftModel, module: str, adapter: str = "default") -> torch.Tensor:
    """ΔW = s·B A of one module from PEFT's own layer (its factors and its scaling), in float64."""
    layer = model.get_base_model().get_submodule(module)
    b, a = layer.lora_B[adapter].weight.double(), layer.lora_A[adapter].weight.double()
    return layer.scaling[adapter] * b @ a


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """Three saved adapters with their full Gram files, and what PEFT says their updates are."""
    root = tmp_path_factory.mktemp("clients")
    dirs, gram_files, deltas, grams = [], [], [], []
    for seed in range(3):
        model = lora_model(seed, lora_alpha=4 + 4 * seed)
        model.save_pretrained(root / f"adapter{seed}")
        client_grams = collect_grams(model.get_base_model(), TARGETS, calibration_batches(seed), dtype=torch.float64)
        adapters.save_grams(root / f"grams{seed}.safetensors", client_grams)
        dirs.append(root / f"adapter{seed}")
        gram_files.append(root / f"grams{seed}.safetensors")
        deltas.append({m: peft_update(model, m) for m in TARGETS})
        grams.append(client_grams)
    return dirs, gram_files, deltas, grams


def reference_optimum(deltas, grams, rank) -> dict[str, torch.Tensor]:
    """Rank-r optimum of the reference, ΔW_k passed as B_k = ΔW_k, A_k = I."""
    out = {}
    for m in TARGETS:
        eye = torch.eye(grams[0][m].shape[0], dtype=torch.float64)
        B, A = reference.rank_r_optimum_ref([d[m] for d in deltas], [eye] * len(deltas), [g[m] for g in grams], rank)
        out[m] = B @ A
    return out


def test_reading_folds_scaling_like_peft(tmp_path):
    model = lora_model(5, use_rslora=True, rank_pattern={"blocks.1.fc1": 2}, alpha_pattern={"fc2": 5})
    model.save_pretrained(tmp_path)
    adapter = read_lora_adapter(tmp_path)
    assert sorted(adapter.factors) == TARGETS
    assert adapter.layout["blocks.1.fc1"] == (2 * WIDTH, 2, WIDTH)
    for m in TARGETS:
        B, A = adapter.factors[m]
        peft_delta = model.get_base_model().get_submodule(m).get_delta_weight("default")  # float32
        torch.testing.assert_close(B @ A, peft_delta.double(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(B @ A, peft_update(model, m), rtol=1e-12, atol=1e-14)


def test_exact_merge_loads_in_peft_and_matches_reference(clients, tmp_path):
    dirs, gram_files, deltas, grams = clients
    result = merge_lora_adapters(dirs, gram_files, MERGED_RANK, method="exact", output_dir=tmp_path / "merged")
    expected = reference_optimum(deltas, grams, MERGED_RANK)

    merged = PeftModel.from_pretrained(build_model(), tmp_path / "merged").eval()
    assert merged.peft_config["default"].r == MERGED_RANK
    assert sorted(n for n, _ in merged.named_modules() if n.endswith("lora_A.default")) == sorted(
        f"base_model.model.{m}.lora_A.default" for m in TARGETS
    )
    by_hand = build_model()
    for m in TARGETS:
        torch.testing.assert_close(peft_update(merged, m), expected[m], rtol=1e-5, atol=1e-6)
        by_hand.get_submodule(m).weight.data += expected[m].float()
        B, A = result.factors[m]
        torch.testing.assert_close(B @ A, expected[m], rtol=1e-9, atol=1e-10)
    x = calibration_batches(7)[0]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), by_hand(x), rtol=1e-5, atol=1e-5)


def test_every_method_scored_like_reference(clients):
    dirs, gram_files, deltas, grams = clients
    result = merge_lora_adapters(dirs, gram_files, MERGED_RANK, method="alternating", report=True)
    assert set(result.objectives) == {"exact", "alternating", "average", "svd", "zero"}
    reads = [read_lora_adapter(d) for d in dirs]
    mean_factors = {
        m: (sum(r.factors[m][0] for r in reads) / 3, sum(r.factors[m][1] for r in reads) / 3) for m in TARGETS
    }
    exact = reference_optimum(deltas, grams, MERGED_RANK)
    for m in TARGETS:
        ds, gs = [d[m] for d in deltas], [g[m] for g in grams]
        svd = torch.linalg.svd(sum(ds) / 3)
        candidates = {
            "exact": exact[m],
            "alternating": result.factors[m][0] @ result.factors[m][1],
            "average": mean_factors[m][0] @ mean_factors[m][1],
            "svd": (svd.U[:, :MERGED_RANK] * svd.S[:MERGED_RANK]) @ svd.Vh[:MERGED_RANK],
            "zero": torch.zeros_like(ds[0]),
        }
        for method, delta in candidates.items():
            want = reference.objective_ref(delta, ds, gs).item()
            assert result.objectives[method][m] == pytest.approx(want, rel=1e-8), (method, m)
        best = result.objectives["exact"][m]
        assert best <= min(v[m] for v in result.objectives.values()) * (1 + 1e-9)
        assert result.objectives["alternating"][m] == pytest.approx(best, rel=1e-6)
        assert best < 0.9 * min(result.objectives["average"][m], result.objectives["svd"][m])


def test_svd_baseline_is_peft_add_weighted_adapter(clients, tmp_path):
    dirs, gram_files, _, _ = clients
    result = merge_lora_adapters(dirs, gram_files, MERGED_RANK, method="svd")
    model = PeftModel.from_pretrained(build_model(), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    model.add_weighted_adapter(["a0", "a1", "a2"], [1 / 3] * 3, "svd", combination_type="svd", svd_rank=MERGED_RANK)
    for m in TARGETS:
        B, A = result.factors[m]
        torch.testing.assert_close(B @ A, peft_update(model, m, "svd"), rtol=1e-5, atol=1e-6)
    # PEFT's own merge, saved and scored with the same objective (--score): the svd column again
    model.save_pretrained(tmp_path / "peft", selected_adapters=["svd"])
    scored = merge_lora_adapters(dirs, gram_files, MERGED_RANK, method="svd", score={"peft": tmp_path / "peft" / "svd"})
    for m in TARGETS:
        assert scored.objectives["peft"][m] == pytest.approx(scored.objectives["svd"][m], rel=1e-5)
    with pytest.raises(ValueError, match=r"score names \['svd'\] are method names"):
        merge_lora_adapters(dirs, gram_files, MERGED_RANK, score={"svd": tmp_path / "peft" / "svd"})


def test_average_writes_mean_factors_at_the_input_rank(clients, tmp_path):
    dirs, gram_files, _, _ = clients
    with pytest.raises(ValueError, match=r"keeps the adapters' rank \[4\]"):
        merge_lora_adapters(dirs, gram_files, MERGED_RANK, method="average")
    merge_lora_adapters(dirs, gram_files, RANK, method="average", output_dir=tmp_path)
    written = load_file(tmp_path / adapters.WEIGHTS_NAME)
    for m in TARGETS:
        reads = [read_lora_adapter(d).factors[m] for d in dirs]
        torch.testing.assert_close(
            written[f"base_model.model.{m}.lora_B.weight"].double(), sum(b for b, _ in reads) / 3, rtol=1e-6, atol=1e-7
        )
        torch.testing.assert_close(
            written[f"base_model.model.{m}.lora_A.weight"].double(), sum(a for _, a in reads) / 3, rtol=1e-6, atol=1e-7
        )


def test_diagonal_grams_and_mixed_ranks(clients, tmp_path):
    """Diagonal Grams, and adapters of different ranks (rank_pattern): LoRM merges them, averaging cannot."""
    dirs, _, deltas, _ = clients
    other = lora_model(9, r=6, rank_pattern={"blocks.0.fc1": 2})
    other.save_pretrained(tmp_path / "other")
    inputs = [dirs[0], tmp_path / "other"]
    diag_grams, diag_files = [], []
    for i, (_batches, path) in enumerate([(0, tmp_path / "g0.safetensors"), (9, tmp_path / "g1.safetensors")]):
        g = {m: torch.rand(WIDTH if m.endswith("fc1") else 2 * WIDTH, dtype=torch.float64) + 0.1 * i for m in TARGETS}
        adapters.save_grams(path, g)
        diag_grams.append(g)
        diag_files.append(path)
    result = merge_lora_adapters(inputs, diag_files, 2, method="exact")
    assert "average" not in result.objectives
    with pytest.raises(ValueError, match="equal ranks"):
        merge_lora_adapters(inputs, diag_files, 2, method="average")
    updates = [deltas[0], {m: peft_update(other, m) for m in TARGETS}]
    expected = reference_optimum(updates, diag_grams, 2)
    for m in TARGETS:
        B, A = result.factors[m]
        torch.testing.assert_close(B @ A, expected[m], rtol=1e-8, atol=1e-9)


def test_cli_collects_grams_and_merges(clients, tmp_path, capsys):
    dirs, gram_files, _, grams = clients
    status = merge_cli.main(grams_argv(dirs[0], tmp_path / "g.safetensors", "--dtype", "float64"))
    assert status == 0
    collected = adapters.read_grams(tmp_path / "g.safetensors", {m: grams[0][m].shape[0] for m in TARGETS})
    for m in TARGETS:
        torch.testing.assert_close(collected[m], grams[0][m], rtol=1e-12, atol=1e-12)

    status = merge_cli.main(
        peft_argv(dirs, gram_files, MERGED_RANK, "--method", "alternating", "--report", "-o", str(tmp_path / "merged"))
    )
    out = capsys.readouterr().out
    assert status == 0
    header = next(line for line in out.splitlines() if line.startswith("module"))
    assert header.split() == ["module", "exact", "alternating*", "average", "svd", "zero"]
    expected = merge_lora_adapters(dirs, gram_files, MERGED_RANK, method="alternating", report=True)
    for m in TARGETS + ["total"]:
        row = next(line for line in out.splitlines() if line.split()[0] == m).split()
        values = expected.objectives["exact"]
        want = sum(values.values()) if m == "total" else values[m]
        assert float(row[1]) == pytest.approx(want, rel=1e-6)
    written = read_lora_adapter(tmp_path / "merged")
    for m in TARGETS:
        B, A = expected.factors[m]
        torch.testing.assert_close(written.factors[m][0] @ written.factors[m][1], B @ A, rtol=1e-5, atol=1e-6)


def _copy_adapter(src: Path, dst: Path, config_changes=None, tensor_changes=None) -> Path:
    dst.mkdir()
    config = json.loads((src / adapters.CONFIG_NAME).read_text()) | (config_changes or {})
    (dst / adapters.CONFIG_NAME).write_text(json.dumps(config))
    tensors = load_file(src / adapters.WEIGHTS_NAME)
    for key, value in (tensor_changes or {}).items():
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value
    save_file(tensors, dst / adapters.WEIGHTS_NAME)
    return dst


KEY = "base_model.model.blocks.1.fc2.lora_{}.weight"


@pytest.mark.parametrize(
    ("config_changes", "tensor_changes", "message"),
    [
        ({"use_dora": True}, None, "use_dora=True is not supported"),
        ({"modules_to_save": "head"}, None, "modules_to_save must be a list of module names, got 'head'"),
        ({"bias": "lora_only"}, None, "bias='lora_only' is not supported"),
        ({"lora_shiny_new_option": 1}, None, r"unknown config field\(s\) \['lora_shiny_new_option'\]"),
        ({"init_lora_weights": "pissa"}, None, "changes the base model's weights"),
        ({"peft_type": "IA3"}, None, "only LORA adapters"),
        ({"r": 5}, None, "module 'blocks.0.fc1': rank mismatch: the config gives r=5"),
        ({"r": 4.0}, None, "r must be a positive integer, got 4.0"),
        ({"alpha_pattern": {"fc(": 3}}, None, r"alpha_pattern key 'fc\(' is not a regular expression"),
        (None, {KEY.format("B"): None}, "module 'blocks.1.fc2': lora_B.weight is missing"),
        (None, {KEY.format("A"): torch.full((RANK, 2 * WIDTH), float("nan"))}, "'blocks.1.fc2': .*NaN"),
        (None, {"base_model.model.head.modules_to_save.weight": torch.zeros(3, 8)}, "unexpected key"),
    ],
)
def test_bad_adapter_named_by_file_and_module(clients, tmp_path, config_changes, tensor_changes, message):
    dirs, gram_files, _, _ = clients
    bad = _copy_adapter(dirs[1], tmp_path / "bad", config_changes, tensor_changes)
    with pytest.raises(AdapterFileError, match=message) as err:
        merge_lora_adapters([dirs[0], bad], gram_files[:2], MERGED_RANK)
    assert str(bad) in str(err.value)


@dataclasses.dataclass
class NextLoraConfig(LoraConfig):
    """The LoraConfig of a PEFT release newer than lorm_ext: one more feature, off by default."""

    lora_shiny_new_option: bool = False


def test_configs_are_read_with_peft_s_own_lora_config(clients, tmp_path, monkeypatch):
    dirs, gram_files, _, _ = clients
    original = read_lora_adapter(dirs[1])
    monkeypatch.setattr(adapters, "_peft_lora_config", lambda: NextLoraConfig)
    off = _copy_adapter(dirs[1], tmp_path / "off", {"lora_shiny_new_option": False})
    read = read_lora_adapter(off)  # a field of the newer PEFT at its default: not in use, read as plain LoRA
    assert all(torch.equal(read.factors[m][i], original.factors[m][i]) for m in TARGETS for i in (0, 1))
    on = _copy_adapter(dirs[1], tmp_path / "on", {"lora_shiny_new_option": True})
    with pytest.raises(
        AdapterFileError,
        match=r"on/adapter_config.json: lora_shiny_new_option=True is set \(PEFT's "
        r"default is False\): lorm_ext merges only ΔW = s·B A",
    ):
        read_lora_adapter(on)
    neither = _copy_adapter(dirs[1], tmp_path / "neither", {"lora_even_newer": None})
    with pytest.raises(
        AdapterFileError,
        match=r"unknown config field\(s\) \['lora_even_newer'\]: neither lorm_ext nor "
        r"the installed PEFT .* upgrade peft",
    ):
        read_lora_adapter(neither)
    # PEFT's own checks run: it refuses layers_to_transform with a regex target_modules, which lorm_ext ignores
    targeting = _copy_adapter(
        dirs[1], tmp_path / "targeting", {"target_modules": "fc1|fc2", "layers_to_transform": [0]}
    )
    with pytest.raises(
        AdapterFileError,
        match=r"LoraConfig refuses it: `layers_to_transform` cannot be used when "
        r"`target_modules` is a str",
    ):
        read_lora_adapter(targeting)

    monkeypatch.setattr(adapters, "_peft_lora_config", lambda: None)  # a server without peft: the file-level reader
    with pytest.raises(
        AdapterFileError,
        match=r"unknown config field\(s\) \['lora_shiny_new_option'\]: lorm_ext "
        "cannot tell",
    ):
        read_lora_adapter(off)
    read = read_lora_adapter(targeting)
    assert all(torch.equal(read.factors[m][i], original.factors[m][i]) for m in TARGETS for i in (0, 1))


def test_mismatches_between_adapters_and_grams(clients, tmp_path):
    dirs, gram_files, _, grams = clients
    # a module missing from one adapter
    fewer = _copy_adapter(dirs[1], tmp_path / "fewer", None, {KEY.format("A"): None, KEY.format("B"): None})
    with pytest.raises(AdapterFileError, match=r"fewer.*lacks module\(s\) \['blocks.1.fc2'\]"):
        merge_lora_adapters([dirs[0], fewer], gram_files[:2], MERGED_RANK)
    # a layer of another width (an adapter for another model)
    wide = _copy_adapter(dirs[1], tmp_path / "wide", None, {KEY.format("A"): torch.randn(RANK, 2 * WIDTH + 1)})
    with pytest.raises(AdapterFileError, match=r"wide.*module 'blocks.1.fc2': shape mismatch: ΔW is 8 × 17"):
        merge_lora_adapters([dirs[0], wide], gram_files[:2], MERGED_RANK)
    # another base model
    other_base = _copy_adapter(dirs[1], tmp_path / "other_base", {"base_model_name_or_path": "someone/else"})
    with pytest.raises(AdapterFileError, match="base_model_name_or_path='someone/else' differs"):
        merge_lora_adapters([dirs[0], other_base], gram_files[:2], MERGED_RANK)
    # a Gram of the wrong width, a missing Gram, a diagonal Gram where the first file had a full one
    for name, changes, message in [
        (
            "narrow",
            {"blocks.0.fc2": torch.eye(2 * WIDTH - 1)},
            "module 'blocks.0.fc2': gram is for 15 features, expected 16",
        ),
        ("absent", {"blocks.0.fc2": None}, r"has no Gram for module\(s\) \['blocks.0.fc2'\]"),
        ("diagonal", {"blocks.0.fc2": torch.ones(2 * WIDTH)}, "module 'blocks.0.fc2': Gram is diagonal but the first"),
    ]:
        g = {m: v for m, v in (grams[1] | changes).items() if v is not None}
        save_file(g, tmp_path / f"{name}.safetensors")
        with pytest.raises(AdapterFileError, match=f"{name}.safetensors: {message}"):
            merge_lora_adapters(dirs[:2], [gram_files[0], tmp_path / f"{name}.safetensors"], MERGED_RANK)
    with pytest.raises(ValueError, match="one Gram file per adapter"):
        merge_lora_adapters(dirs, gram_files[:2], MERGED_RANK)
    with pytest.raises(AdapterFileError, match=r"rank 9 exceeds the layer's size \(16 × 8\)"):
        merge_lora_adapters(dirs, gram_files, 9)


def test_output_is_atomic_and_never_an_input(clients, tmp_path, monkeypatch, capsys):
    dirs, gram_files, _, _ = clients
    before = (dirs[0] / adapters.WEIGHTS_NAME).read_bytes()
    with pytest.raises(AdapterFileError, match="holds the input .*adapter_config.json; refusing to overwrite it"):
        merge_lora_adapters(dirs, gram_files, MERGED_RANK, output_dir=dirs[0])
    with pytest.raises(AdapterFileError, match="holds the input"):  # a folder above an input
        merge_lora_adapters(dirs, gram_files, MERGED_RANK, output_dir=dirs[0].parent)
    os.symlink(dirs[1], tmp_path / "alias")
    status = merge_cli.main(peft_argv(dirs, gram_files, 3, "-o", str(tmp_path / "alias")))
    assert status == 1 and "refusing to overwrite it" in capsys.readouterr().err
    assert (dirs[0] / adapters.WEIGHTS_NAME).read_bytes() == before

    out = tmp_path / "merged"
    merge_lora_adapters(dirs, gram_files, MERGED_RANK, output_dir=out)
    first = (out / adapters.WEIGHTS_NAME).read_bytes()

    def failing_write(self, key, tensor):
        os.pwrite(self._fd, b"half a tensor", self._data_start)
        raise OSError("disk full")

    monkeypatch.setattr(adapters.StreamedSafetensors, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        merge_lora_adapters(dirs, gram_files, 2, output_dir=out)
    assert (out / adapters.WEIGHTS_NAME).read_bytes() == first  # the old adapter is intact
    assert sorted(p.name for p in out.iterdir()) == [adapters.CONFIG_NAME, adapters.WEIGHTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "merged"]  # no temporary folder left


# ---------------------------------------------------------------------------------------------------------
# modules_to_save: a head trained in full, merged with RegMean when its Grams are given


@pytest.fixture(scope="module")
def head_clients(tmp_path_factory):
    """Three adapters that also train the head (each its own), with Gram files that hold the head's Gram and
    Gram files that do not; and each client's head and head Gram."""
    root = tmp_path_factory.mktemp("heads")
    dirs, with_head, without_head, heads, head_grams = [], [], [], [], []
    for seed in range(3):
        model = lora_model(seed, modules_to_save=["head"])
        head = model.get_base_model().head.modules_to_save["default"]
        with torch.no_grad():
            head.weight.normal_()
            head.bias.normal_()
        model.save_pretrained(root / f"adapter{seed}")
        grams = collect_grams(
            model.get_base_model(), TARGETS + ["head"], calibration_batches(seed), dtype=torch.float64
        )
        adapters.save_grams(root / f"with{seed}.safetensors", grams)
        adapters.save_grams(root / f"without{seed}.safetensors", {m: grams[m] for m in TARGETS})
        dirs.append(root / f"adapter{seed}")
        with_head.append(root / f"with{seed}.safetensors")
        without_head.append(root / f"without{seed}.safetensors")
        heads.append({name: p.detach().double().clone() for name, p in head.named_parameters()})
        head_grams.append(grams["head"])
    return dirs, with_head, without_head, heads, head_grams


def test_a_modules_to_save_head_is_merged_with_regmean_and_loads_in_peft(head_clients, tmp_path, capsys):
    dirs, with_head, _, heads, head_grams = head_clients
    result = merge_lora_adapters(dirs, with_head, MERGED_RANK, output_dir=tmp_path / "merged")
    assert result.saved_methods == {"head": "regmean"}
    expected = {
        "weight": reference.regmean_ref([h["weight"] for h in heads], head_grams),
        "bias": sum(h["bias"] for h in heads) / 3,
    }
    for name, value in expected.items():
        torch.testing.assert_close(result.saved["head"][name], value, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(expected["weight"], sum(h["weight"] for h in heads) / 3)  # RegMean is not the mean
    config = json.loads((tmp_path / "merged" / adapters.CONFIG_NAME).read_text())
    assert config["modules_to_save"] == ["head"]
    merged = PeftModel.from_pretrained(build_model(), tmp_path / "merged").eval()
    copy = merged.get_base_model().head.modules_to_save["default"]
    for name, value in expected.items():
        torch.testing.assert_close(getattr(copy, name).double(), value, rtol=1e-6, atol=1e-6)

    status = merge_cli.main(peft_argv(dirs, with_head, MERGED_RANK))
    assert status == 0 and "modules_to_save head: RegMean with its Grams" in capsys.readouterr().out


def test_a_head_without_grams_is_averaged_and_partial_grams_are_refused(head_clients):
    dirs, with_head, without_head, heads, _ = head_clients
    result = merge_lora_adapters(dirs, without_head, MERGED_RANK)
    assert result.saved_methods == {"head": "mean"}
    for name in ("weight", "bias"):
        torch.testing.assert_close(result.saved["head"][name], sum(h[name] for h in heads) / 3, rtol=1e-12, atol=1e-12)
    with pytest.raises(
        AdapterFileError,
        match=r"without1.safetensors: module 'head': has no Gram for this "
        r"modules_to_save head but .*with0.safetensors has one",
    ):
        merge_lora_adapters(dirs[:2], [with_head[0], without_head[1]], MERGED_RANK)


def test_modules_to_save_must_match_between_adapters(head_clients, clients):
    head_dirs, with_head, _, _, _ = head_clients
    plain_dirs, plain_grams, _, _ = clients
    with pytest.raises(
        AdapterFileError,
        match=r"modules_to_save tensors \{\} differ from \{'head': \{'bias': \(3,\), "
        r"'weight': \(3, 8\)\}\}",
    ):
        merge_lora_adapters([head_dirs[0], plain_dirs[1]], [with_head[0], plain_grams[1]], MERGED_RANK)
    scored = merge_lora_adapters(head_dirs, with_head, MERGED_RANK, score={"plain": plain_dirs[0]})  # LoRA only
    assert set(scored.objectives["plain"]) == set(TARGETS)


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(10, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.embed(ids))))


def build_embedding_net() -> EmbeddingNet:
    return seeded_model(EmbeddingNet)


def token_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 10, (2, 5), generator=g) for _ in range(3)]


def test_a_saved_embedding_is_averaged_and_the_linear_head_gets_its_gram(tmp_path, capsys):
    dirs, gram_files, embeddings = [], [], []
    for seed in range(2):
        config = LoraConfig(r=2, target_modules=["fc"], modules_to_save=["embed", "head"], init_lora_weights=False)
        model = get_peft_model(build_embedding_net(), config)
        with torch.no_grad():
            for name in ("embed", "head"):
                model.get_base_model().get_submodule(name).modules_to_save["default"].weight.normal_()
        model.save_pretrained(tmp_path / f"a{seed}")
        embeddings.append(model.get_base_model().embed.modules_to_save["default"].weight.detach().double().clone())
        out = tmp_path / f"g{seed}.safetensors"
        status = merge_cli.main(
            grams_argv(tmp_path / f"a{seed}", out, model="build_embedding_net", batches="token_batches")
        )
        assert status == 0 and "Grams of 2 modules" in capsys.readouterr().out  # fc and head, not the embedding
        dirs.append(tmp_path / f"a{seed}")
        gram_files.append(out)
    result = merge_lora_adapters(dirs, gram_files, 2)
    assert result.saved_methods == {"embed": "mean", "head": "regmean"}
    torch.testing.assert_close(result.saved["embed"]["weight"], (embeddings[0] + embeddings[1]) / 2)


def test_cli_collects_the_head_s_gram(head_clients, tmp_path):
    dirs, _, _, _, head_grams = head_clients
    status = merge_cli.main(grams_argv(dirs[0], tmp_path / "g.safetensors", "--dtype", "float64"))
    assert status == 0
    collected = adapters.read_grams(tmp_path / "g.safetensors", {"head": WIDTH})
    torch.testing.assert_close(collected["head"], head_grams[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Padding: a Hugging Face model's attention_mask keeps padded positions out of the Grams

BERT_LENGTHS = [[5, 9, 3], [7, 2]]
BERT_TARGETS = ["query", "key", "value", "dense"]  # "dense" includes pooler.dense: one row per sequence


def build_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    )
    return seeded_model(lambda: BertModel(config))


def bert_token_ids() -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [[torch.randint(1, 50, (n,), generator=g) for n in lengths] for lengths in BERT_LENGTHS]


def bert_batches() -> list[dict[str, torch.Tensor]]:
    """Right-padded batches with their attention_mask, as a tokenizer makes them (pad id 0)."""
    batches = []
    for sequences in bert_token_ids():
        ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
        batches.append({"input_ids": ids, "attention_mask": right_padding_mask([len(s) for s in sequences])})
    return batches


def test_hugging_face_padding_adds_nothing_to_the_grams(tmp_path):
    pytest.importorskip(
        "transformers", reason="the Hugging Face padding test builds a BertModel (pip install transformers)"
    )
    model = get_peft_model(build_bert(), LoraConfig(r=2, target_modules=BERT_TARGETS, init_lora_weights=False)).eval()
    model.save_pretrained(tmp_path / "bert-adapter")
    modules = adapters.AdapterFile(tmp_path / "bert-adapter").layout
    base = model.get_base_model()
    padded = collect_grams(base, modules, bert_batches())
    unpadded = collect_grams(base, modules, [{"input_ids": s[None]} for batch in bert_token_ids() for s in batch])
    unmasked = collect_grams(base, modules, bert_batches(), mask_key=None)
    assert padded["encoder.layer.0.attention.self.query"] is padded["encoder.layer.0.attention.self.value"]
    for m in modules:
        torch.testing.assert_close(padded[m], unpadded[m], rtol=1e-5, atol=1e-5 * unpadded[m].abs().max().item())
    assert torch.equal(unmasked["pooler.dense"], padded["pooler.dense"])  # one row per sequence: no padding
    assert not torch.allclose(
        unmasked["encoder.layer.0.intermediate.dense"], padded["encoder.layer.0.intermediate.dense"]
    )

    for extra, expected in ([], padded), (["--no-mask"], unmasked):
        out = tmp_path / f"grams{len(extra)}.safetensors"
        status = merge_cli.main(
            grams_argv(tmp_path / "bert-adapter", out, *extra, model="build_bert", batches="bert_batches")
        )
        assert status == 0
        collected = adapters.read_grams(out, {m: width for m, (_, _, width) in modules.items()})
        for m in modules:
            torch.testing.assert_close(collected[m], expected[m], rtol=1e-6, atol=1e-6 * expected[m].abs().max().item())
