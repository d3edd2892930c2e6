"""Stand-in for modules/progress.py (task bookkeeping only)."""

from __future__ import annotations

import random
from collections import OrderedDict

current_task = None
pending_tasks = OrderedDict()
finished_tasks = []
recorded_results = []


def create_task_id(task_type):
    return f"task({task_type}-{''.join(random.choice('0123456789abcdef') for _ in range(7))})"


def add_task_to_queue(id_job):
    pending_tasks[id_job] = 0


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)


def record_results(id_task, res):
    recorded_results.append((id_task, res))
