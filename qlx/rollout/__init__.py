"""qlx.rollout: batched generation with a KV cache and exact log-probs, and the OpenAI-compatible server.

- ``generate(model, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop_token_ids=(), seed=0,
  return_logprobs=True)`` -> :class:`GenerateResult` (tokens, log-probs, lengths, finish reasons).
- ``generate_rows(model, prompts, specs)``: the same with one :class:`SamplingSpec` per prompt.
- ``ContinuousEngine(model, EngineConfig(...))``: continuous batching over a paged KV cache (``submit`` groups,
  ``step`` bursts, stream, ``cancel``, ``stats``; ``qlx.rollout.continuous``); ``generate_continuous`` is
  ``generate_rows``' contract on it.
- ``sampling_logprobs(logits, temperature, top_p, top_k)``: the distribution tokens are drawn from.
- ``serve_in_thread(model, tokenizer, port=0)``: the HTTP server in a background thread (yields the base URL);
  ``qlx.rollout.backend`` is the generation-backend protocol it speaks (``StaticBackend``, ``ContinuousBackend``).
"""

from qlx.rollout.continuous import ContinuousEngine, EngineConfig, generate_continuous
from qlx.rollout.engine import GenerateResult, SamplingSpec, generate, generate_rows
from qlx.rollout.sampling import sampling_logprobs
from qlx.rollout.server import OpenAIServer, serve_in_thread

__all__ = [
    "ContinuousEngine",
    "EngineConfig",
    "GenerateResult",
    "OpenAIServer",
    "SamplingSpec",
    "generate",
    "generate_continuous",
    "generate_rows",
    "sampling_logprobs",
    "serve_in_thread",
]
