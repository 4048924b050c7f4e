"""The sparse engine: prune -> pack -> load -> generate on a tiny random LLaMA, checked against the
masked dense model (dense pruned weights, activation rule applied by hooks) in float32 on CPU."""

from __future__ import annotations

import importlib
import json
import math
import shutil
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_package import run_python
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.quantizers import auto as hf_auto

import duogpt
from duogpt import BitmapWeight, cli
from duogpt.calibration.data import sample_from_model
from duogpt.checkpoint import THRESHOLDS_FILE, atomic_folder, read_metadata, save_pruned, write_metadata
from duogpt.engine import SparseLinear, pack_checkpoint, save_packed, set_activation_sparsity
from duogpt.engine.dense import DenseGemvLinear, set_head_kernel, to_dense_engine
from duogpt.engine.generate import Decoder, Generation
from duogpt.engine.quantizer import DuoGPTConfig
from duogpt.engine.sparse_linear import convert_for_runtime, sparse_projections
from duogpt.models import layer_map, load_model
from duogpt.ops.reference import sparsify
from duogpt.sparsity import ActivationSparsity, sparsified_inputs

METADATA = {"method": "magnitude", "base_model": "tiny",
            "weight_sparsity": {"type": "unstructured", "fraction": 0.5}, "format": "dense"}
TOPK = ActivationSparsity(0.5)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE trained in-process (no downloads)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog. " * 3, "sparse models decode fast, hello world"]
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_pruned_model(seed: int = 0, *, tied: bool = True) -> LlamaForCausalLM:
    """A 2-layer random LLaMA (GQA, tied embeddings unless `tied=False`) with every projection
    magnitude-pruned to 50 %.

    With tied embeddings, greedy decoding repeats the last prompt token whatever the layers do;
    tests that compare generated tokens use `tied=False`, whose tokens follow the weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=304, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for linear in layer_map(model).named_projections().values():
            w = linear.weight
            w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    return model


def thresholds(model) -> ActivationSparsity:
    """A threshold rule with a made-up threshold vector per projection (drops roughly half)."""
    projections = layer_map(model).named_projections()
    return ActivationSparsity(0.5, "threshold", {name: torch.rand(lin.in_features) * 0.8
                                                 for name, lin in projections.items()})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`(dense pruned model, tokenizer, dense checkpoint folder, packed folder)`, top-k 50 %."""
    root = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_pruned_model(), tiny_tokenizer()
    dense = save_pruned(model, tokenizer, root / "dense", METADATA, TOPK)
    return model, tokenizer, dense, pack_checkpoint(dense, root / "packed")


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """`(dense pruned model, packed folder)` of the untied tiny model, top-k 50 %."""
    root = tmp_path_factory.mktemp("untied")
    model = tiny_pruned_model(tied=False)
    dense = save_pruned(model, tiny_tokenizer(), root / "dense", METADATA, TOPK)
    return model, pack_checkpoint(dense, root / "packed")


def assert_matches_masked_dense(loaded, model, sparsity, ids):
    """`loaded`'s logits on `ids` equal those of the dense pruned `model` with the activation rule
    `sparsity` applied by masking its projection inputs."""
    with torch.no_grad():
        got = loaded(ids).logits
        with sparsified_inputs(layer_map(model).named_projections(), sparsity):
            want = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packed_folder_layout(tiny):
    *_, packed = tiny
    config = json.loads((packed / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "duogpt", "format": "bitmap", "format_version": 1,
        "activation_sparsity": {"fraction": 0.5, "rule": "topk"}}
    meta = duogpt.checkpoint.read_metadata(packed)
    assert meta["format"] == "bitmap" and meta["method"] == "magnitude"
    stats = meta["packing"]
    assert stats["projection_bytes_packed"] < 0.6 * stats["projection_bytes_dense"]
    tensors = load_file(packed / "model.safetensors")
    assert "model.layers.0.mlp.up_proj.bitmap" in tensors and "model.embed_tokens.weight" in tensors
    assert tensors["model.layers.0.mlp.up_proj.weight"].dim() == 1
    assert (packed / "tokenizer.json").is_file()


def test_load_gives_sparse_linear_holding_only_packed_weights(tiny):
    _, _, _, packed = tiny
    model = duogpt.load(packed)
    projections = sparse_projections(model)
    assert len(projections) == 2 * 7
    assert not any(isinstance(m, torch.nn.Linear) and m is not model.lm_head for m in model.modules())
    module = projections["model.layers.0.self_attn.q_proj"]
    assert module.topk_fraction == 0.5 and module.nbytes < 0.6 * 64 * 64 * 4


def test_engine_head_runs_the_dense_gemv_and_stays_tied(tiny):
    _, _, _, packed = tiny
    model = duogpt.load(packed)
    assert type(model.lm_head) is DenseGemvLinear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_head_with_a_non_contiguous_weight_is_refused():
    model = tiny_pruned_model()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(64, 304).t())
    with pytest.raises(ValueError, match="output projection's weight must be contiguous"):
        set_head_kernel(model, "duogpt")


@pytest.mark.parametrize("tokens", [1, 3, 8, 20], ids=lambda t: f"T{t}")
def test_packed_logits_equal_masked_dense(tiny, tokens):
    """T <= 8 runs the spmspv kernel, T > 8 the unpack + GEMM path; both apply the same rule."""
    model, _, _, packed = tiny
    ids = torch.randint(0, 300, (1, tokens))
    assert_matches_masked_dense(duogpt.load(packed), model, TOPK, ids)


def test_threshold_rule_travels_with_the_packed_weights(tiny, tmp_path):
    model, tokenizer, _, _ = tiny
    rule = thresholds(model)
    dense = save_pruned(model, tokenizer, tmp_path / "dense", METADATA, rule)
    packed = duogpt.load(pack_checkpoint(dense, tmp_path / "packed"))
    assert packed.model.layers[1].mlp.down_proj.threshold is not None
    ids = torch.randint(0, 300, (2, 4))
    assert_matches_masked_dense(packed, model, rule, ids)


def test_threshold_of_the_wrong_width_is_refused(tiny):
    module = SparseLinear.from_linear(layer_map(tiny[0]).named_projections()["model.layers.0.mlp.up_proj"])
    rule = ActivationSparsity(0.5, "threshold", {"up": torch.rand(module.in_features + 1)})
    with pytest.raises(ValueError, match="one per input channel"):
        module.set_activation_rule(rule, "up")


def _threshold_module(tiny) -> tuple[SparseLinear, torch.Tensor]:
    """`(SparseLinear with a threshold rule, its dense [out, in] weight)` of one tiny projection."""
    linear = layer_map(tiny[0]).named_projections()["model.layers.0.mlp.up_proj"]
    module = SparseLinear.from_linear(linear)
    module.set_activation_rule(ActivationSparsity(0.5, "threshold", {"up": torch.rand(64) * 0.8}), "up")
    return module, linear.weight.detach()


def _assert_applies_threshold(module, weight, x, threshold):
    """`module(x)` is the masked dense product `sparsify(x, threshold) @ weight.T`."""
    with torch.no_grad():
        torch.testing.assert_close(module(x), sparsify(x, threshold) @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16)],
                         ids=["half", "to-bfloat16"])
def test_a_dtype_cast_keeps_the_thresholds_in_float32(tiny, cast):
    """The kernel compares |x| with float32 thresholds; a cast module still applies the same rule."""
    module, _ = _threshold_module(tiny)
    threshold = module.threshold.clone()
    cast(module)
    assert module.threshold.dtype == torch.float32 and torch.equal(module.threshold, threshold)
    x = torch.randn(3, 64)
    want = sparsify(x, threshold) @ module.dense_weight().float().T
    torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-5)


def test_a_rule_reassigned_by_hand_is_checked_at_the_call(tiny):
    module, _ = _threshold_module(tiny)
    module.threshold = module.threshold.half()
    with pytest.raises(TypeError, match="threshold must have dtype"):
        module(torch.randn(1, 64))
    module.threshold, module.topk_fraction = None, -0.3
    for tokens in (1, 20):
        with pytest.raises(ValueError, match=r"topk_fraction must be in \[0, 1\)"):
            module(torch.randn(tokens, 64))


@pytest.mark.parametrize("tokens", [1, 20], ids=["decode", "prefill"])
def test_x_gets_its_gradient_through_the_kept_activations(tiny, tokens):
    module, weight = _threshold_module(tiny)
    x = torch.randn(tokens, 64, requires_grad=True)
    module(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (sparsify(x_ref, module.threshold) @ weight.T).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 20], ids=["decode", "prefill"])
def test_under_autocast_the_projections_compute_in_the_autocast_dtype_like_nn_linear(tiny, tokens):
    module, weight = _threshold_module(tiny)
    head = DenseGemvLinear(64, 160, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    x = torch.randn(tokens, 64)
    # Half the channels just above their thresholds, where rounding to bfloat16 decides the rule.
    x[:, ::2] = module.threshold[::2] * (1 + 2**-12)
    near = (x.bfloat16().float().abs() > module.threshold) != (x.abs() > module.threshold)
    assert near.sum(1).min() >= 4  # each token keeps another set in bfloat16 than in float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_head = module(x), head(x)
        # nn.Linear's result, on the input that the rule sees in bfloat16
        y_ref = F.linear(sparsify(x.bfloat16(), module.threshold), weight)
        y_head_ref = F.linear(x, weight)
    assert y.dtype == y_head.dtype == y_ref.dtype == torch.bfloat16
    # The kernels keep the stored weights (float32 here) where autocast rounds them to bfloat16.
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=4e-3)
    torch.testing.assert_close(y_head, y_head_ref, rtol=1.6e-2, atol=4e-3)


def test_the_engine_head_records_autograd_for_a_trainable_weight(tiny):
    model = duogpt.load(tiny[3])
    x = torch.randn(1, 64)
    with torch.no_grad():
        y_kernel = model.lm_head(x)
    y = model.lm_head(x)  # the tied weight is a Parameter that requires grad
    y.sum().backward()
    torch.testing.assert_close(y, y_kernel, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight.grad is not None


def test_a_bias_of_the_wrong_shape_is_refused():
    packed = BitmapWeight.from_dense(torch.randn(8, 16))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        SparseLinear.from_bitmap(packed, torch.zeros(1, 8))


@pytest.mark.parametrize("tokens", [1, 12])  # the spMspV kernel; the unpacked dense path
def test_a_bias_is_added_after_the_sparse_product(tokens):
    """Qwen2's q/k/v projections have one: `sparsify(x) @ W.T + b`, the bias not sparsified; the
    dense engine's GEMV adds it too."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24)
    with torch.no_grad():
        linear.weight[torch.rand(24, 40) < 0.5] = 0
        linear.bias.uniform_(1.0, 2.0)
    module = SparseLinear.from_linear(linear)
    module.set_activation_rule(TOPK, "up")
    dense = DenseGemvLinear(40, 24)
    dense.load_state_dict(linear.state_dict())
    x = torch.randn(tokens, 40)
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(sparsify(x, topk_fraction=0.5), linear.weight,
                                                       linear.bias))
        torch.testing.assert_close(dense(x), linear(x))


@pytest.mark.parametrize("out_features", [32, 33, 1024, 1025])  # either side of a bitmap word, a tile
def test_an_empty_module_takes_the_state_dict_of_a_packed_one(out_features):
    """`SparseLinear(in, out, nnz, dtype=)` is what transformers and `load_state_dict` fill: its
    buffers have the packed tensors' sizes, and no bias unless asked for."""
    torch.manual_seed(0)
    w = torch.randn(out_features, 4)
    w[torch.rand_like(w) < 0.5] = 0
    full = SparseLinear.from_bitmap(BitmapWeight.from_dense(w))
    empty = SparseLinear(4, out_features, full.weight.numel(), dtype=torch.float32)
    assert ({k: v.shape for k, v in empty.state_dict().items()}
            == {k: v.shape for k, v in full.state_dict().items()})
    empty.load_state_dict(full.state_dict())
    x = torch.randn(2, 4)
    torch.testing.assert_close(empty(x), x @ w.T)


def test_the_resident_bytes_are_those_of_the_three_packed_tensors():
    w = torch.randn(40, 64)
    w[torch.rand_like(w) < 0.5] = 0
    packed = BitmapWeight.from_dense(w, torch.bfloat16)
    assert SparseLinear.from_bitmap(packed).nbytes == packed.nbytes == (
        2 * packed.values.numel() + 4 * packed.bitmap.numel() + 4 * packed.offsets.numel())


@pytest.mark.parametrize("tokens", [1, 20], ids=["decode", "prefill"])
def test_a_threshold_given_as_a_strided_view_is_applied(tiny, tokens):
    module, weight = _threshold_module(tiny)
    threshold = (torch.rand(128) * 0.8)[::2]  # the module keeps a contiguous copy for the kernels
    module.set_activation_rule(ActivationSparsity(0.5, "threshold", {"up": threshold}), "up")
    _assert_applies_threshold(module, weight, torch.randn(tokens, 64), threshold)


@pytest.mark.parametrize("tokens", [3, 12], ids=["decode", "prefill"])
def test_a_non_contiguous_input_is_read_by_its_values(tiny, tokens):
    module, weight = _threshold_module(tiny)
    _assert_applies_threshold(module, weight, torch.randn(tokens, 128)[:, 32:96], module.threshold)


@pytest.mark.parametrize("tokens, kernel", [(1, True), (8, True), (9, False)])
def test_up_to_max_tokens_run_the_spmspv_kernel(tiny, monkeypatch, tokens, kernel):
    """Decode batches of up to MAX_TOKENS (8) tokens run the kernel; longer inputs unpack."""
    from duogpt.engine import sparse_linear

    calls, op = [], sparse_linear.spmspv_validated
    monkeypatch.setattr(sparse_linear, "spmspv_validated", lambda *a: calls.append(a[0].shape) or op(*a))
    module, weight = _threshold_module(tiny)
    _assert_applies_threshold(module, weight, torch.randn(tokens, 64), module.threshold)
    assert calls == ([(tokens, 64)] if kernel else [])


def test_the_module_repr_names_sizes_density_values_dtype_and_rule(tiny):
    module, weight = _threshold_module(tiny)  # 160 x 64
    density = (weight != 0).sum().item() / weight.numel()
    assert repr(module) == (f"SparseLinear(in_features=64, out_features=160, density={density:.3f}, "
                            f"values=torch.float32, threshold)")
    module.set_activation_rule(TOPK, "up")
    assert repr(module).endswith("topk_fraction=0.5)")
    module.set_activation_rule(ActivationSparsity(0.0), "up")
    assert repr(module).endswith("dense activations)")


def test_a_packed_weight_built_by_hand_is_validated_once_when_wrapped():
    """SparseLinear's calls skip the packed tensors' checks, so a bad weight must not get in."""
    good = BitmapWeight.from_dense(torch.randn(64, 16))
    claims_more_rows = BitmapWeight(good.bitmap, good.values, good.offsets, (4096, 16))
    with pytest.raises(ValueError, match="bitmap is"):
        SparseLinear.from_bitmap(claims_more_rows)


def test_dense_gemv_linear_runs_a_weight_assigned_later_that_is_not_contiguous(tiny):
    model = to_dense_engine(duogpt.load(tiny[3]), "duogpt")
    linear = model.model.layers[0].mlp.up_proj  # 160 x 64
    linear.weight = torch.nn.Parameter(torch.randn(64, 160).t(), requires_grad=False)
    x = torch.randn(2, 64)
    torch.testing.assert_close(linear(x), F.linear(x, linear.weight))


@pytest.mark.parametrize("tokens, kernel", [(1, True), (8, True), (9, False)])
def test_dense_gemv_linear_runs_the_kernel_for_up_to_max_tokens(monkeypatch, tokens, kernel):
    """Its decode GEMV (up to MAX_TOKENS tokens) is duogpt's dense_gemv, longer inputs run
    nn.Linear; both give nn.Linear's result, also for a non-contiguous x."""
    from duogpt.engine import dense

    calls, op = [], dense.dense_gemv_validated
    monkeypatch.setattr(dense, "dense_gemv_validated", lambda x, w: calls.append(x.shape) or op(x, w))
    torch.manual_seed(0)
    linear = DenseGemvLinear(64, 24).requires_grad_(False)
    x = torch.randn(tokens, 128)[:, 32:96]
    torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias))
    assert calls == ([(tokens, 64)] if kernel else [])


def test_the_dense_engine_keeps_a_projections_bias_frozen():
    """Qwen2-style q/k/v biases survive sparse -> dense; the engine records no autograd, so a
    decode step in grad mode still runs the GEMV kernel."""
    model = tiny_pruned_model()
    q = model.model.layers[0].self_attn.q_proj
    q.bias = torch.nn.Parameter(torch.rand(q.out_features))
    ids = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        want = model(ids).logits
    engine = to_dense_engine(convert_for_runtime(model, ActivationSparsity(0.0)), "duogpt")
    q = engine.model.layers[0].self_attn.q_proj
    assert type(q) is DenseGemvLinear and not q.weight.requires_grad and not q.bias.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(engine(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_sparse_linear_takes_empty_batches_and_names_a_wrong_width(tiny):
    module, _ = _threshold_module(tiny)
    assert module(torch.randn(0, 64)).shape == (0, 160)
    with pytest.raises(ValueError, match="x has 63 features .* 64 input channels"):
        module(torch.randn(2, 63))


def test_a_float64_module_names_the_dtypes_the_kernels_take(tiny):
    module, _ = _threshold_module(tiny)
    module.double()
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        module(torch.randn(1, 64))


@pytest.mark.filterwarnings("error::FutureWarning")
def test_kv_cached_loops_use_the_forwards_current_cache_keyword(tiny):
    # transformers 5.24 renamed `past_key_values` to `cache`, warning until its removal in 5.40.
    model, tokenizer, _, _ = tiny
    Decoder(model, max_seq_len=8).generate(torch.randint(0, 300, (1, 3)), 4)
    samples = sample_from_model(model, tokenizer, 2, 6, torch.Generator().manual_seed(0))
    assert samples.shape == (2, 6)


def test_sampled_sequences_start_at_bos_else_eos_else_a_random_token(tiny):
    model = tiny[0]
    def first_tokens(bos, eos):
        tokenizer = types.SimpleNamespace(bos_token_id=bos, eos_token_id=eos)
        return sample_from_model(model, tokenizer, 12, 3, torch.Generator().manual_seed(0))[:, 0]
    assert first_tokens(5, 7).eq(5).all()
    assert first_tokens(None, 7).eq(7).all()
    assert first_tokens(None, None).unique().numel() > 1


def test_random_first_tokens_are_drawn_from_the_whole_vocabulary(tiny):
    model = tiny[0]  # 304 tokens, hidden size 64
    no_bos_nor_eos = types.SimpleNamespace(bos_token_id=None, eos_token_id=None)
    first = sample_from_model(model, no_bos_nor_eos, 300, 1, torch.Generator().manual_seed(0))[:, 0]
    assert first.min() >= 0 and first.max() < 304 and (first >= 152).any() and (first < 152).any()


def test_each_sampled_token_is_drawn_from_the_model_given_the_whole_prefix(tiny):
    """The KV-cached sampling draws what sampling the full prefix at each step draws, with the
    same CPU generator: softmax of the last position's logits at temperature 1."""
    model, tokenizer = tiny[0], types.SimpleNamespace(bos_token_id=None, eos_token_id=0)
    samples = sample_from_model(model, tokenizer, 3, 6, torch.Generator().manual_seed(1), batch=2)
    generator = torch.Generator().manual_seed(1)
    for b0 in (0, 2):
        want = torch.zeros(min(2, 3 - b0), 1, dtype=torch.int64)
        with torch.no_grad():
            for _ in range(5):
                probs = torch.softmax(model(want, use_cache=False).logits[:, -1].float(), dim=-1)
                want = torch.cat([want, torch.multinomial(probs, 1, generator=generator)], dim=1)
        assert torch.equal(samples[b0:b0 + 2], want)
    assert samples[:, 1:].unique().numel() > 3


def test_round_trip_generate_equals_masked_dense_greedy(untied):
    """prune -> pack -> load -> 32 greedy tokens == the masked dense model's, fp32 on CPU."""
    model, packed = untied
    prompt = torch.randint(0, 300, (1, 5))
    sparse = Decoder(duogpt.load(packed), max_seq_len=40).generate(prompt, 32)
    with sparsified_inputs(layer_map(model).named_projections(), TOPK):
        reference = Decoder(model, max_seq_len=40).generate(prompt, 32)
    assert sparse.tokens.shape == (1, 32)
    assert torch.equal(sparse.tokens, reference.tokens)
    without_rule = Decoder(model, max_seq_len=40).generate(prompt, 32)
    assert not torch.equal(without_rule.tokens, reference.tokens)  # the tokens follow the rule


def test_dense_checkpoint_is_packed_on_load(tiny):
    model, _, dense, _ = tiny
    loaded = duogpt.load(dense)
    assert len(sparse_projections(loaded)) == 14
    ids = torch.randint(0, 300, (1, 6))
    assert_matches_masked_dense(loaded, model, TOPK, ids)


def test_activation_rule_override(tiny):
    model, _, _, packed = tiny
    loaded = duogpt.load(packed, activation_sparsity=ActivationSparsity(0.0))
    ids = torch.randint(0, 300, (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no SparseLinear"):
        set_activation_sparsity(model, TOPK)


@pytest.mark.parametrize("kernel", ["torch", "duogpt"])
def test_dense_engine_runs_the_same_weights_without_activation_rule(tiny, kernel):
    model, _, _, packed = tiny
    engine = to_dense_engine(duogpt.load(packed), kernel)
    assert not sparse_projections(engine)
    assert type(engine.lm_head) is (DenseGemvLinear if kernel == "duogpt" else torch.nn.Linear)
    ids = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(engine(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_unknown_dense_kernel_is_refused_before_anything_changes(tiny):
    _, _, _, packed = tiny
    model = duogpt.load(packed)
    with pytest.raises(ValueError, match=r"dense kernel must be one of \('torch', 'duogpt'\), got 'blas'"):
        to_dense_engine(model, "blas")
    assert len(sparse_projections(model)) == 2 * 7 and type(model.lm_head) is DenseGemvLinear


def test_save_packed_equals_pack_of_saved(tiny, tmp_path):
    model, tokenizer, _, packed = tiny
    direct = save_packed(model, tokenizer, tmp_path / "direct", METADATA, TOPK)
    a, b = load_file(direct / "model.safetensors"), load_file(packed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.name.startswith(".duogpt-dense") for p in tmp_path.iterdir())


def test_a_failed_save_packed_leaves_nothing_behind(tiny, tmp_path):
    model, tokenizer, _, _ = tiny
    with pytest.raises(ValueError, match="int8"):
        save_packed(model, tokenizer, tmp_path / "new" / "packed", METADATA, TOPK, dtype=torch.int8)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_final_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "duogpt.json").write_text("old")
    rename = Path.rename

    def staging_cannot_be_renamed(self, target):
        if self.name.startswith(".out.tmp-") and not self.name.endswith("-old"):
            raise OSError("rename failed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", staging_cannot_be_renamed)
    with pytest.raises(OSError, match="rename failed"), atomic_folder(out, overwrite=True) as staging:
        (staging / "duogpt.json").write_text("new")
    assert (out / "duogpt.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_thresholds_are_stored_as_contiguous_float32_whatever_their_dtype_and_layout(tmp_path):
    """Thresholds calibrated on a bf16 model, or sliced from a larger tensor, are still saved."""
    half = torch.rand(8).to(torch.bfloat16)
    strided = torch.rand(16)[::2]
    sparsity = ActivationSparsity(0.5, "threshold", {"model.layers.0.mlp.up_proj": half,
                                                     "model.layers.0.mlp.down_proj": strided})
    write_metadata(tmp_path, METADATA, sparsity)
    stored = load_file(tmp_path / THRESHOLDS_FILE)
    assert {v.dtype for v in stored.values()} == {torch.float32}
    assert torch.equal(stored["model.layers.0.mlp.up_proj"], half.float())
    assert torch.equal(stored["model.layers.0.mlp.down_proj"], strided)


@pytest.mark.parametrize("shard_size", ["10MB", "60KB"], ids=["one-shard-with-index", "shards"])
def test_sharded_checkpoint_keeps_its_shards_and_index(tiny, tmp_path, shard_size):
    model, tokenizer, _, _ = tiny
    dense = tmp_path / "dense"
    model.save_pretrained(dense, max_shard_size=shard_size)
    if not (dense / "model.safetensors.index.json").exists():  # as other tools write one shard
        (dense / "model.safetensors").rename(dense / "model-00001-of-00001.safetensors")
        keys = load_file(dense / "model-00001-of-00001.safetensors").keys()
        (dense / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": dict.fromkeys(keys, "model-00001-of-00001.safetensors")}))
    tokenizer.save_pretrained(dense)
    write_metadata(dense, METADATA, TOPK)
    packed = pack_checkpoint(dense, tmp_path / "packed")
    index = json.loads((packed / "model.safetensors.index.json").read_text())
    assert {"model.layers.0.mlp.up_proj.bitmap", "model.embed_tokens.weight"} <= index["weight_map"].keys()
    assert all((packed / name).is_file() for name in index["weight_map"].values())
    assert_matches_masked_dense(duogpt.load(packed), model, TOPK, torch.randint(0, 300, (1, 5)))


def test_a_corrupted_config_json_is_named(tiny, tmp_path):
    _, _, dense, _ = tiny
    broken = tmp_path / "broken"
    shutil.copytree(dense, broken)
    (broken / "config.json").write_text("garbage")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        pack_checkpoint(broken, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_pack_casts_storage_dtype(tiny, tmp_path):
    _, _, dense, _ = tiny
    packed = pack_checkpoint(dense, tmp_path / "bf16", dtype=torch.bfloat16)
    model = duogpt.load(packed)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="already packed"):
        pack_checkpoint(packed, tmp_path / "again")


def test_pack_records_the_exact_bytes_of_the_projections(tiny):
    """duogpt.json's packing stats are the packed tensors' bytes and the dense projections'."""
    model, _, _, packed = tiny
    stats = read_metadata(packed)["packing"]
    loaded = duogpt.load(packed)
    assert stats["projection_bytes_packed"] == sum(m.nbytes for m in sparse_projections(loaded).values())
    assert stats["projection_bytes_dense"] == sum(
        lin.weight.numel() * lin.weight.element_size()
        for lin in layer_map(model).named_projections().values())
    assert stats["storage_dtype"] == "float32"


def test_pack_casts_only_the_floating_tensors(tiny, tmp_path):
    """`dtype` is a storage dtype for floating tensors; an integer tensor is copied as it is."""
    _, _, dense, _ = tiny
    src = tmp_path / "dense"
    shutil.copytree(dense, src)
    tensors = load_file(src / "model.safetensors")
    counts = torch.arange(6, dtype=torch.int64)
    tensors["extra.counts"] = counts
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    packed = load_file(pack_checkpoint(src, tmp_path / "bf16", dtype=torch.bfloat16) / "model.safetensors")
    assert packed["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert packed["extra.counts"].dtype == torch.int64 and torch.equal(packed["extra.counts"], counts)


def test_pack_copies_the_files_of_the_source_but_not_its_subfolders(tiny, tmp_path):
    """Hub downloads may hold subfolders (`original/`); pack copies only the top-level files."""
    _, _, dense, _ = tiny
    src = tmp_path / "dense"
    shutil.copytree(dense, src)
    (src / "original").mkdir()
    (src / "original" / "params.json").write_text("{}")
    (src / "README.md").write_text("notes")
    packed = pack_checkpoint(src, tmp_path / "packed")
    assert (packed / "README.md").read_text() == "notes"
    assert not (packed / "original").exists()
    assert read_metadata(packed)["format"] == "bitmap"


def test_save_packed_and_pack_keep_an_existing_out_unless_told_to_overwrite(tiny, tmp_path):
    model, tokenizer, dense, _ = tiny
    out = tmp_path / "out"
    shutil.copytree(dense, out)  # an earlier duogpt output
    with pytest.raises(FileExistsError, match="already exists"):
        save_packed(model, tokenizer, out, METADATA, TOPK)
    with pytest.raises(FileExistsError, match="already exists"):
        pack_checkpoint(dense, out)
    assert read_metadata(out)["format"] == "dense"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    save_packed(model, tokenizer, out, METADATA, TOPK, overwrite=True)
    assert read_metadata(out)["format"] == "bitmap"


def test_a_checkpoint_without_projection_weights_is_refused(tiny, tmp_path):
    _, _, dense, _ = tiny
    src = tmp_path / "dense"
    shutil.copytree(dense, src)
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if ".layers." not in k}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds no projection weights"):
        pack_checkpoint(src, tmp_path / "packed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_unregistered_load_fails_loudly(tiny, monkeypatch):
    """Without duogpt's registration transformers would skip the quantizer; the packed values
    stored as `P.weight` turn that into a size-mismatch error instead of random projections."""
    _, _, _, packed = tiny
    monkeypatch.delitem(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "duogpt")
    monkeypatch.delitem(hf_auto.AUTO_QUANTIZER_MAPPING, "duogpt")
    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(packed)


def test_auto_model_loads_packed_after_import(tiny):
    _, _, _, packed = tiny
    model = AutoModelForCausalLM.from_pretrained(packed)
    assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)


@pytest.mark.parametrize("imports", [
    "import duogpt; from transformers import AutoModelForCausalLM",  # the quantizer registers later
    "import transformers, duogpt; from transformers import AutoModelForCausalLM",
    "from transformers import AutoModelForCausalLM; import duogpt",  # it registers at once
])
def test_auto_model_loads_packed_whichever_is_imported_first(tiny, imports):
    _, _, _, packed = tiny
    result = run_python(f"""
        import sys
        {imports}
        model = AutoModelForCausalLM.from_pretrained({str(packed)!r})
        print(type(model.model.layers[0].mlp.down_proj).__name__)
        print(sum(type(finder).__module__.startswith("duogpt") for finder in sys.meta_path))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SparseLinear", "0"]  # and the import hook is gone


def test_auto_model_runs_the_activation_rule_of_the_packed_folder(tiny):
    """transformers' own loader gives the same model as duogpt.load: top-k 50 % on every input."""
    model, _, _, packed = tiny
    loaded = AutoModelForCausalLM.from_pretrained(packed)
    assert {m.topk_fraction for m in sparse_projections(loaded).values()} == {0.5}
    assert_matches_masked_dense(loaded, model, TOPK, torch.randint(0, 300, (1, 5)))


def test_a_model_loaded_through_transformers_cannot_be_saved_again(tiny, tmp_path):
    *_, packed = tiny
    with pytest.raises(ValueError, match="not serializable"):
        AutoModelForCausalLM.from_pretrained(packed).save_pretrained(tmp_path / "resaved")


@pytest.mark.parametrize("format, version", [("bitmap", 2), ("csr", 1)])
def test_the_quantization_config_refuses_other_formats_and_versions(format, version):
    with pytest.raises(ValueError, match="is not supported by this duogpt"):
        DuoGPTConfig(format=format, format_version=version)


def test_the_quantization_config_round_trips_and_defaults_to_dense_activations():
    config = DuoGPTConfig.from_dict({"quant_method": "duogpt", "format": "bitmap", "format_version": 1,
                                     "activation_sparsity": {"fraction": 0.5, "rule": "topk"}})
    assert {"format": "bitmap", "format_version": 1}.items() <= config.to_dict().items()
    assert DuoGPTConfig().activation_sparsity == {"fraction": 0.0, "rule": "topk"}
    assert DuoGPTConfig().sparsity().fraction == 0.0


def test_registration_works_with_a_loader_that_takes_no_attributes():
    """Frozen or compiled applications load modules with loaders that cannot be patched; the
    registry must still load, duogpt must register, and the module keeps its own loader."""
    result = run_python("""
        import importlib.abc, importlib.util, sys

        class Sealed:  # __slots__: no attribute can be added to an instance
            __slots__ = ("inner",)
            def __init__(self, inner): self.inner = inner
            def create_module(self, spec): return self.inner.create_module(spec)
            def exec_module(self, module): self.inner.exec_module(module)

        class SealedFinder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name != "transformers.quantizers.auto":
                    return None
                sys.meta_path.remove(self)
                spec = importlib.util.find_spec(name)
                spec.loader = Sealed(spec.loader)
                return spec

        sys.meta_path.insert(0, SealedFinder())
        import duogpt  # its hook goes in front of SealedFinder
        import transformers.quantizers.auto as registry
        print("duogpt" in registry.AUTO_QUANTIZER_MAPPING, type(registry.__loader__).__name__,
              type(registry.__spec__.loader).__name__)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "Sealed", "Sealed"]


def test_where_transformers_has_no_quantizer_registry_its_import_fails_as_without_duogpt(monkeypatch):
    """The import hook finds nothing that the other finders do not find: the import raises
    ModuleNotFoundError, as it would without duogpt, and the hook takes itself off sys.meta_path."""
    from duogpt.engine import transformers_hook

    monkeypatch.setattr(transformers_hook, "REGISTRY", "duogpt.no_such_registry")
    hook = transformers_hook._AfterRegistry()
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    with pytest.raises(ModuleNotFoundError, match="duogpt.no_such_registry"):
        importlib.import_module("duogpt.no_such_registry")
    assert hook not in sys.meta_path


def _tampered(packed, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    tensors = load_file(bad / "model.safetensors")
    edit(tensors)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def test_packed_folder_without_its_quantization_config_fails_before_loading(tiny, tmp_path):
    def drop_the_quantization_config(config):
        del config["quantization_config"]
    bad = _edited_json(tiny[3], tmp_path, "config.json", drop_the_quantization_config)
    with pytest.raises(ValueError, match="no duogpt quantization_config; re-create the folder"):
        duogpt.load(bad)


def _edited_json(folder, tmp_path, name, edit):
    bad = tmp_path / "edited"
    shutil.copytree(folder, bad)
    content = json.loads((bad / name).read_text())
    edit(content)
    (bad / name).write_text(json.dumps(content))
    return bad


def test_load_applies_the_rule_of_duogpt_json_which_eval_reports(tiny, tmp_path):
    def drop_the_rule(config):
        config["quantization_config"]["activation_sparsity"]["fraction"] = 0.0
    model = duogpt.load(_edited_json(tiny[3], tmp_path, "config.json", drop_the_rule))
    assert {m.topk_fraction for m in sparse_projections(model).values()} == {0.5}


def test_a_threshold_rule_without_its_thresholds_file_is_refused(tiny, tmp_path):
    def set_threshold_rule(meta):
        meta["activation_sparsity"] = {"fraction": 0.5, "rule": "threshold"}
    with pytest.raises(ValueError, match="names no thresholds file"):
        duogpt.load(_edited_json(tiny[2], tmp_path, "duogpt.json", set_threshold_rule))


@pytest.mark.parametrize("folder", [2, 3], ids=["dense", "packed"])
def test_a_truncated_weight_file_is_named(tiny, tmp_path, folder):
    bad = tmp_path / "truncated"
    shutil.copytree(tiny[folder], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated: a safetensors file cannot be read"):
        duogpt.load(bad)
    if folder == 2:
        with pytest.raises(ValueError, match="model.safetensors: a safetensors file cannot be read"):
            pack_checkpoint(bad, tmp_path / "packed")


def test_corrupted_tensor_fails_with_clear_error(tiny, tmp_path):
    def flip_a_bit(t):
        t["model.layers.1.mlp.up_proj.bitmap"][3, 0] ^= 1
    with pytest.raises(ValueError, match="corrupted at model.layers.1.mlp.up_proj"):
        duogpt.load(_tampered(tiny[3], tmp_path, flip_a_bit))


@pytest.mark.parametrize("name, message", [
    *((f"model.layers.0.self_attn.k_proj.{key}", f"has no model.layers.0.self_attn.k_proj.{key}")
      for key in ("weight", "bitmap", "offsets", "shape")),
    ("model.norm.weight", "missing 1 tensors"),
])
def test_missing_tensor_fails_with_clear_error(tiny, tmp_path, name, message):
    def drop(t):
        del t[name]
    with pytest.raises(ValueError, match=f"{message}.*re-create it with `duogpt pack`"):
        duogpt.load(_tampered(tiny[3], tmp_path, drop))


def test_decode_step_traces_as_one_graph(untied):
    """The decode step has no graph break (what CUDA-graph capture needs); eager backend, so
    only Dynamo's tracing is exercised on CPU."""
    _, packed = untied
    decoder = Decoder(duogpt.load(packed), max_seq_len=16)
    decoder._decode = torch.compile(decoder._step, backend="eager", fullgraph=True)
    prompt = torch.randint(0, 300, (1, 4))
    eager = Decoder(duogpt.load(packed), max_seq_len=16).generate(prompt, 6)
    assert torch.equal(decoder.generate(prompt, 6).tokens, eager.tokens)


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["sparse", "dense"])
def test_cuda_graph_decode_matches_eager(tiny, engine):
    """float32, so Inductor's fused rounding cannot flip a near-tie of the tiny random model."""
    _, _, _, packed = tiny
    model = duogpt.load(packed, device="cuda")
    if engine == "dense":
        to_dense_engine(model)
    prompt = torch.randint(0, 300, (2, 4))
    eager = Decoder(model, max_seq_len=48).generate(prompt, 40)
    torch._dynamo.reset()
    graphed = Decoder(model, max_seq_len=48, compile=True)
    graphed.generate(prompt, 40)  # compile and record
    assert torch.equal(graphed.generate(prompt, 40).tokens, eager.tokens)


def test_cli_pack_and_generate(tiny, tmp_path, capsys):
    _, _, dense, _ = tiny
    out = tmp_path / "cli-packed"
    assert cli.main(["pack", str(dense), "--out", str(out), "--dtype", "float32"]) == 0
    assert cli.main(["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert "the quick" in printed and "tokens/s" in printed
    assert cli.main(["pack", str(dense), "--out", str(out)]) == 2  # exists: a clear error, no traceback


def test_cli_pack_prints_the_projection_bytes_it_records(tiny, tmp_path, capsys):
    _, _, dense, _ = tiny
    out = tmp_path / "cli-packed"
    assert cli.main(["pack", str(dense), "--out", str(out)]) == 0
    stats = read_metadata(out)["packing"]
    assert capsys.readouterr().out == (
        f"packed {dense} -> {out}: projections {stats['projection_bytes_dense'] / 2**20:.1f} MiB dense -> "
        f"{stats['projection_bytes_packed'] / 2**20:.1f} MiB\n")


def test_generate_of_a_folder_that_is_no_checkpoint_says_so(tmp_path, capsys):
    """Named as no checkpoint, not for the tokenizer files it lacks as well."""
    assert cli.main(["generate", str(tmp_path), "--prompt", "the quick"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} has no duogpt.json: it is not a duogpt checkpoint" in err and "tokenizer" not in err


@pytest.mark.parametrize("engine", ["sparse", "dense"])
def test_cli_generate_runs_the_engine_asked_and_stops_at_the_models_eos(tiny, engine, capsys, monkeypatch):
    """--engine dense unpacks the weights (to_dense_engine); the end-of-sequence token is the model's
    generation_config's (2 here) rather than the tokenizer's (0)."""
    from duogpt.engine import dense as dense_module

    converted, eos = [], []
    generate = Decoder.generate
    monkeypatch.setattr(dense_module, "to_dense_engine",
                        lambda model: converted.append(to_dense_engine(model)))
    monkeypatch.setattr(Decoder, "generate", lambda self, prompt, n, eos_token_id=None: (
        eos.append(eos_token_id) or generate(self, prompt, n, eos_token_id=eos_token_id)))
    assert cli.main(["generate", str(tiny[3]), "--prompt", "the quick", "--max-new-tokens", "3",
                     "--engine", engine]) == 0
    assert len(converted) == (engine == "dense") and eos == [2] != [tiny[1].eos_token_id]
    assert f"[{engine} engine on cpu: " in capsys.readouterr().out


def test_cli_generate_prints_the_prompt_and_its_continuation_without_special_tokens(tiny, capsys,
                                                                                     monkeypatch):
    """The end-of-sequence token that stopped the decode is not printed as text."""
    tokenizer = tiny[1]
    new = tokenizer(" fox jumps", return_tensors="pt").input_ids[0].tolist() + [tokenizer.eos_token_id]
    monkeypatch.setattr(Decoder, "generate", lambda self, prompt, n, eos_token_id=None: (
        Generation(torch.tensor([new]), prefill_s=0.01, decode_s=0.02)))
    assert cli.main(["generate", str(tiny[3]), "--prompt", "the quick", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "the quick fox jumps"


def test_generate_without_tokenizer_files_says_so_before_the_model_loads(tiny, tmp_path, capsys,
                                                                          monkeypatch):
    _, _, _, packed = tiny
    bare = tmp_path / "bare"
    shutil.copytree(packed, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(duogpt, "load", load)
    assert cli.main(["generate", str(bare), "--prompt", "the quick"]) == 2
    assert f"{bare} has no tokenizer files" in capsys.readouterr().err


def test_overwrite_replaces_only_a_duogpt_checkpoint(tiny, tmp_path, capsys):
    _, _, dense, _ = tiny
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "important.txt").write_text("precious")
    assert cli.main(["pack", str(dense), "--out", str(keep), "--overwrite"]) == 2
    assert "is not a duogpt checkpoint" in capsys.readouterr().err
    assert (keep / "important.txt").read_text() == "precious"
    assert cli.main(["pack", str(dense), "--out", str(dense), "--overwrite"]) == 2
    assert "is, holds or lies inside the checkpoint being packed" in capsys.readouterr().err
    assert read_metadata(dense)["format"] == "dense"
    out = tmp_path / "packed"
    for _ in range(2):  # the second run replaces the first
        assert cli.main(["pack", str(dense), "--out", str(out), "--overwrite"]) == 0
    assert read_metadata(out)["format"] == "bitmap"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "packed"]


def test_pack_refuses_an_out_nested_with_its_source(tiny, tmp_path, capsys):
    _, _, dense, _ = tiny
    outer = tmp_path / "outer"
    shutil.copytree(dense, outer)
    shutil.copytree(dense, outer / "inner")
    before = sorted(p.relative_to(outer) for p in outer.rglob("*"))
    # --overwrite of the folder around the source would delete the source with it.
    assert cli.main(["pack", str(outer / "inner"), "--out", str(outer), "--overwrite"]) == 2
    assert cli.main(["pack", str(outer), "--out", str(outer / "packed")]) == 2
    assert capsys.readouterr().err.count("is, holds or lies inside the checkpoint being packed") == 2
    assert sorted(p.relative_to(outer) for p in outer.rglob("*")) == before


@pytest.mark.parametrize("argv, message", [
    (["generate", "nowhere", "--prompt", "a", "--max-new-tokens", "0"], "must be at least 1, got 0"),
    (["bench", "decode", "nowhere", "--new-tokens", "1"], "must be at least 2, got 1"),
    (["bench", "decode", "nowhere", "--batch-sizes", "1,0"], "must be at least 1, got 0"),
    (["bench", "decode", "nowhere", "--batch-sizes", "1,a"], "'a' is not an integer"),
    (["bench", "decode", "nowhere", "--prompt-len", "0"], "must be at least 1, got 0"),
    (["bench", "decode", "nowhere", "--threads", "-1"], "must be at least 1, got -1"),
    (["eval", "nowhere", "--device", "gpu0"], "'gpu0' is not a device"),
    pytest.param(["generate", "nowhere", "--prompt", "a", "--device", "cuda"], "sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
], ids=["max-new-tokens", "new-tokens", "batch-size-0", "batch-size-a", "prompt-len", "threads",
        "device-name", "no-gpu"])
def test_bad_flags_are_refused_before_anything_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: command"),
    (["bench"], "the following arguments are required: kind"),
    (["prune"], "the following arguments are required: --out"),
    (["pack", "nowhere"], "the following arguments are required: --out"),
    (["generate", "nowhere"], "the following arguments are required: --prompt"),
], ids=["command", "bench-kind", "prune-out", "pack-out", "generate-prompt"])
def test_a_missing_command_or_required_flag_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag, smallest", [
    (["prune", "--out", "x"], "--nsamples", 1),
    (["prune", "--out", "x"], "--seqlen", 1),
    (["prune", "--out", "x"], "--blocksize", 1),
    (["prune", "--out", "x"], "--ppl-windows", 1),
    (["prune", "--out", "x"], "--ppl-seqlen", 2),
    (["generate", "nowhere", "--prompt", "a"], "--max-new-tokens", 1),
    (["eval", "nowhere"], "--seqlen", 2),
    (["eval", "nowhere"], "--max-windows", 1),
    (["eval", "nowhere"], "--batch-size", 1),
    (["eval", "nowhere"], "--limit", 1),
    (["eval", "nowhere"], "--seed", 0),
    (["bench", "decode", "nowhere"], "--prompt-len", 1),
    (["bench", "decode", "nowhere"], "--new-tokens", 2),
    (["bench", "decode", "nowhere"], "--threads", 1),
    (["bench", "decode", "nowhere"], "--batch-sizes", 1),
], ids=lambda v: v[0] if isinstance(v, list) else str(v))
def test_count_flags_take_their_smallest_value_and_refuse_one_less(argv, flag, smallest, capsys):
    """The parser checks the counts, before any model loads."""
    parser = cli.build_parser()
    args = parser.parse_args([*argv, flag, str(smallest)])
    value = getattr(args, flag[2:].replace("-", "_"))
    assert value == ((smallest,) if flag == "--batch-sizes" else smallest)
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, flag, str(smallest - 1)])
    assert f"must be at least {smallest}, got {smallest - 1}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, defaults", [
    (["prune", "--out", "x"], {
        "model": "smollm2-135m", "method": "duogpt", "weight_sparsity": 0.5, "nm": None,
        "activation_sparsity": 0.5, "activation_rule": "topk", "alpha": 0.125, "percdamp": 0.01,
        "blocksize": 128, "calib": "c4", "nsamples": 128, "seqlen": 2048, "seed": 0,
        "act_order": None, "true_sequential": None, "device": None,  # None: decided by the method
        "dtype": "float32", "ppl": None, "ppl_windows": 8, "ppl_seqlen": 512, "resume": False,
        "quiet": False}),
    (["generate", "nowhere", "--prompt", "a"], {
        "max_new_tokens": 64, "engine": "sparse", "device": "cpu", "dtype": None, "compile": False}),
    (["eval", "nowhere"], {
        "ppl": "wikitext2", "seqlen": 2048, "max_windows": None, "activation_sparsity": None, "tasks": "",
        "reference": None, "device": "cpu", "dtype": None, "batch_size": 1, "limit": None,
        "include_path": None, "seed": 0, "json": None}),
    (["bench", "decode", "nowhere"], {
        "batch_sizes": (1, 2, 4, 8), "prompt_len": 32, "new_tokens": 64, "device": "cpu", "dtype": None,
        "threads": None, "compile": None, "json": None}),
], ids=["prune", "generate", "eval", "bench"])
def test_flags_default_to_the_documented_values(argv, defaults):
    """As each command's --help, docs/pruning.md and docs/engine.md state."""
    args = vars(cli.build_parser().parse_args(argv))
    assert {k: args[k] for k in defaults} == defaults


def test_generating_past_the_models_context_is_warned_about(tiny, caplog):
    model = duogpt.load(tiny[3])  # max_position_embeddings 256
    with caplog.at_level("WARNING", logger="duogpt"):
        Decoder(model, 300)
    assert ("a generation (prompt plus new tokens) of 300 tokens exceeds the model's context of 256"
            in caplog.text)


def test_an_empty_prompt_is_refused(tiny, capsys):
    assert cli.main(["generate", str(tiny[3]), "--prompt", ""]) == 2
    assert "gives no tokens" in capsys.readouterr().err


def test_bench_decode_report(tiny, capsys):
    _, _, _, packed = tiny
    assert cli.main(["bench", "decode", str(packed), "--batch-sizes", "1,2", "--new-tokens", "4",
                     "--prompt-len", "3"]) == 0
    printed = capsys.readouterr().out
    assert "| sparse | 2 |" in printed and "| dense-duogpt | 1 |" in printed


def test_bench_decode_runs_on_the_threads_asked_and_writes_the_json_report(tiny, tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "decode.json"
    try:
        assert cli.main(["bench", "decode", str(tiny[3]), "--batch-sizes", "1", "--new-tokens", "2",
                         "--prompt-len", "2", "--threads", str(threads + 1), "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith(f"decode benchmark: {tiny[3]} on cpu (") and "CPU kernels), float32, " in header
    assert f", {threads + 1} threads, compile=False, prompt 2, 2 new tokens" in header
    report = json.loads(out.read_text())
    assert report["settings"]["threads"] == threads + 1 and report["settings"]["new_tokens"] == 2
    assert [(r["engine"], r["batch"]) for r in report["runs"]] == [
        ("sparse", 1), ("dense-torch", 1), ("dense-duogpt", 1)]
    assert report["versions"]["version"] == duogpt.__version__


def test_bench_decode_fields(tiny):
    from duogpt.engine.bench import bench_decode

    report = bench_decode(str(tiny[3]), batches=(1,), new_tokens=3, prompt_len=2, dense_kernels=("torch",))
    run = report["runs"][0]
    assert {r["engine"] for r in report["runs"]} == {"sparse", "dense-torch"}
    assert run["tokens_per_s"] > 0 and run["weight_bytes"] > 0 and run["peak_gpu_bytes"] is None
    assert report["best_dense"] == {1: "dense-torch"} and report["speedup"][1] > 0
    assert report["settings"]["compile"] is False and report["settings"]["dtype"] == "float32"


def test_bench_decode_defaults_and_the_best_dense_engine_per_batch(tiny, monkeypatch):
    """Batches 1, 2, 4, 8, a 32-token prompt and 64 new tokens by default; the speed-up of each
    batch is over the faster of the dense kernels."""
    from duogpt.engine import bench

    speeds = {"sparse": [40.0, 70.0, 90.0, 100.0], "dense-torch": [10.0, 20.0, 50.0, 80.0],
              "dense-duogpt": [20.0, 10.0, 60.0, 40.0]}
    measured = []

    def measure(model, engine, batch, prompt_len, new_tokens, compile):
        measured.append((engine, batch, prompt_len, new_tokens))
        return bench.DecodeRun(engine, batch, speeds[engine][(1, 2, 4, 8).index(batch)], 1.0, 1, None)
    monkeypatch.setattr(bench, "_measure", measure)
    report = bench.bench_decode(str(tiny[3]))
    assert measured == [(engine, b, 32, 64) for engine in speeds for b in (1, 2, 4, 8)]
    assert report["best_dense"] == {1: "dense-duogpt", 2: "dense-torch", 4: "dense-duogpt", 8: "dense-torch"}
    assert report["speedup"] == {1: 2.0, 2: 3.5, 4: 1.5, 8: 1.25}


def test_bench_decode_takes_up_to_8_sequences_and_times_each_step(tiny):
    from duogpt.engine.bench import bench_decode

    report = bench_decode(str(tiny[3]), batches=(1, 8), new_tokens=3, prompt_len=2, dense_kernels=("torch",))
    assert [(r["engine"], r["batch"]) for r in report["runs"]] == [
        ("sparse", 1), ("sparse", 8), ("dense-torch", 1), ("dense-torch", 8)]
    for r in report["runs"]:  # ms per decode step and tokens per second describe the same steps
        assert r["ms_per_step"] * r["tokens_per_s"] == pytest.approx(1e3 * r["batch"])
    sparse, dense = report["runs"][0], report["runs"][2]
    assert dense["weight_bytes"] > 1.2 * sparse["weight_bytes"]  # the dense engine holds unpacked weights


def test_bench_markdown_table():
    from duogpt.engine.bench import markdown

    report = {"speedup": {1: 2.0}, "runs": [
        {"engine": "sparse", "batch": 1, "tokens_per_s": 120.0, "ms_per_step": 8.333,
         "weight_bytes": 3 * 2**20, "peak_gpu_bytes": None},
        {"engine": "dense-torch", "batch": 1, "tokens_per_s": 60.0, "ms_per_step": 16.667,
         "weight_bytes": 6 * 2**20, "peak_gpu_bytes": 512 * 2**20}]}
    assert markdown(report).splitlines() == [
        "| engine | batch | tokens/s | ms/step | weights MiB | peak GPU MiB | speed-up vs best dense |",
        "|---|---|---|---|---|---|---|",
        "| sparse | 1 | 120.0 | 8.33 | 3.0 | - | 2.00x |",
        "| dense-torch | 1 | 60.0 | 16.67 | 6.0 | 512 |  |"]


def test_random_models_have_the_published_parameter_counts():
    from duogpt.engine.bench import RANDOM_SHAPES

    counts = {}
    for name, shape in RANDOM_SHAPES.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts == {"llama2-7b": 6_738_415_616, "smollm2-135m": 134_515_008}


def test_random_models_are_half_pruned_at_random_with_top_k_half_activations(monkeypatch):
    from duogpt.engine import bench

    monkeypatch.setitem(bench.RANDOM_SHAPES, "tiny", {
        "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 304})
    model = bench.random_pruned("tiny", device="cpu", dtype=torch.float32)
    projections = sparse_projections(model)
    assert len(projections) == 14 and type(model.lm_head) is DenseGemvLinear  # the engine's head
    for module in projections.values():
        assert module.topk_fraction == 0.5
        density = module.weight.numel() / (module.in_features * module.out_features)
        assert density == pytest.approx(0.5, abs=0.05)
    again = sparse_projections(bench.random_pruned("tiny", device="cpu", dtype=torch.float32))
    other = sparse_projections(bench.random_pruned("tiny", device="cpu", dtype=torch.float32, seed=1))
    name = "model.layers.0.mlp.up_proj"
    assert torch.equal(again[name].dense_weight(), projections[name].dense_weight())
    assert not torch.equal(other[name].dense_weight(), projections[name].dense_weight())
    report = bench.bench_decode("random:tiny", batches=(1,), new_tokens=2, prompt_len=2,
                                dense_kernels=("torch",))
    assert report["settings"]["dtype"] == "bfloat16"  # random: on CPU
    with pytest.raises(ValueError, match=r"unknown random model 'nope'; choose one of \['llama2-7b'"):
        bench.bench_decode("random:nope")


@pytest.mark.parametrize("kernel", ["torch", "duogpt"])
@pytest.mark.parametrize("tokens", [3, 12], ids=lambda t: f"T{t}")
def test_dense_engine_runs_values_stored_in_another_dtype(tiny, tmp_path, kernel, tokens):
    """`duogpt.load(dtype=)` keeps the packed values' dtype; the dense engine computes in the
    activations' dtype, as a plain dense model of that dtype does."""
    _, _, dense, _ = tiny
    packed = pack_checkpoint(dense, tmp_path / "bf16", dtype=torch.bfloat16)
    sparse = duogpt.load(packed, dtype=torch.float32, activation_sparsity=ActivationSparsity(0.0))
    engine = to_dense_engine(duogpt.load(packed, dtype=torch.float32), kernel)
    ids = torch.randint(0, 300, (1, tokens))
    with torch.no_grad():
        torch.testing.assert_close(engine(ids).logits, sparse(ids).logits, rtol=1e-4, atol=1e-4)


def test_load_gives_the_dtype_asked_else_the_stored_one(tiny, tmp_path):
    _, _, dense, _ = tiny  # stored in float32
    packed = pack_checkpoint(dense, tmp_path / "bf16", dtype=torch.bfloat16)
    assert duogpt.load(packed).model.embed_tokens.weight.dtype == torch.bfloat16
    assert duogpt.load(packed, dtype=torch.float32).model.embed_tokens.weight.dtype == torch.float32
    assert duogpt.load(dense, dtype=torch.bfloat16).model.embed_tokens.weight.dtype == torch.bfloat16


def test_bench_decode_stores_both_engines_in_the_asked_dtype(tiny):
    from duogpt.engine.bench import bench_decode

    report = bench_decode(str(tiny[3]), dtype=torch.bfloat16, batches=(1,), new_tokens=2,
                          prompt_len=2)
    fp32 = bench_decode(str(tiny[3]), batches=(1,), new_tokens=2, prompt_len=2)
    assert report["settings"]["dtype"] == "bfloat16"
    for bf16_run, fp32_run in zip(report["runs"], fp32["runs"], strict=True):
        assert bf16_run["weight_bytes"] < 0.6 * fp32_run["weight_bytes"]  # int32 bitmaps stay


@pytest.mark.parametrize("batches, new_tokens, message", [
    ((1, 16), 4, r"batch sizes must be 1 to 8"), ((0,), 4, r"batch sizes must be 1 to 8"),
    ((1,), 1, "new_tokens must be at least 2"),
])
def test_bench_decode_refuses_what_it_cannot_measure(tiny, batches, new_tokens, message):
    from duogpt.engine.bench import bench_decode

    with pytest.raises(ValueError, match=message):
        bench_decode(str(tiny[3]), batches=batches, new_tokens=new_tokens)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_a_config_that_disagrees_with_the_packed_shapes_is_refused(tiny, tmp_path, kv_heads):
    """The kernels would read past the packed buffers of a projection the config makes larger."""
    edited = _edited_json(tiny[3], tmp_path, "config.json", lambda c: c.update(num_key_value_heads=kv_heads))
    with pytest.raises(ValueError, match=r"k_proj: the stored weight is 32 x 64 but the model's "
                                         r"config makes this projection \d+ x 64"):
        duogpt.load(edited)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_a_dense_checkpoint_whose_config_disagrees_with_its_weights_is_refused(tiny, tmp_path, kv_heads):
    """Loading names the mismatch (not transformers' traceback), and packing refuses it and writes
    nothing, rather than a packed folder that no loader accepts."""
    edited = _edited_json(tiny[2], tmp_path, "config.json", lambda c: c.update(num_key_value_heads=kv_heads))
    for load in (duogpt.load, lambda path: load_model(str(path))):
        with pytest.raises(ValueError, match="config.json does not belong to these weights"):
            load(edited)
    with pytest.raises(ValueError, match=r"k_proj.weight is \(32, 64\) but config.json makes it"):
        pack_checkpoint(edited, tmp_path / "packed")
    assert [p.name for p in tmp_path.iterdir()] == ["edited"]


def test_pack_refuses_thresholds_that_do_not_fit_their_projection(tmp_path):
    model = tiny_pruned_model()
    rule = thresholds(model)
    name = next(iter(rule.thresholds))
    rule = ActivationSparsity(0.5, "threshold", rule.thresholds | {name: rule.thresholds[name][:5]})
    dense = save_pruned(model, tiny_tokenizer(), tmp_path / "dense", METADATA, rule)
    with pytest.raises(ValueError, match=rf"{name}: the activation threshold has shape \(5,\)"):
        pack_checkpoint(dense, tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


class ScriptedLM(torch.nn.Module):
    """A causal-LM stand-in whose greedy choice at its i-th call is `script[:, i]`, whatever the
    input: generation control without depending on what a random model happens to emit."""

    def __init__(self, script: list[list[int]]):
        super().__init__()
        self.config = tiny_pruned_model().config
        self.script, self.calls = torch.tensor(script), 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the Decoder's device

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=1):
        tokens = self.script[:, self.calls]
        self.calls += 1
        return types.SimpleNamespace(logits=F.one_hot(tokens, 304).float()[:, None])


def test_generation_stops_once_every_sequence_has_ended():
    script = [[5, 6, 2, 7, 8, 9], [5, 6, 7, 8, 3, 9]]
    tokens = Decoder(ScriptedLM(script), 10).generate(torch.zeros(2, 1, dtype=torch.int64), 6,
                                                      eos_token_id=[2, 3]).tokens
    assert tokens.tolist() == [[5, 6, 2, 2, 2], [5, 6, 7, 8, 3]]  # an ended sequence repeats its end
    assert Decoder(ScriptedLM(script), 10).generate(torch.zeros(2, 1, dtype=torch.int64), 6,
                                                    eos_token_id=9).tokens.tolist() == script
    assert Decoder(ScriptedLM(script), 10).generate(torch.zeros(2, 1, dtype=torch.int64), 6,
                                                    eos_token_id=5).tokens.tolist() == [[5], [5]]


def test_decode_rate_counts_every_sequence_over_the_decode_steps():
    """`new - 1` steps (the first token comes from the prefill) of `batch` sequences each; NaN
    where there was no decode step to time."""
    assert Generation(torch.zeros(2, 5, dtype=torch.int64), 0.5, 2.0).decode_tokens_per_s == 4.0
    assert Generation(torch.zeros(1, 2, dtype=torch.int64), 0.5, 0.5).decode_tokens_per_s == 2.0
    assert math.isnan(Generation(torch.zeros(2, 1, dtype=torch.int64), 0.5, 0.0).decode_tokens_per_s)
    assert math.isnan(Generation(torch.zeros(2, 5, dtype=torch.int64), 0.5, 0.0).decode_tokens_per_s)


def test_generation_times_the_prefill_and_the_decode_steps_apart():
    start = time.perf_counter()
    result = Decoder(ScriptedLM([[5, 6, 7, 8]]), 8).generate(torch.zeros(1, 2, dtype=torch.int64), 4)
    elapsed = time.perf_counter() - start
    assert result.tokens.tolist() == [[5, 6, 7, 8]]
    assert 0 <= result.prefill_s and 0 <= result.decode_s and result.prefill_s + result.decode_s <= elapsed


def test_a_generation_may_fill_the_cache_exactly():
    """`max_seq_len` bounds prompt plus new tokens: 3 + 5 fit in 8 positions, 3 + 6 do not."""
    script = [[1, 2, 3, 4, 5, 6]]
    prompt = torch.zeros(1, 3, dtype=torch.int64)
    assert Decoder(ScriptedLM(script), 8).generate(prompt, 5).tokens.tolist() == [script[0][:5]]
    assert Decoder(ScriptedLM(script), 8).generate(prompt, 1).tokens.tolist() == [[1]]
    with pytest.raises(ValueError, match=r"3 prompt \+ 6 new tokens exceed the cache of 8 positions"):
        Decoder(ScriptedLM(script), 8).generate(prompt, 6)


def test_a_decoder_generates_the_same_tokens_each_time():
    """Each generation starts from an empty cache."""
    model = tiny_pruned_model(tied=False)  # its greedy tokens follow the cache's contents
    decoder = Decoder(model, max_seq_len=16)
    prompt = torch.randint(0, 300, (1, 5))
    first = decoder.generate(prompt, 6).tokens
    assert torch.equal(decoder.generate(prompt, 6).tokens, first)
    assert torch.equal(Decoder(model, max_seq_len=16).generate(prompt, 6).tokens, first)


def test_a_decoder_takes_one_batch_size_and_at_least_one_new_token(tiny):
    decoder = Decoder(tiny[0], max_seq_len=10)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        decoder.generate(torch.zeros(1, 3, dtype=torch.int64), 0)
    decoder.generate(torch.zeros(1, 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="cache holds 1 sequences, the prompt has 2"):
        decoder.generate(torch.zeros(2, 3, dtype=torch.int64), 2)


@pytest.mark.parametrize("tokens", [3, 12], ids=lambda t: f"T{t}")
def test_a_forward_in_grad_mode_keeps_no_dense_weight_and_gives_the_masked_dense_gradient(tiny, tokens):
    module = sparse_projections(duogpt.load(tiny[3]))["model.layers.0.mlp.up_proj"]  # 160 x 64
    x = torch.randn(tokens, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = module(x)
    assert (160, 64) not in saved and (64, 160) not in saved
    g = torch.randn(tokens, 160)
    (y * g).sum().backward()
    x_ref = x.detach().requires_grad_()
    (F.linear(sparsify(x_ref, None, 0.5), module.dense_weight()) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
