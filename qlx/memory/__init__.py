"""qlx.memory: the memory agent, one compiled loop (lax.scan) over the chunks of a document (recipe §3.1).

- ``MemoryAgentConfig``: chunk, memory and answer sizes, template, carry rule, sampling (``qlx.memory.config``).
- ``run(model, tokenizer, questions, documents, config, *, samples_per_question=1, seed=0)`` -> ``MemoryRollout``:
  every update turn inside one ``lax.scan`` over the chunk index, then the final-answer turn (``qlx.memory.agent``).
- ``run_reference(...)``: the same agent as a Python loop over ``qlx.rollout.generate_rows`` calls (the oracle).
- ``memory_analysis(...)``: compiled device memory of run's two executables (flat in document length).
- ``evidence_chunks(record, tokenizer, config)``: the chunk (update turn) that shows each evidence fact of a
  ``qlx synth`` record; ``evidence_position``: the third of the document where its evidence ends, for results by
  evidence position (``qlx.memory.evidence``).
- ``warm_start_turns(record, tokenizer, config, question, answer, stop_id=...)``: every turn of a record with its
  ideal target (memory = the evidence seen so far, then the answer), for an SFT warm start (``qlx.memory.warm_start``).
- ``qlx.memory.batch.conversations``: a rollout's turns as the conversations of the RL batch (``train.mode: memory``).
- ``MemoryTemplate``, ``TEMPLATES``: prompts with slots; ``carried_memory``: the carry rule (``qlx.memory.carry``).
"""

from qlx.memory.agent import FINAL_TURN, MemoryRollout, centre_truncate, memory_analysis, run, run_reference
from qlx.memory.carry import CARRY_RULES, TagPatterns, carried_memory
from qlx.memory.config import MemoryAgentConfig
from qlx.memory.evidence import evidence_chunks, evidence_position
from qlx.memory.templates import TEMPLATES, MemoryTemplate, tokenize_template
from qlx.memory.warm_start import warm_start_turns

__all__ = [
    "CARRY_RULES",
    "FINAL_TURN",
    "TEMPLATES",
    "MemoryAgentConfig",
    "MemoryRollout",
    "MemoryTemplate",
    "TagPatterns",
    "carried_memory",
    "centre_truncate",
    "evidence_chunks",
    "evidence_position",
    "memory_analysis",
    "run",
    "run_reference",
    "tokenize_template",
    "warm_start_turns",
]
