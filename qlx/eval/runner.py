"""Single-pass evaluation: prompts (truncated in the model's own tokens), generation through an OpenAI-compatible
endpoint or an in-process qlx model, the crash-safe store, then scoring (with the judge) into ``scores.jsonl``.

Out folder: ``run.json`` (the settings; a rerun must match them), ``generations.jsonl`` (the store),
``load_report.json`` (malformed records per benchmark), ``judge_cache.jsonl``, ``scores.jsonl``.
"""

import dataclasses
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from qlx.eval import mrcr
from qlx.eval.benchmarks import module, score_details
from qlx.eval.store import read_rows, row_key, write_atomic
from qlx.eval.text import THINK_CLOSE, middle_truncate

log = logging.getLogger(__name__)
_BULKY = ("context", "prompt", "paragraphs", "wiki_items", "python_solution")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """protocol: "ql" (the recipe: 128K input with middle truncation, 50K output, T 0.7, top-p 0.95) or "official";
    max_input_tokens: the prompt budget in the model's tokens (0: no truncation); truncation: middle_truncate's
    style; max_new_tokens, temperature, top_p: sampling; samples: generations per item; seed: the run seed (each
    request's seed derives from it, the item and the sample); mrcr_max_tokens: MRCR items above it (prompt + answer
    tokens) are outside the evaluated subset (QL: 0-128K)."""

    protocol: str = "ql"
    max_input_tokens: int = 131072
    truncation: str = "longbench_v2"
    max_new_tokens: int = 51200
    temperature: float = 0.7
    top_p: float = 0.95
    samples: int = 1
    seed: int = 0
    mrcr_max_tokens: int = 131072

    def __post_init__(self):
        if self.protocol not in ("ql", "official"):
            raise ValueError(f"protocol must be 'ql' or 'official', got {self.protocol!r}")
        if self.max_input_tokens < 0 or self.max_new_tokens < 1 or self.samples < 1:
            raise ValueError("max_input_tokens must be >= 0, max_new_tokens and samples >= 1")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation to make: the item, its sample index, the (truncated) messages and their bookkeeping."""

    item: object
    sample: int
    seed: int
    messages: list
    prompt_tokens: int
    truncated: bool
    over_budget: bool
    max_new_tokens: int
    temperature: float
    top_p: float

    @property
    def key(self):
        return row_key(self.item.benchmark, self.item.id, self.sample, self.seed)


def request_seed(seed, benchmark, item_id, sample):
    """The per-request seed: 31 bits of sha256("seed|benchmark|id|sample")."""
    digest = hashlib.sha256(f"{seed}|{benchmark}|{item_id}|{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def prompt_hash(messages):
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def truncate_messages(messages, tokenizer, budget, style):
    """(messages, prompt tokens before truncation, truncated?): when the contents hold more than ``budget`` tokens,
    the longest message is middle-truncated (decoded without special tokens) so the total fits; a multi-turn
    conversation (an assistant turn present, as in MRCR) is never cut and only reported."""
    counts = [len(tokenizer.encode(m["content"])) for m in messages]
    total = sum(counts)
    if budget == 0 or total <= budget or any(m["role"] == "assistant" for m in messages):
        return messages, total, False
    longest = max(range(len(messages)), key=counts.__getitem__)
    room = budget - (total - counts[longest])
    if room < 1:
        raise ValueError(f"the other messages alone hold {total - counts[longest]} tokens, over the budget {budget}")
    ids = middle_truncate(tokenizer.encode(messages[longest]["content"]), room, style)
    out = [dict(m) for m in messages]
    if style == "longbench_v1":
        half = room // 2
        out[longest]["content"] = tokenizer.decode(ids[:half], skip_special_tokens=True) + tokenizer.decode(
            ids[half:], skip_special_tokens=True
        )
    else:
        out[longest]["content"] = tokenizer.decode(ids, skip_special_tokens=True)
    return out, total, True


def _generation(item, config):
    """Sampling settings of an item: the QL recipe's, or the benchmark's official ones (flags override both)."""
    mod = module(item.benchmark)
    settings = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p}
    if config.protocol == "official":
        settings.update(getattr(mod, "GENERATION", {}).get("official", {}))
        per_set = getattr(mod, "OFFICIAL_MAX_NEW_TOKENS", {}).get(item.record.get("dataset"))
        settings["max_new_tokens"] = per_set or settings["max_new_tokens"]
    return settings


def build_requests(items, config, tokenizer, overrides=None):
    """The requests of every (item, sample); MRCR items get their length bin (and those over
    ``mrcr_max_tokens`` are left out: returned as the count ``outside``)."""
    requests, outside = [], 0
    for item in items:
        messages = module(item.benchmark).messages(item.record, config.protocol)
        if tokenizer is None:
            prompt_tokens, truncated = 0, False
        else:
            messages, prompt_tokens, truncated = truncate_messages(
                messages, tokenizer, config.max_input_tokens, config.truncation
            )
        if item.benchmark == "mrcr" and tokenizer is not None:
            n_tokens = prompt_tokens + len(tokenizer.encode(item.record["answer"]))
            if n_tokens > config.mrcr_max_tokens:
                outside += 1
                continue
            b = mrcr.mrcr_bin(n_tokens)
            item.split["bin"] = "out-of-range" if b is None else mrcr.BIN_NAMES[b]
        settings = {**_generation(item, config), **(overrides or {})}
        over = 0 < config.max_input_tokens < prompt_tokens and not truncated  # a multi-turn prompt sent whole
        for sample in range(config.samples):
            seed = request_seed(config.seed, item.benchmark, item.id, sample)
            requests.append(Request(item, sample, seed, messages, prompt_tokens, truncated, over, **settings))
    return requests, outside


class EndpointBackend:
    """Generation through an OpenAI-compatible endpoint (:class:`qlx.openai_client.OpenAIClient`): streamed,
    ``concurrency`` requests in flight, per-request seeds."""

    def __init__(self, client, *, stream=True):
        self.client, self.stream = client, stream
        self.model_id = client.config.model

    def run(self, requests):
        """Yields (request, result dict or exception) as generations finish."""

        def one(request):
            done = self.client.complete(
                request.messages,
                temperature=request.temperature,
                top_p=request.top_p,
                max_tokens=request.max_new_tokens,
                seed=request.seed,
                stream=self.stream,
            )
            return {"response": done.text, "finish_reason": done.finish_reason, "usage": done.usage}

        for index, result in self.client.map(one, requests):
            yield requests[index], result


class LocalBackend:
    """Generation with an in-process qlx model (``qlx.rollout.generate_rows``), ``batch`` requests at a time; the
    chat template of ``chat_mode`` and the stop tokens of ``qlx serve``; text decoded as the server does."""

    def __init__(self, model, tokenizer, *, model_id, chat_mode="thinking", batch=8):
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.chat_mode, self.batch = chat_mode, batch
        self.stop_ids = tuple(
            i for i in (tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")) if i is not None
        )

    def run(self, requests):
        from qlx.rollout import SamplingSpec, generate_rows
        from qlx.rollout.protocol import finish_choice

        max_len = self.model.config.max_position_embeddings
        for start in range(0, len(requests), self.batch):
            chunk, prompts, specs = [], [], []
            for request in requests[start : start + self.batch]:
                ids = self.tokenizer.apply_chat_template(
                    request.messages, add_generation_prompt=True, mode=self.chat_mode
                )
                room = min(request.max_new_tokens, max_len - len(ids))
                if room < 1:
                    yield request, ValueError(f"prompt of {len(ids)} tokens leaves no room in the model's {max_len}")
                    continue
                chunk.append(request)
                prompts.append(ids)
                specs.append(SamplingSpec(room, request.temperature, request.top_p, 0, self.stop_ids, request.seed, 0))
            if not chunk:
                continue
            result = generate_rows(self.model, prompts, specs)
            for i, request in enumerate(chunk):
                n = int(result.lengths[i])
                tokens = result.tokens[i][:n].tolist()
                choice = finish_choice(tokens, [0.0] * n, result.finish_reasons[i], tokenizer=self.tokenizer)
                usage = {"prompt_tokens": len(prompts[i]), "completion_tokens": n, "total_tokens": len(prompts[i]) + n}
                yield request, {"response": choice.text, "finish_reason": choice.finish_reason, "usage": usage}


def scoring_record(record):
    """The record without its bulky fields (context, prompt, ...): what scoring needs, kept in each stored row so
    ``--rescore`` works without the data."""
    return {k: v for k, v in record.items() if k not in _BULKY}


def generate(requests, backend, store, *, protocol, progress=True):
    """Run the requests the store does not hold yet; returns (generated, failures as "key: error" strings)."""
    todo = [r for r in requests if r.key not in store.done]
    failures, generated = [], 0
    bar = tqdm(total=len(todo), desc="generate", unit="gen", disable=not progress)
    start = time.time()
    for request, result in backend.run(todo):
        bar.update(1)
        if isinstance(result, Exception):
            failures.append(f"{request.key}: {type(result).__name__}: {result}")
            log.warning("generation failed (kept out of the store; a rerun retries it): %s", failures[-1])
            continue
        item = request.item
        store.append(
            {
                "key": request.key,
                "benchmark": item.benchmark,
                "id": item.id,
                "sample": request.sample,
                "seed": request.seed,
                "protocol": protocol,
                "model": backend.model_id,
                "prompt_hash": prompt_hash(request.messages),
                "prompt_tokens": request.prompt_tokens,
                "truncated": request.truncated,
                "over_budget": request.over_budget,
                "generation": {
                    "max_new_tokens": request.max_new_tokens,
                    "temperature": request.temperature,
                    "top_p": request.top_p,
                },
                **result,
                "split": item.split,
                "record": scoring_record(item.record),
                "elapsed_s": round(time.time() - start, 3),
            }
        )
        generated += 1
    bar.close()
    return generated, failures


def score_rows(rows, *, judges=None, parser=None, progress=True):
    """Score stored generation rows (``judges``: {"eq": judge, "frames": judge} or None); returns score rows, in
    order (judge calls run on 8 threads)."""
    judges = judges or {}

    def one(row):
        benchmark, protocol = row["benchmark"], row["protocol"]
        prompt = "frames" if (benchmark, protocol) == ("frames", "official") else "eq"
        details = score_details(
            benchmark, row["response"], row["record"], protocol=protocol, judge=judges.get(prompt), parser=parser
        )
        extracted = details.extracted
        return {
            "key": row["key"],
            "benchmark": benchmark,
            "id": row["id"],
            "sample": row["sample"],
            "seed": row["seed"],
            "score": details.score,
            "extracted": extracted,
            "rule": details.rule,
            "judge": details.judge,
            "split": row["split"],
            "prompt_tokens": row["prompt_tokens"],
            "truncated": row["truncated"],
            "over_budget": row.get("over_budget", False),
            "empty": extracted is None or not str(extracted).strip(),
            "missing_think_end": THINK_CLOSE not in row["response"],
            "finish_reason": row.get("finish_reason"),
        }

    workers = 8 if judges else 1
    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(one, rows), total=len(rows), desc="score", unit="row", disable=not progress))


def write_scores(out, rows):
    write_atomic(Path(out) / "scores.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_generations(out):
    return read_rows(Path(out) / "generations.jsonl")
