"""Problems as `Sample`s: data files (JSONL, Parquet, datasets folders) and built-in tasks."""

from guidedrl.data.loaders import load_samples, row_to_sample
from guidedrl.data.tasks import TASKS, default_reward, resolve_task

__all__ = ["TASKS", "default_reward", "load_samples", "resolve_task", "row_to_sample"]
