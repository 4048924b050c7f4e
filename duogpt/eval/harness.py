"""Zero-shot tasks through lm-evaluation-harness, on the in-memory model (`HFLM(pretrained=model)`).

The model object is evaluated as it is: its SparseLinear projections (or activation-sparsity
hooks) stay active. lm-eval is an optional extra (`pip install duogpt[eval]`), imported lazily.
"""

from __future__ import annotations

import os

from torch import nn

ZERO_SHOT = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "boolq")


def zero_shot(model: nn.Module, tokenizer, tasks: list[str], *, batch_size: int = 1,
              limit: int | None = None, include_path: str | os.PathLike | None = None) -> dict:
    """Run `tasks` zero-shot; returns `{task: {metric: value}}` as reported by lm-eval.

    Args:
        model, tokenizer: the model to evaluate (on its device) and its tokenizer.
        tasks: lm-eval task names.
        batch_size: requests per forward.
        limit: evaluate only the first N documents of each task (quick checks).
        include_path: a folder of extra task YAMLs (e.g. a local task with local data).

    Raises:
        ValueError: lm-eval is not installed, a task is unknown, or its data is unreachable.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("zero-shot tasks need lm-evaluation-harness: pip install 'duogpt[eval]' "
                         "(or pip install lm-eval)") from None
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval has no task {', '.join(map(repr, unknown))}; `lm-eval ls tasks` "
                         f"lists them")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit,
                              task_manager=manager, log_samples=False)
    except ConnectionError as err:  # lm-eval downloads each task's data through `datasets`
        raise ValueError(f"lm-eval could not fetch the data of {', '.join(tasks)} ({err}); run it "
                         f"where the dataset hub is reachable, or from a local task") from None
    return {task: {k: v for k, v in metrics.items() if k != "alias"}
            for task, metrics in out["results"].items()}
