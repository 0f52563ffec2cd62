"""Long-context data: tokenizers with the Qwen chat template, the synthesis engines, records and grain pipelines.

Public names (see README, "Data synthesis"):

- tokenizers: ``load_tokenizer``, ``train_bpe_tokenizer``, ``render_chat``, ``Tokenizer``
- records: ``Record``, ``TASK_TYPES``, ``read_jsonl``, ``write_jsonl``, ``read_context``
- synthesis: ``SynthConfig``, ``synthesize``, ``make_demo_dataset``, ``generate_world``, ``load_corpus``
- loading: ``StageLimits``, ``make_dataset``, ``encode_record``
- filters: ``qlx.data.filters`` (decontamination, knowledge grounding, robustness, difficulty, dedup, bins), run
  inside synthesis by ``qlx.data.filter_chain.FilterConfig``; LLM endpoint: ``LLMConfig``, ``ChatClient``
"""

from qlx.data.corpus import load_corpus
from qlx.data.demo_data import make_demo_dataset
from qlx.data.llm import ChatClient, LLMConfig
from qlx.data.pipeline import StageLimits, encode_record, make_dataset
from qlx.data.records import TASK_TYPES, Record, read_context, read_jsonl, write_jsonl
from qlx.data.synth import SynthConfig, synthesize
from qlx.data.tokenizer import Tokenizer, load_tokenizer, render_chat, train_bpe_tokenizer
from qlx.data.world import generate_world

__all__ = [
    "TASK_TYPES",
    "ChatClient",
    "LLMConfig",
    "Record",
    "StageLimits",
    "SynthConfig",
    "Tokenizer",
    "encode_record",
    "generate_world",
    "load_corpus",
    "load_tokenizer",
    "make_dataset",
    "make_demo_dataset",
    "read_context",
    "read_jsonl",
    "render_chat",
    "synthesize",
    "train_bpe_tokenizer",
    "write_jsonl",
]
