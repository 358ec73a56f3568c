"""Long Range Arena tasks (ListOps, Text, Retrieval, Image, Pathfinder, Path-X) and associative recall (MQAR).

    from tasks import build_task, available_tasks
    task = build_task("listops", cache_dir=".arena_cache", seed=0, num_train=1000)
    for batch in task.batches("train", 32, shuffle=True, epoch=0): ...

Importing the package registers every task; see :mod:`tasks.base` for the contract.
"""

from tasks.base import (
    IGNORE_INDEX,
    SPLITS,
    Task,
    TaskConfig,
    TaskInfo,
    available_tasks,
    build_task,
    get_task_info,
    register_task,
)

# Importing a task module registers it.
from tasks import image, listops, mqar, pathfinder, retrieval, text  # noqa: E402,F401  isort: skip

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "Task",
    "TaskConfig",
    "TaskInfo",
    "available_tasks",
    "build_task",
    "get_task_info",
    "register_task",
]
