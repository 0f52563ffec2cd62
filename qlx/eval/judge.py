"""LLM judges (docs/eval-rules.md §1.5): the equivalence prompt (J-EQ), the Frames autorater prompt (J-FRAMES), the
reply parsers P1/P2/P3/frames, and :class:`Judge`, a callable ``judge(problem, prediction, gold) -> reply text`` on
any OpenAI-compatible endpoint at temperature 0, cached by (prompt, model) in a JSONL file."""

import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path

from qlx.eval.text import strip_reasoning, substitute
from qlx.openai_client import LLMError, OpenAIClient

log = logging.getLogger(__name__)

EQ_SYSTEM = (
    "You are an expert in verifying if two answers are the same. Your input is a problem and two answers, Answer 1 "
    "and Answer 2. You need to check if they are equivalent. Your task is to determine if two answers are "
    "equivalent, without attempting to solve the original problem. Compare the answers to verify they represent "
    "identical values or meaning, even when written in different forms or notations. Your output must follow the "
    "following format:\n1) Provide an explanation for why the answers are equivalent or not.\n2) Then provide your "
    "final answer in the form of: [[YES]] or [[NO]]"
)
EQ_USER = "\nProblem: {problem}\nAnswer 1: {prediction}\nAnswer 2: {gold}"

FRAMES_SYSTEM = "You are a helpful assistant."
FRAMES_USER = """===Task===
I need your help in evaluating an answer provided by an LLM against a ground truth answer. Your task is to determine \
if the ground truth answer is present in the LLM's response. Please analyze the provided data and make a decision.
===Instructions===
1. Carefully compare the "Predicted Answer" with the "Ground Truth Answer".
2. Consider the substance of the answers - look for equivalent information or correct answers. Do not focus on \
exact wording unless the exact wording is crucial to the meaning.
3. Your final decision should be based on whether the meaning and the vital facts of the "Ground Truth Answer" are \
present in the "Predicted Answer:"
===Input Data===
- Question: {problem}
- Predicted Answer: {prediction}
- Ground Truth Answer: {gold}
===Output Format===
Provide your final evaluation in the following format:
"Explanation:" (How you made the decision?)
"Decision:" ("TRUE" or "FALSE" )
Please proceed with the evaluation."""

PROMPTS = {"eq": (EQ_SYSTEM, EQ_USER), "frames": (FRAMES_SYSTEM, FRAMES_USER)}
_DECISION = re.compile(r"Decision\W{0,8}(TRUE|FALSE)", re.IGNORECASE)


def judge_messages(prompt, problem, prediction, gold):
    """The chat messages of judge prompt "eq" (J-EQ: system + "Problem / Answer 1 / Answer 2") or "frames"
    (J-FRAMES); ``prediction`` None is sent as the string "None" (SPELL)."""
    if prompt not in PROMPTS:
        raise ValueError(f"judge prompt must be one of {sorted(PROMPTS)}, got {prompt!r}")
    system, user = PROMPTS[prompt]
    values = {"{problem}": str(problem), "{prediction}": str(prediction), "{gold}": str(gold)}
    return [{"role": "system", "content": system}, {"role": "user", "content": substitute(user, values)}]


def parse_judge_reply(reply, parser="p3"):
    """1.0 / 0.0 from a judge reply (§1.5); an empty or None reply is 0 under every parser.

    p1 (QwenLong-L1): "YES" occurs anywhere. p2 (SPELL): after the SPELL reasoning strip, "YES" occurs and "NO" does
    not ("NOTE", "NONE", "NOT" veto). p3 (CorpusQA): "[[YES]]" occurs and "[[NO]]" does not. frames: the last
    "Decision:" field says TRUE (case-insensitive).
    """
    if not reply:
        return 0.0
    if parser == "p1":
        return float("YES" in reply)
    if parser == "p2":
        text = strip_reasoning(reply, "spell", "qa")
        return float("YES" in text and "NO" not in text)
    if parser == "p3":
        return float("[[YES]]" in reply and "[[NO]]" not in reply)
    if parser == "frames":
        decisions = _DECISION.findall(reply)
        return float(bool(decisions) and decisions[-1].upper() == "TRUE")
    raise ValueError(f"parser must be 'p1', 'p2', 'p3' or 'frames', got {parser!r}")


class JudgeCache:
    """Replies keyed by sha256 of (model, messages), kept in memory and appended (flushed) to ``path`` as JSONL, so a
    rerun or ``--rescore`` never asks the same question twice. A torn last line (a killed writer) is dropped."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._replies = {}
        if self.path.exists():
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    row = json.loads(line)
                    self._replies[row["key"]] = row["reply"]
                except (ValueError, KeyError, TypeError):
                    log.warning("%s:%d: unreadable judge-cache line skipped (it will be asked again)", self.path, n)

    @staticmethod
    def key(model, messages):
        return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode()).hexdigest()

    def get(self, key):
        with self._lock:
            return self._replies.get(key)

    def put(self, key, reply):
        with self._lock:
            self._replies[key] = reply
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "reply": reply}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def __len__(self):
        return len(self._replies)


class Judge:
    """``Judge(client, prompt="eq")(problem, prediction, gold)`` → the judge's reply text, asked at temperature 0
    (``prompt``: "eq" or "frames"). An endpoint failure returns "" (scored 0 by every parser, as in the released
    code) and is not cached, so a later ``--rescore`` asks again; ``failures`` counts them."""

    def __init__(self, client: OpenAIClient, *, prompt="eq", cache: JudgeCache | None = None, max_tokens=1024):
        if prompt not in PROMPTS:
            raise ValueError(f"judge prompt must be one of {sorted(PROMPTS)}, got {prompt!r}")
        self.client, self.prompt, self.cache, self.max_tokens = client, prompt, cache, max_tokens
        self.failures = 0
        self._locks, self._guard = {}, threading.Lock()

    def __call__(self, problem, prediction, gold):
        messages = judge_messages(self.prompt, problem, prediction, gold)
        key = JudgeCache.key(self.client.config.model, messages)
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one request per distinct prompt, even from concurrent callers
            if self.cache is not None and (hit := self.cache.get(key)) is not None:
                return hit
            try:
                reply = self.client.chat(messages, temperature=0.0, max_tokens=self.max_tokens)
            except LLMError as error:
                with self._guard:
                    self.failures += 1
                log.warning("judge failed (%s); the item scores 0 from the judge", error)
                return ""
            if self.cache is not None:
                self.cache.put(key, reply)
            return reply
