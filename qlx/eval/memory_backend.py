"""``qlx eval --agent memory``: generation through the memory agent (``qlx.memory.run``) with an in-process model.

Each benchmark module gives ``memory_inputs(record, protocol) -> (document, question, instructions)``: the document
the agent reads chunk by chunk, the question every turn sees, and the format line its final turn adds (folded into
the question when the template has no ``{instructions}`` slot, as MemAgent's). The request's sampling settings
(temperature, top-p) apply to every turn and its ``max_new_tokens`` caps the final answer; the update turns use the
``MemoryAgentConfig``. Each request runs on its own (one trajectory, the request's seed), so a result does not depend
on which other requests share a batch: the agent's randomness is (seed, trajectory, turn). No prompt truncation: the
agent reads the whole document (``max_chunks`` centre-truncates, as MemAgent does).
"""

from __future__ import annotations

import dataclasses

from qlx.eval.benchmarks import module


def agent_inputs(request, protocol, config):
    """(question or (question, instructions), document) of a request for ``qlx.memory.run``."""
    document, question, instructions = module(request.item.benchmark).memory_inputs(request.item.record, protocol)
    if not instructions:
        return question, document
    if "{instructions}" in config.memory_template.final:
        return (question, instructions), document
    return f"{question}\n\n{instructions}", document


class MemoryAgentBackend:
    """Generation by the memory agent: ``run`` yields (request, result dict or exception) per request; the result
    holds the final answer as ``response``, its finish reason, token usage over every turn, and the number of
    chunks read (``memory_turns``)."""

    def __init__(self, model, tokenizer, config, *, protocol, model_id):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.protocol, self.model_id = protocol, model_id

    def run(self, requests):
        from qlx.memory import run

        for request in requests:
            config = dataclasses.replace(
                self.config,
                temperature=request.temperature,
                top_p=request.top_p,
                final_tokens=request.max_new_tokens,
            )
            try:
                question, document = agent_inputs(request, self.protocol, config)
                rollout = run(self.model, self.tokenizer, [question], [document], config, seed=request.seed)
            except ValueError as error:
                yield request, error
                continue
            final = rollout.final[:, 0].argmax()
            prompt = int(rollout.prompt_lengths[rollout.valid[:, 0], 0].sum())
            completion = int(rollout.response_lengths[rollout.valid[:, 0], 0].sum())
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
            yield (
                request,
                {
                    "response": rollout.answers[0],
                    "finish_reason": "stop" if rollout.stopped[final, 0] else "length",
                    "usage": usage,
                    "memory_turns": int(rollout.num_chunks[0]),
                    "document_tokens": int(rollout.document_tokens[0]),
                },
            )
