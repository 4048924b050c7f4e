"""JSON reports of `duogpt eval`, `duogpt bench` and the scripts in bench/: where they go and how
they are written."""

from __future__ import annotations

import json
import math
from pathlib import Path

from duogpt.checkpoint import replace_atomically


def json_target(path: str | None) -> Path | None:
    """`--json PATH`, checked before the run so that a bad path does not cost the run's results."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--json {path} is a folder; give a file path such as {target / 'report.json'}")
    if target.parent.exists() and not target.parent.is_dir():
        raise ValueError(f"--json {path}: {target.parent} is a file, not a folder; choose another path")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--json {path}: the folder {target.parent} does not exist; create it "
                                f"first or choose another path")
    return target


def write_json(target: Path, report: dict) -> None:
    """Write `report` atomically as strict JSON. Non-finite floats (the perplexity of a diverged model)
    become the strings "inf", "-inf", "nan": json.dumps would write bare Infinity/NaN, which is not
    JSON and which strict parsers (JavaScript's JSON.parse, Python's with parse_constant) reject."""
    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)  # 'inf', '-inf' or 'nan'
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    text = json.dumps(strict(report), indent=2, default=str, allow_nan=False) + "\n"
    replace_atomically(target, lambda tmp: tmp.write_text(text))
