"""Zero-shot tasks through lm-evaluation-harness, on the in-memory model (`HFLM(pretrained=model)`).

The model object is evaluated as it is: its SparseLinear projections (or activation-sparsity
hooks) stay active. lm-eval is an optional extra (`pip install duogpt[eval]`), imported lazily.
"""

from __future__ import annotations

import os

from torch import nn

ZERO_SHOT = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "boolq")


def check_tasks(tasks: list[str], include_path: str | os.PathLike | None = None):
    """lm-eval's task index, checked to hold every one of `tasks`; callers make it before loading a
    model, so that a missing lm-eval or a misspelt task costs nothing.

    Args:
        tasks: lm-eval task names.
        include_path: a folder of extra task YAMLs (e.g. a local task with local data).

    Returns:
        the `lm_eval.tasks.TaskManager`, for `zero_shot`.

    Raises:
        ValueError: lm-eval is not installed, or a task is unknown.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("zero-shot tasks need lm-evaluation-harness: pip install 'duogpt[eval]' "
                         "(or pip install lm-eval)") from None
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval has no task {', '.join(map(repr, unknown))}; `lm-eval ls tasks` "
                         f"lists them")
    return manager


def zero_shot(model: nn.Module, tokenizer, tasks: list[str], manager, *, batch_size: int = 1,
              limit: int | None = None) -> tuple[dict, dict]:
    """Run `tasks` zero-shot.

    Args:
        model, tokenizer: the model to evaluate (on its device) and its tokenizer.
        tasks: lm-eval task names.
        manager: `check_tasks(tasks, ...)` (indexing the tasks takes seconds: it is made once).
        batch_size: requests per forward.
        limit: evaluate only the first N documents of each task (quick checks).

    Returns:
        `({task: {metric: value}}, {task: version})` as reported by lm-eval (a task's version
        changes when its prompt or scoring does).

    Raises:
        ValueError: a task's data is unreachable.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit,
                              task_manager=manager, log_samples=False)
    except ConnectionError as err:  # lm-eval downloads each task's data through `datasets`
        raise ValueError(f"lm-eval could not fetch the data of {', '.join(tasks)} ({err}); run it "
                         f"where the dataset hub is reachable, or from a local task") from None
    metrics = {task: {k: v for k, v in values.items() if k != "alias"}
               for task, values in out["results"].items()}
    return metrics, out.get("versions", {})
