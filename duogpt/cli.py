"""The `duogpt` command line: a thin shell over the library (the only argparse user).

Each command has an `_add_<command>` that declares its flags and a `_run_<command>` that calls the
library; flags are hyphenated, with underscore aliases for wanda/sparsegpt habits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path

_DTYPES = ("float32", "float16", "bfloat16")  # the --dtype choices


def _int_at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n
    return parse


def _int_list(value: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers >= 1 (`1,2,4,8`)."""
    return tuple(_int_at_least(1)(v) for v in value.split(","))


def _device(value: str) -> str:
    """An argparse type: a device this machine has, checked before any model loads."""
    from duogpt.env import check_device

    try:
        check_device(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add `--a-b` with the alias `--a_b`."""
    aliases = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    parser.add_argument(*aliases, **kwargs)


# --- env -------------------------------------------------------------------------------------

def _add_env(sub) -> None:
    sub.add_parser("env", help="print the installation's versions, CUDA build, GPU and CPU features as JSON")


def _run_env(args) -> int:
    from duogpt.env import environment

    print(json.dumps(environment(), indent=2))
    return 0


# --- prune -----------------------------------------------------------------------------------

def _add_prune(sub) -> None:
    from duogpt.prune import METHODS, PruneConfig

    d = PruneConfig(device="cpu")
    p = sub.add_parser("prune", help="prune a LLaMA-layout model (DuoGPT, SparseGPT, Wanda, magnitude) "
                       "into a Hugging Face folder plus duogpt.json")
    _flag(p, "--model", default="smollm2-135m", help="hub id, local folder, or smollm2-135m (default)")
    _flag(p, "--out", required=True, help="the folder to create")
    _flag(p, "--method", choices=METHODS, default=d.method)
    weights = p.add_mutually_exclusive_group()
    _flag(weights, "--weight-sparsity", type=float, default=d.weight_sparsity,
          help="unstructured weight sparsity p_w (default %(default)s)")
    _flag(weights, "--nm", help="N:M weight sparsity instead, e.g. 2:4 or 4:8")
    _flag(p, "--activation-sparsity", type=float, default=d.activation_sparsity,
          help="activation sparsity p_a on the 7 projection inputs (default %(default)s)")
    _flag(p, "--activation-rule", choices=("topk", "threshold"), default=d.activation_rule,
          help="topk: per token (the paper's); threshold: TEAL-style calibrated thresholds")
    _flag(p, "--calib", default="c4", help="c4 (default) | wikitext2 (need `datasets` and network) | "
          "a text file or folder of .txt files | self (sampled from the model)")
    _flag(p, "--nsamples", type=_int_at_least(1), default=d.nsamples,
          help="calibration windows (default %(default)s)")
    _flag(p, "--seqlen", type=_int_at_least(1), default=d.seqlen,
          help="tokens per calibration window (default %(default)s)")
    _flag(p, "--seed", type=int, default=d.seed, help="seed of the calibration windows (default %(default)s)")
    _flag(p, "--alpha", type=float, default=d.alpha, help="DuoGPT's residual scale")
    _flag(p, "--percdamp", type=float, default=d.percdamp,
          help="dampening, fraction of mean diag(H); escalated x10 when a Cholesky fails")
    _flag(p, "--blocksize", type=_int_at_least(1), default=d.blocksize,
          help="columns the solver updates at a time (default %(default)s)")
    _flag(p, "--act-order", action=argparse.BooleanOptionalAction,
          help="process columns by descending diag(H) (default: on, off for N:M)")
    _flag(p, "--true-sequential", action="store_true", default=None,
          help="prune each layer's groups [q,k,v], [o], [gate,up], [down] one after another, each "
          "calibrated on the earlier ones' pruned outputs (default: on for duogpt, which needs it; "
          "off for the baselines, which gather a layer's inputs in one pass like their originals)")
    _flag(p, "--device", type=_device, help="where layers are pruned: cpu or cuda[:N] (default: "
          "cuda if available)")
    _flag(p, "--dtype", choices=_DTYPES, default="float32", help="dtype the model is loaded and saved in")
    _flag(p, "--ppl", help="perplexity on CPU before (dense) and after pruning (with the activation "
          "rule): wikitext2 (default, if the local text is found: $DUOGPT_DATA, or shared/data beside "
          "an editable install's checkout) | a text FILE | none")
    _flag(p, "--ppl-windows", type=_int_at_least(1), default=8,
          help="perplexity windows at most (default %(default)s)")
    _flag(p, "--ppl-seqlen", type=_int_at_least(2), default=512,
          help="tokens per perplexity window (default %(default)s)")
    _flag(p, "--resume", action="store_true", help="continue an interrupted run into the same --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")


def _prune_ppl_source(args) -> str | None:
    """What `duogpt prune --ppl` scores, checked before the model loads; None: `--ppl none`, or no
    `--ppl` and no local WikiText-2 (logged)."""
    import logging

    from duogpt.eval.data import WIKITEXT2, eval_text_file, wikitext2_path

    dataset = args.ppl
    if dataset is None:
        if wikitext2_path() is None:
            logging.getLogger("duogpt.prune").info(
                "no perplexity: WikiText-2 test text not found (set DUOGPT_DATA to a folder holding "
                "%s, or pass --ppl FILE)", WIKITEXT2)
            return None
        dataset = "wikitext2"
    if dataset == "none":
        return None
    if dataset == "self":
        raise ValueError("--ppl self is a `duogpt eval` option; prune takes wikitext2, a text file or none")
    if dataset != "wikitext2" and not Path(dataset).is_file():
        raise ValueError(f"--ppl {dataset!r} is neither wikitext2, a text file, nor none")
    eval_text_file(dataset, instead="--ppl FILE or --ppl none")
    return dataset


def _run_prune(args) -> int:
    import logging
    import shutil
    from pathlib import Path

    import torch
    import transformers
    from tqdm.contrib.logging import logging_redirect_tqdm

    from duogpt.calibration.data import check_source
    from duogpt.checkpoint import check_out_dir, created_parents, save_pruned
    from duogpt.eval.evaluate import PerplexityText, activation_rule
    from duogpt.models.loading import load_model, model_reference
    from duogpt.prune import PruneConfig, prune

    out = Path(args.out)
    work = out.parent / f".{out.name}.partial"
    check_out_dir(out)  # as the save at the end will
    if work.exists() and any(work.iterdir()) and not args.resume:
        raise ValueError(f"an interrupted run left {work}; add --resume to continue it, or remove "
                         f"it to start over")
    weight_sparsity = args.weight_sparsity
    if args.nm:
        n, _, m = args.nm.partition(":")
        if not (n.isdigit() and m.isdigit()):
            raise ValueError(f"--nm takes N:M such as 2:4, got {args.nm!r}")
        weight_sparsity = (int(n), int(m))
    config = PruneConfig(method=args.method, weight_sparsity=weight_sparsity,
                         activation_sparsity=args.activation_sparsity,
                         activation_rule=args.activation_rule, alpha=args.alpha,
                         percdamp=args.percdamp, blocksize=args.blocksize, act_order=args.act_order,
                         true_sequential=args.true_sequential, nsamples=args.nsamples,
                         seqlen=args.seqlen, seed=args.seed,
                         **({"device": args.device} if args.device else {}))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if config.needs_calibration:
        check_source(args.calib)
    ppl_source = _prune_ppl_source(args)
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    with contextlib.ExitStack() as cleanup:  # a failed run removes the folders it created
        try:  # found now, not after the model load and the calibration
            cleanup.enter_context(created_parents(out))
            tempfile.TemporaryFile(dir=out.parent).close()
        except OSError as err:
            raise ValueError(f"--out {out}: cannot write in {out.parent} ({err.strerror}); choose "
                             f"another --out") from None
        cleanup.enter_context(logging_redirect_tqdm())
        model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype))
        text = None if ppl_source is None else PerplexityText.load(ppl_source, tokenizer,
                                                                   args.ppl_seqlen, args.ppl_windows)
        if text is not None:
            dense = text.score(model)
            print(f"perplexity before pruning (dense, {text.dataset}, {text.windows} x {text.seqlen} "
                  f"tokens): {dense:.3f}")
        report = prune(model, tokenizer, args.calib, config, work_dir=work, progress=not args.quiet)
        rule = report.activation_sparsity
        metadata = report.metadata(model_reference(args.model))
        if text is not None:
            with activation_rule(model, rule):
                pruned = text.score(model)
            print(f"perplexity after pruning (activation sparsity {rule.fraction:g} {rule.rule}): "
                  f"{pruned:.3f}")
            metadata["perplexity"] = dict(text.describe(), dense=dense, pruned=pruned)
        save_pruned(model, tokenizer, out, metadata, rule)
        shutil.rmtree(work)
    print(f"saved {out}: {config.method}, weight sparsity {report.weight_sparsity:.4f} "
          f"({config.weight}), activation sparsity {rule.fraction:g} ({rule.rule}), "
          f"{report.timings['total_s']:.0f} s{_resumed(len(report.resumed_layers))}")
    return 0


def _resumed(layers: int) -> str:
    """What the summary line adds when layers came from an interrupted run (their time is not in
    the seconds it prints)."""
    if not layers:
        return ""
    return f" ({layers} layer{'s' if layers > 1 else ''} resumed from the interrupted run)"


# --- pack ------------------------------------------------------------------------------------


def _add_pack(sub) -> None:
    p = sub.add_parser("pack", help="store a pruned checkpoint's projections in the bitmap format")
    p.add_argument("path", help="a pruned checkpoint folder (from `duogpt prune`)")
    _flag(p, "--out", required=True, help="the packed folder to create")
    _flag(p, "--dtype", choices=_DTYPES, help="storage dtype of every floating tensor (default: as stored)")
    _flag(p, "--overwrite", action="store_true",
          help="replace an existing --out that is a duogpt checkpoint (holds duogpt.json)")


def _run_pack(args) -> int:
    import torch

    from duogpt.engine import pack_checkpoint

    out = pack_checkpoint(args.path, args.out, overwrite=args.overwrite,
                          dtype=getattr(torch, args.dtype) if args.dtype else None)
    meta = json.loads((out / "duogpt.json").read_text())["packing"]
    print(f"packed {args.path} -> {out}: projections {meta['projection_bytes_dense'] / 2**20:.1f} MiB "
          f"dense -> {meta['projection_bytes_packed'] / 2**20:.1f} MiB")
    return 0


# --- generate --------------------------------------------------------------------------------

def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedy generation with the sparse (or dense) engine")
    p.add_argument("path", help="a duogpt checkpoint folder (packed or dense format)")
    _flag(p, "--prompt", required=True)
    _flag(p, "--max-new-tokens", type=_int_at_least(1), default=64,
          help="at most; generation stops at the end-of-sequence token")
    _flag(p, "--engine", choices=("sparse", "dense"), default="sparse",
          help="sparse: SparseLinear with the activation rule; dense: the same weights unpacked, "
               "dense activations (the baseline)")
    _flag(p, "--device", type=_device, default="cpu", help="cpu (default) or cuda[:N]")
    _flag(p, "--dtype", choices=_DTYPES, help="activation dtype (default: the checkpoint's)")
    _flag(p, "--compile", action="store_true",
          help="compile the decode step (CUDA graphs on a GPU); the first tokens pay for it")


def _run_generate(args) -> int:
    import torch

    import duogpt
    from duogpt.checkpoint import read_metadata
    from duogpt.engine.dense import to_dense_engine
    from duogpt.engine.generate import Decoder
    from duogpt.models import load_tokenizer

    read_metadata(args.path)  # a folder that is no checkpoint is named as such, not for its tokenizer
    tokenizer = load_tokenizer(args.path)  # before the model, whose load takes far longer
    model = duogpt.load(args.path, device=args.device,
                        dtype=getattr(torch, args.dtype) if args.dtype else None)
    if args.engine == "dense":
        to_dense_engine(model)
    prompt = tokenizer(args.prompt, return_tensors="pt").input_ids
    if prompt.shape[1] == 0:
        raise ValueError(f"--prompt {args.prompt!r} gives no tokens; give some text")
    decoder = Decoder(model, prompt.shape[1] + args.max_new_tokens, compile=args.compile)
    eos = model.generation_config.eos_token_id
    result = decoder.generate(prompt, args.max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id if eos is None else eos)
    print(args.prompt + tokenizer.decode(result.tokens[0], skip_special_tokens=True))
    rate = result.decode_tokens_per_s  # NaN: one token, which the prefill gives
    print(f"[{args.engine} engine on {args.device}: {result.tokens.shape[1]} tokens, prefill "
          f"{result.prefill_s * 1e3:.0f} ms, " + ("no decode step]" if math.isnan(rate)
                                                   else f"decode {rate:.1f} tokens/s]"))
    return 0


# --- eval ------------------------------------------------------------------------------------

def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, fidelity to the dense model, zero-shot tasks")
    p.add_argument("model", help="a duogpt checkpoint folder, a Hugging Face folder or hub id, or smollm2-135m")
    _flag(p, "--ppl", default="wikitext2",
          help="wikitext2 (default) | FILE | self (fidelity on text sampled from the dense model) | none")
    _flag(p, "--seqlen", type=_int_at_least(2), default=2048,
          help="tokens per window (default %(default)s; state it with results)")
    _flag(p, "--max-windows", type=_int_at_least(1),
          help="at most K windows (for self: K sampled sequences, default 4)")
    _flag(p, "--activation-sparsity", type=float,
          help="top-k fraction of dropped activations (default: the rule in duogpt.json, else 0)")
    _flag(p, "--tasks", default="",
          help="comma-separated lm-eval tasks, or 'zeroshot' for piqa,hellaswag,winogrande,"
               "arc_easy,arc_challenge,openbookqa,boolq")
    _flag(p, "--reference", help="model --ppl self compares with, run with dense activations (default: "
                                       "duogpt.json's base_model; not a packed checkpoint)")
    _flag(p, "--device", type=_device, default="cpu", help="cpu (default) or cuda[:N]")
    _flag(p, "--dtype", choices=_DTYPES, help="default: as stored")
    _flag(p, "--batch-size", type=_int_at_least(1), default=1, help="lm-eval batch size")
    _flag(p, "--limit", type=_int_at_least(1), help="lm-eval: first N documents per task")
    _flag(p, "--include-path", help="lm-eval: folder of extra task YAMLs")
    _flag(p, "--seed", type=_int_at_least(0), default=0,
          help="seed of the --ppl self sampling (default %(default)s)")
    _flag(p, "--json", help="write the results, settings, checkpoint summary and versions here")


def _run_eval(args) -> int:
    import torch

    from duogpt.eval.evaluate import evaluate
    from duogpt.eval.harness import ZERO_SHOT
    from duogpt.reports import json_target, write_json

    json_out = json_target(args.json)
    tasks = [t for t in args.tasks.split(",") if t]
    if tasks == ["zeroshot"]:
        tasks = list(ZERO_SHOT)
    if args.ppl == "none" and not tasks:
        raise ValueError("--ppl none and no --tasks: nothing to evaluate")
    report = evaluate(args.model, ppl=None if args.ppl == "none" else args.ppl, seqlen=args.seqlen,
                      max_windows=args.max_windows, activation_sparsity=args.activation_sparsity,
                      tasks=tuple(tasks), reference=args.reference, device=args.device,
                      dtype=getattr(torch, args.dtype) if args.dtype else None,
                      batch_size=args.batch_size, limit=args.limit, include_path=args.include_path,
                      seed=args.seed)
    metrics, rule = report["metrics"], report["settings"]["activation_sparsity"]
    print(f"{args.model} ({report['settings']['engine']} engine, activation sparsity "
          f"{rule['fraction']} {rule['rule']}, seqlen {args.seqlen})")
    if "perplexity" in metrics:
        m = metrics["perplexity"]
        print(f"  perplexity {m['dataset']}: {m['value']:.3f} ({m['windows']} "
              f"window{'s' if m['windows'] != 1 else ''})")
    if "fidelity" in metrics:
        m = metrics["fidelity"]
        print(f"  self: perplexity {m['ppl']:.3f}, top-1 agreement {m['top1_agreement']:.4f}, "
              f"mean KL {m['mean_kl']:.4f} nats vs {m['reference']} ({m['tokens']} tokens)")
    for task, values in metrics.get("tasks", {}).items():
        print(f"  {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()
                                         if isinstance(v, float)))
    if json_out:
        write_json(json_out, report)
    return 0


# --- bench -----------------------------------------------------------------------------------

def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    kinds = p.add_subparsers(dest="kind", required=True)
    d = kinds.add_parser("decode", help="decode tokens/s: sparse vs dense engine, same model and dtype")
    d.add_argument("model", help="a duogpt checkpoint folder, or random:llama2-7b / random:smollm2-135m "
                                 "(random weights, 50%% pruned, top-k 50%% activations)")
    _flag(d, "--device", type=_device, default="cpu", help="cpu (default) or cuda[:N]")
    _flag(d, "--dtype", choices=_DTYPES, help="storage and activation dtype (default: as stored)")
    _flag(d, "--batch-sizes", type=_int_list, default=(1, 2, 4, 8), help="comma-separated (default 1,2,4,8)")
    _flag(d, "--prompt-len", type=_int_at_least(1), default=32,
          help="random prompt tokens per sequence (default %(default)s)")
    _flag(d, "--new-tokens", type=_int_at_least(2), default=64,
          help="tokens per timed run; the first comes from the prefill, so at least 2")
    _flag(d, "--threads", type=_int_at_least(1), help="CPU threads (torch and the duogpt kernels)")
    _flag(d, "--compile", action=argparse.BooleanOptionalAction,
          help="compile the decode step (default: on a GPU, with CUDA graphs)")
    _flag(d, "--json", help="write the runs and settings here")


def _run_bench(args) -> int:
    import torch

    from duogpt.engine.bench import bench_decode, markdown
    from duogpt.env import environment
    from duogpt.reports import json_target, write_json

    json_out = json_target(args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench_decode(args.model, device=args.device,
                          dtype=getattr(torch, args.dtype) if args.dtype else None,
                          batches=args.batch_sizes,
                          prompt_len=args.prompt_len, new_tokens=args.new_tokens, compile=args.compile)
    report["versions"] = environment()
    s, v = report["settings"], report["versions"]
    print(f"decode benchmark: {s['model']} on {s['device']} ({v['gpu'] or v['cpu_isa'] + ' CPU kernels'}), "
          f"{s['dtype']}, {s['threads']} threads, compile={s['compile']}, prompt {s['prompt_len']}, "
          f"{s['new_tokens']} new tokens\n")
    print(markdown(report))
    if json_out:
        write_json(json_out, report)
    return 0


# --- reports ---------------------------------------------------------------------------------

COMMANDS = {"env": (_add_env, _run_env), "prune": (_add_prune, _run_prune),
            "pack": (_add_pack, _run_pack),
            "generate": (_add_generate, _run_generate), "eval": (_add_eval, _run_eval),
            "bench": (_add_bench, _run_bench)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duogpt", description="Dual-sparse LLMs: prune, pack, "
                                     "run and measure (DuoGPT, SparseGPT, Wanda, magnitude).")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        resume = args.command == "prune"
        print(f"duogpt {args.command}: interrupted" + ("; rerun it with --resume to continue from "
              "the last finished layer" if resume else ""), file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        print(f"duogpt {args.command}: error: {err}", file=sys.stderr)
        return 2
