"""Evaluation: the perplexity protocol, `duogpt eval` JSON, `--ppl self` fidelity, WikiText-2 from
the shared data folder, and lm-eval on a local task with local data (skipped without lm-eval)."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
import transformers
from test_engine import METADATA, TOPK, tiny_pruned_model, tiny_tokenizer

import duogpt
from duogpt import cli
from duogpt.checkpoint import save_pruned
from duogpt.engine import pack_checkpoint
from duogpt.engine.sparse_linear import SparseLinear
from duogpt.eval import data as data_module
from duogpt.eval import evaluate as evaluate_module
from duogpt.eval import perplexity
from duogpt.eval.data import eval_text
from duogpt.eval.evaluate import evaluate
from duogpt.eval.fidelity import fidelity
from duogpt.eval.perplexity import window_nlls
from duogpt.reports import write_json

TEXT = " ".join(["the quick brown fox jumps over the lazy dog."] * 40)


class Uniform(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform over `vocab` tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, self.vocab)})()


class Diverged(Uniform):
    """A 'model' sure, by 1e4 nats, that the next token is always token 0."""

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[..., 0] = 1e4
        return type("Out", (), {"logits": logits})()


def test_perplexity_protocol_non_overlapping_windows():
    ids = torch.randint(0, 50, (1, 103))
    assert math.isclose(perplexity(Uniform(50), ids, seqlen=10), 50.0, rel_tol=1e-6)
    assert window_nlls(Uniform(50), ids, 10).shape == (10,)  # tail of 3 tokens dropped
    assert window_nlls(Uniform(50), ids, 10, max_windows=4).shape == (4,)
    with pytest.raises(ValueError, match="no window"):
        perplexity(Uniform(50), ids, seqlen=200)


class Peaked(Uniform):
    """A 'model' that puts logit 5 on token 0 and 0 on the others."""

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[..., 0] = 5.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("seqlen, max_windows, windows", [(2, None, 51), (10, 1, 1), (103, None, 1)])
def test_the_smallest_windows_are_scored(seqlen, max_windows, windows):
    ids = torch.randint(0, 50, (1, 103))
    assert window_nlls(Uniform(50), ids, seqlen, max_windows).shape == (windows,)
    assert math.isclose(perplexity(Uniform(50), ids, seqlen, max_windows), 50.0, rel_tol=1e-6)


@pytest.mark.parametrize("seqlen, max_windows", [(1, None), (10, 0)])
def test_windows_that_predict_nothing_are_refused(seqlen, max_windows):
    with pytest.raises(ValueError, match="need seqlen >= 2 and at least one window"):
        perplexity(Uniform(50), torch.randint(0, 50, (1, 103)), seqlen, max_windows)


def test_perplexity_scores_one_token_stream():
    with pytest.raises(ValueError, match=r"input_ids must be \[1, T\], got \(2, 30\)"):
        perplexity(Uniform(50), torch.randint(0, 50, (2, 30)), 10)


def test_fidelity_figures_have_their_closed_forms():
    """Against a uniform reference u over V = 50 tokens, a model p with logit 5 on token 0 has, at
    every predicted position, KL(u || p) = -log V - mean(log p), and agrees on top-1 (the
    reference's argmax is its first tie, token 0)."""
    ids = torch.randint(1, 50, (3, 11))  # never token 0
    p = torch.zeros(50).index_fill_(0, torch.tensor([0]), 5.0).softmax(0).double()
    kl = -math.log(50) - p.log().mean().item()
    figures = fidelity(Peaked(50), Uniform(50), ids)
    assert figures["tokens"] == 30
    assert figures["mean_kl"] == pytest.approx(kl, rel=1e-5)
    assert figures["top1_agreement"] == 1.0
    assert figures["ppl"] == pytest.approx(1 / p[1].item(), rel=1e-5)
    assert fidelity(Uniform(50), Uniform(50), ids)["ppl"] == pytest.approx(50.0, rel=1e-5)


def test_a_diverged_model_has_infinite_perplexity_not_an_overflow_error():
    ids = torch.randint(1, 50, (2, 11))  # never token 0: every prediction costs about 1e4 nats
    assert perplexity(Diverged(50), ids[:1], seqlen=10) == math.inf
    assert fidelity(Diverged(50), Uniform(50), ids)["ppl"] == math.inf


def test_json_reports_write_non_finite_numbers_as_strings(tmp_path):
    out = tmp_path / "r.json"
    write_json(out, {"ppl": math.inf, "runs": [-math.inf, math.nan], "ok": {"value": 1.5}})

    def refuse(constant):
        raise AssertionError(f"bare {constant} is not JSON")
    assert json.loads(out.read_text(), parse_constant=refuse) == {
        "ppl": "inf", "runs": ["-inf", "nan"], "ok": {"value": 1.5}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dense = save_pruned(tiny_pruned_model(), tiny_tokenizer(), root / "dense", METADATA, TOPK)
    text = root / "text.txt"
    text.write_text(TEXT)
    return dense, pack_checkpoint(dense, root / "packed"), text


def _eval(tmp_path, *argv) -> dict:
    out = tmp_path / "eval.json"
    assert cli.main(["eval", *map(str, argv), "--json", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # renamed into place
    return json.loads(out.read_text())


def test_eval_json_fields(checkpoints, tmp_path, capsys):
    _, packed, text = checkpoints
    report = _eval(tmp_path, packed, "--ppl", text, "--seqlen", 16, "--max-windows", 3)
    ppl = report["metrics"]["perplexity"]
    assert ppl["windows"] == 3 and ppl["tokens"] == 48 and ppl["value"] > 1
    assert ppl["source"] == str(text.resolve())
    settings = report["settings"]
    assert settings["activation_sparsity"] == {"fraction": 0.5, "rule": "topk"}
    assert settings["activation_sparsity_source"] == "duogpt.json" and settings["engine"] == "sparse"
    assert settings["seqlen"] == 16 and settings["dtype"] == "float32"
    assert report["checkpoint"]["method"] == "magnitude" and report["checkpoint"]["format"] == "bitmap"
    assert {"version", "torch"} <= report["versions"].keys()
    assert "perplexity" in capsys.readouterr().out


def test_eval_prints_its_settings_and_each_metric(checkpoints, tmp_path, capsys):
    dense, packed, text = checkpoints
    report = _eval(tmp_path, packed, "--ppl", text, "--seqlen", 16, "--max-windows", 1)
    ppl = report["metrics"]["perplexity"]
    lines = capsys.readouterr().out.splitlines()
    assert f"{packed} (sparse engine, activation sparsity 0.5 topk, seqlen 16)" in lines
    assert f"  perplexity {ppl['dataset']}: {ppl['value']:.3f} (1 window)" in lines
    report = _eval(tmp_path, packed, "--ppl", "self", "--seqlen", 8, "--reference", dense)
    m = report["metrics"]["fidelity"]
    lines = capsys.readouterr().out.splitlines()
    assert (f"  self: perplexity {m['ppl']:.3f}, top-1 agreement {m['top1_agreement']:.4f}, mean KL "
            f"{m['mean_kl']:.4f} nats vs {dense} ({m['tokens']} tokens)") in lines


def test_eval_prints_the_numeric_metrics_of_each_task(monkeypatch, capsys):
    report = {"settings": {"engine": "sparse", "activation_sparsity": {"fraction": 0.5, "rule": "topk"}},
              "metrics": {"tasks": {"piqa": {"alias": "piqa", "acc,none": 0.625, "acc_stderr,none": 0.03125},
                                    "boolq": {"acc,none": 0.5}}}}
    monkeypatch.setattr(evaluate_module, "evaluate", lambda model, **kwargs: report)
    assert cli.main(["eval", "packed", "--ppl", "none", "--tasks", "piqa,boolq"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "packed (sparse engine, activation sparsity 0.5 topk, seqlen 2048)",
        "  piqa: acc,none 0.6250, acc_stderr,none 0.0312", "  boolq: acc,none 0.5000"]


def test_zeroshot_names_the_seven_tasks_and_empty_names_are_dropped(monkeypatch):
    """`--tasks zeroshot` is piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, boolq."""
    asked = []

    def record(model, **kwargs):
        asked.append((kwargs["ppl"], kwargs["tasks"]))
        raise ValueError("recorded")
    monkeypatch.setattr(evaluate_module, "evaluate", record)
    assert cli.main(["eval", "nowhere", "--ppl", "none", "--tasks", "zeroshot"]) == 2
    assert cli.main(["eval", "nowhere", "--tasks", "piqa,,boolq,"]) == 2
    assert asked == [(None, ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
                             "boolq")), ("wikitext2", ("piqa", "boolq"))]


@pytest.mark.parametrize("command", [["eval"], ["bench", "decode"]])
def test_a_bad_json_path_fails_before_the_run(command, tmp_path, capsys):
    model = tmp_path / "no-such-model"  # loading it would fail too, with another message
    assert cli.main([*command, str(model), "--json", str(tmp_path / "missing" / "r.json")]) == 2
    assert f"the folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert cli.main([*command, str(model), "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert cli.main([*command, str(model), "--json", str(tmp_path / "a-file" / "r.json")]) == 2
    assert "a-file is a file, not a folder" in capsys.readouterr().err


def test_a_missing_perplexity_text_fails_before_the_model_loads(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "no-such-model"), "--ppl", str(tmp_path / "x.txt")]) == 2
    assert "is neither one of" in capsys.readouterr().err


def test_eval_of_a_folder_without_a_model_says_what_to_give(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path), "--ppl", "self"]) == 2
    err = capsys.readouterr().err
    assert f"cannot load model '{tmp_path}'" in err and "Give a local Hugging Face folder" in err
    assert ".." not in err


@pytest.mark.parametrize("path", ["./no-such-model", "{tmp}/no-such-model"])
def test_eval_of_a_missing_folder_says_it_is_missing(tmp_path, capsys, path):
    """Not transformers' complaint about a malformed hub id."""
    path = path.format(tmp=tmp_path)
    assert cli.main(["eval", path, "--ppl", "self"]) == 2
    assert f"cannot load model '{path}': there is no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["checkpoint", "plain model"])
def test_eval_without_tokenizer_files_says_so_before_the_model_loads(checkpoints, tmp_path, capsys,
                                                                    monkeypatch, kind):
    dense, _, text = checkpoints
    leave_out = ["tokenizer*", "special_tokens*"] + (["duogpt*"] if kind == "plain model" else [])
    bare = tmp_path / "bare"
    shutil.copytree(dense, bare, ignore=shutil.ignore_patterns(*leave_out))

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(evaluate_module, "load", load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
    assert cli.main(["eval", str(bare), "--ppl", str(text)]) == 2
    assert f"{bare} has no tokenizer files" in capsys.readouterr().err


def test_eval_with_nothing_to_evaluate_is_refused(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path), "--ppl", "none"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_unreachable_task_data_is_named(checkpoints, capsys, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval",
                                  reason="lm-eval is an optional extra: pip install 'duogpt[eval]'")

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'ybisk/piqa' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    assert cli.main(["eval", str(checkpoints[1]), "--ppl", "none", "--tasks", "piqa"]) == 2
    assert "lm-eval could not fetch the data of piqa" in capsys.readouterr().err


def test_zero_shot_runs_lm_eval_with_no_examples_on_the_model_as_it_is(checkpoints, monkeypatch):
    """lm-eval gets the in-memory model, 0 examples per prompt and the task index made once; its
    results come back without lm-eval's display aliases, with the tasks' versions."""
    lm_eval = pytest.importorskip("lm_eval",
                                  reason="lm-eval is an optional extra: pip install 'duogpt[eval]'")
    from duogpt.eval.harness import zero_shot

    calls = []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: calls.append(kwargs) or {
        "results": {"piqa": {"alias": "piqa", "acc,none": 0.5}}, "versions": {"piqa": 1.0}})
    model, manager = duogpt.load(checkpoints[1]), object()
    assert zero_shot(model, tiny_tokenizer(), ["piqa"], manager, batch_size=2, limit=3) == (
        {"piqa": {"acc,none": 0.5}}, {"piqa": 1.0})
    [kwargs] = calls
    assert kwargs["model"].model is model and kwargs["model"].batch_size_per_gpu == 2
    assert (kwargs["tasks"], kwargs["num_fewshot"], kwargs["limit"]) == (["piqa"], 0, 3)
    assert kwargs["task_manager"] is manager


def test_an_unknown_lm_eval_task_is_named_before_the_model_loads(checkpoints, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'duogpt[eval]'")
    model = tmp_path / "no-such-model"  # loading it would fail, with another message
    argv = ["eval", str(model), "--ppl", str(checkpoints[2]), "--tasks", "piqa,no_such_task"]
    assert cli.main(argv) == 2
    assert "lm-eval has no task 'no_such_task'" in capsys.readouterr().err


def test_tasks_without_lm_eval_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import lm_eval` now fails as if not installed
    assert cli.main(["eval", str(tmp_path / "no-such-model"), "--ppl", "none", "--tasks", "piqa"]) == 2
    assert "zero-shot tasks need lm-evaluation-harness" in capsys.readouterr().err


def test_perplexity_alone_needs_no_lm_eval(checkpoints, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import lm_eval` now fails as if not installed
    _, packed, text = checkpoints
    report = _eval(tmp_path, packed, "--ppl", text, "--seqlen", 16, "--max-windows", 1)
    assert report["metrics"]["perplexity"]["windows"] == 1


def test_eval_dense_and_packed_agree_and_override(checkpoints, tmp_path):
    dense, packed, text = checkpoints
    args = ("--ppl", text, "--seqlen", 16, "--max-windows", 2)
    a = _eval(tmp_path, dense, *args)["metrics"]["perplexity"]["value"]
    b = _eval(tmp_path, packed, *args)["metrics"]["perplexity"]["value"]
    assert math.isclose(a, b, rel_tol=1e-4)
    off = _eval(tmp_path, packed, *args, "--activation-sparsity", 0)
    assert off["settings"]["activation_sparsity_source"] == "--activation-sparsity"
    assert off["metrics"]["perplexity"]["value"] != b


def test_eval_self_fidelity(checkpoints, tmp_path):
    dense, packed, _ = checkpoints
    args = ("--ppl", "self", "--seqlen", 24, "--max-windows", 2, "--reference", dense)
    exact = _eval(tmp_path, packed, *args, "--activation-sparsity", 0)["metrics"]["fidelity"]
    assert exact["top1_agreement"] == 1.0 and exact["mean_kl"] < 1e-6 and exact["tokens"] == 46
    sparse = _eval(tmp_path, packed, *args)["metrics"]["fidelity"]
    assert sparse["mean_kl"] > 1e-4 and 0.0 <= sparse["top1_agreement"] <= 1.0
    assert sparse["reference"] == str(dense)


def test_eval_self_records_its_seed_and_the_sequences_sampled(checkpoints, tmp_path):
    dense, packed, _ = checkpoints
    report = _eval(tmp_path, packed, "--ppl", "self", "--seqlen", 8, "--reference", dense, "--seed", 3)
    assert report["settings"]["seed"] == 3 and report["settings"]["max_windows"] is None
    assert report["metrics"]["fidelity"]["sequences"] == 4 and report["metrics"]["fidelity"]["tokens"] == 28


def _plain_copy(checkpoint, tmp_path):
    """The checkpoint as a plain Hugging Face folder: without its duogpt files."""
    plain = tmp_path / "plain"
    shutil.copytree(checkpoint, plain, ignore=shutil.ignore_patterns("duogpt*"))
    return plain


def test_eval_of_a_plain_model_runs_it_dense_unless_given_an_activation_sparsity(checkpoints, tmp_path):
    """A plain Hugging Face folder (no duogpt.json) runs dense activations, or the rule given, by
    hooks on its projections: the figures of the pruned checkpoint run by the sparse engine."""
    dense, packed, text = checkpoints
    plain = _plain_copy(dense, tmp_path)
    args = ("--ppl", text, "--seqlen", 16, "--max-windows", 2)
    report = _eval(tmp_path, plain, *args)
    assert report["checkpoint"] is None
    assert report["settings"] == {
        "ppl": str(text), "seqlen": 16, "max_windows": 2,
        "activation_sparsity": {"fraction": 0.0, "rule": "topk"}, "activation_sparsity_source": "none",
        "engine": "dense", "tasks": [], "num_fewshot": 0, "limit": None, "batch_size": None,
        "task_versions": None, "seed": None, "device": "cpu", "dtype": "float32"}
    value = report["metrics"]["perplexity"]["value"]
    assert value == pytest.approx(_eval(tmp_path, packed, *args, "--activation-sparsity", 0)
                                  ["metrics"]["perplexity"]["value"], rel=1e-4)
    sparse = _eval(tmp_path, plain, *args, "--activation-sparsity", 0.5)
    assert sparse["settings"]["activation_sparsity"] == {"fraction": 0.5, "rule": "topk"}
    assert sparse["settings"]["activation_sparsity_source"] == "--activation-sparsity"
    assert sparse["metrics"]["perplexity"]["value"] == pytest.approx(
        _eval(tmp_path, packed, *args)["metrics"]["perplexity"]["value"], rel=1e-4)


def test_self_fidelity_of_a_plain_model_compares_it_with_itself(checkpoints, tmp_path):
    """Without --reference, a plain model is its own dense reference."""
    plain = _plain_copy(checkpoints[0], tmp_path)
    fidelity = _eval(tmp_path, plain, "--ppl", "self", "--seqlen", 8)["metrics"]["fidelity"]
    assert fidelity["reference"] == str(plain) and fidelity["mean_kl"] < 1e-6
    assert fidelity["top1_agreement"] == 1.0 and fidelity["sequences"] == 4


def test_the_python_api_defaults_are_those_of_duogpt_eval(checkpoints, tmp_path):
    """Windows of 2048 tokens; `self` sampled with seed 0."""
    dense, packed, _ = checkpoints
    long_text = tmp_path / "long.txt"
    long_text.write_text(" ".join(["the quick brown fox jumps over the lazy dog."] * 300))
    ppl = evaluate(str(packed), ppl=str(long_text), max_windows=1)
    assert ppl["settings"]["seqlen"] == 2048 and ppl["metrics"]["perplexity"]["tokens"] == 2048
    fidelity = evaluate(str(packed), ppl="self", seqlen=4, max_windows=1, reference=str(dense))
    assert fidelity["settings"]["seed"] == 0


def test_a_packed_reference_is_refused_before_any_model_loads(checkpoints):
    """A packed folder loaded as the reference runs its activation rule: the figures would compare
    two sparse models."""
    _, packed, _ = checkpoints
    with pytest.raises(ValueError, match="is a packed checkpoint, which runs its activation rule"):
        evaluate("no-such-model", ppl="self", seqlen=8, reference=str(packed))


def test_self_fidelity_needs_two_tokens_per_sequence(checkpoints):
    dense, packed, _ = checkpoints
    with pytest.raises(ValueError, match="seqlen >= 2"):
        evaluate(str(packed), ppl="self", seqlen=1, reference=str(dense))


def test_wikitext2_from_shared_data(data_dir, monkeypatch):
    monkeypatch.setenv("DUOGPT_DATA", str(data_dir))
    text, source = eval_text("wikitext2")
    assert source.endswith("wiki.test.raw") and "\r\n" not in text and len(text) > 1_000_000


def test_named_sets_without_local_data_fail_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("DUOGPT_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="DUOGPT_DATA"):
        eval_text("wikitext2")
    with pytest.raises(ValueError, match="--ppl FILE"):
        eval_text("c4")
    with pytest.raises(ValueError, match="neither"):
        eval_text(str(tmp_path / "missing.txt"))


def test_perplexity_text_is_tokenized_without_special_tokens(tmp_path):
    from tokenizers.processors import TemplateProcessing

    tokenizer = tiny_tokenizer()  # its <|endoftext|> now opens every encoding it adds special tokens to
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.eos_token_id)])
    (tmp_path / "text.txt").write_text(TEXT)
    text = evaluate_module.PerplexityText.load(str(tmp_path / "text.txt"), tokenizer, seqlen=16)
    assert torch.equal(text.input_ids, tiny_tokenizer()(TEXT, return_tensors="pt").input_ids)


def test_wikitext2_is_read_from_duogpt_data_else_from_shared_data_beside_the_checkout(tmp_path, monkeypatch):
    """`$DUOGPT_DATA/wikitext-2-raw/wiki.test.raw`; without DUOGPT_DATA, an editable install reads
    `shared/data` beside its source checkout."""
    def wiki_in(folder):
        wiki = folder / "wikitext-2-raw" / "wiki.test.raw"
        wiki.parent.mkdir(parents=True)
        wiki.write_bytes(f"text of {folder.name}\r\n".encode())
        return wiki.resolve()
    chosen = wiki_in(tmp_path / "chosen")
    monkeypatch.setenv("DUOGPT_DATA", str(tmp_path / "chosen"))
    assert eval_text("wikitext2") == ("text of chosen\n", str(chosen))
    monkeypatch.delenv("DUOGPT_DATA")
    monkeypatch.setattr(data_module, "__file__", str(tmp_path / "checkout" / "duogpt" / "eval" / "data.py"))
    with pytest.raises(ValueError, match="WikiText-2 test text not found"):
        eval_text("wikitext2")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    with pytest.raises(ValueError, match="WikiText-2 test text not found"):
        eval_text("wikitext2")
    beside = wiki_in(tmp_path / "shared" / "data")
    assert eval_text("wikitext2") == ("text of data\n", str(beside))


LOCAL_TASK = """\
task: duogpt_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 2.0
"""


def test_lm_eval_local_task_runs_the_sparse_model_and_records_its_version(checkpoints, tmp_path,
                                                                          monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'duogpt[eval]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    _, packed, _ = checkpoints
    docs = [{"question": "the quick brown", "choices": [" fox", " dog"], "label": 0},
            {"question": "the lazy", "choices": [" dog", " fox"], "label": 0},
            {"question": "hello", "choices": [" world", " fast"], "label": 0}]
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(LOCAL_TASK.format(data=data))
    calls = []
    forward = SparseLinear.forward
    monkeypatch.setattr(SparseLinear, "forward", lambda self, x: calls.append(x.shape) or forward(self, x))
    report = _eval(tmp_path, packed, "--ppl", "none", "--tasks", "duogpt_local_choice",
                   "--include-path", tasks, "--batch-size", 2)
    assert calls and len(calls) % 14 == 0  # lm-eval ran the packed model's 14 projections
    acc = report["metrics"]["tasks"]["duogpt_local_choice"]["acc,none"]
    settings = report["settings"]
    assert 0.0 <= acc <= 1.0 and settings["tasks"] == ["duogpt_local_choice"]
    assert settings["batch_size"] == 2 and settings["task_versions"] == {"duogpt_local_choice": 2.0}
