"""Data: prompt sources (built-in task, JSONL, parquet), the char tokenizer, prompt encoding, RL batches."""

from erpo_mega.data.batcher import PromptBatch, PromptBatcher
from erpo_mega.data.builtin_task import ArithmeticTask, ArithmeticTaskConfig, SFTExample, sanity_check
from erpo_mega.data.datasets import BadRow, DataConfig, DataWarning, LoadResult, load_prompts
from erpo_mega.data.prompts import encode_prompt, encode_prompts
from erpo_mega.data.types import DataError, PromptItem

__all__ = [
    "ArithmeticTask", "ArithmeticTaskConfig", "BadRow", "DataConfig", "DataError", "DataWarning",
    "LoadResult", "PromptBatch", "PromptBatcher", "PromptItem", "SFTExample", "encode_prompt",
    "encode_prompts", "load_prompts", "sanity_check",
]
