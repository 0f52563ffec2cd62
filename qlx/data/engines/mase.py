"""Engine (c): proposer–solver–verifier self-evolution over a document cluster (MASE, after SPELL).

Per round: the proposer sees the documents and the history buffer of questions already validated for this cluster
and writes a harder, different question with its answer (JSON); the solver answers it from the documents with the
single-pass QA prompt; the verifier judges whether the solver's answer and the proposed one agree ([[YES]]/[[NO]];
numbers within a relative tolerance agree without asking). Validated pairs join the history and become records.
Every rejected round is reported with its reason.
"""

import dataclasses

from qlx.data.llm import ChatClient, parse_json_reply
from qlx.data.prompts import extract_final_answer, user_prompt
from qlx.data.tables import parse_number

PROPOSER_SYSTEM = (
    "You write reading-comprehension questions about documents. Reply with JSON only: "
    '{"question": "...", "answer": "..."}. The question must need the documents to be answered, and the answer '
    "must be short (an entity, a number, a date or a short phrase) and follow from the documents."
)
VERIFIER_SYSTEM = (
    "You are an expert in verifying if two answers to the same problem are the same. Decide whether they are "
    "equivalent without solving the problem yourself. Give a one-sentence explanation, then [[YES]] or [[NO]]."
)


@dataclasses.dataclass(frozen=True)
class ValidatedQA:
    question: str
    answer: str
    solver_answer: str
    round: int


def _normalise(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def numbers_agree(a: str, b: str, rel_tol: float = 0.0015) -> bool:
    """Both parse as numbers and agree within ``rel_tol`` (SPELL's ±0.15%)."""
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and abs(x - y) <= rel_tol * max(abs(x), abs(y), 1e-12)


class MaseEngine:
    def __init__(self, client: ChatClient, *, rounds: int = 3, temperature: float = 0.7, max_tokens: int = 1024):
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.client, self.rounds, self.temperature, self.max_tokens = client, rounds, temperature, max_tokens

    def _propose(self, documents: str, history: list[ValidatedQA], seed: int) -> tuple[str, str]:
        user = f"Documents:\n\n{documents}\n\n"
        if history:
            done = "\n".join(f"- {h.question} (answer: {h.answer})" for h in history)
            user += f"Questions already asked about these documents:\n{done}\n\n"
            user += "Write a harder question, different from these.\n"
        else:
            user += "Write one question.\n"
        reply = self.client.chat(
            [{"role": "system", "content": PROPOSER_SYSTEM}, {"role": "user", "content": user}],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=seed,
        )
        proposal = parse_json_reply(reply)
        if not isinstance(proposal, dict):
            raise ValueError("proposal is not a JSON object")
        question, answer = proposal.get("question"), proposal.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("proposal has no question string")
        if isinstance(answer, int | float):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError("proposal has no answer string")
        return question.strip(), answer.strip()

    def _verify(self, question: str, predicted: str, gold: str) -> bool:
        if numbers_agree(predicted, gold) or _normalise(predicted) == _normalise(gold):
            return True
        reply = self.client.chat(
            [
                {"role": "system", "content": VERIFIER_SYSTEM},
                {"role": "user", "content": f"Problem: {question}\nAnswer 1: {predicted}\nAnswer 2: {gold}"},
            ],
            max_tokens=self.max_tokens,
        )
        return "[[YES]]" in reply or reply.strip().upper().startswith("YES")

    def run(self, documents: str, *, seed: int = 0) -> tuple[list[ValidatedQA], list[str]]:
        """Validated pairs for one cluster (its documents joined as text), and the reasons rounds were rejected."""
        history: list[ValidatedQA] = []
        problems: list[str] = []
        for r in range(self.rounds):
            try:
                question, answer = self._propose(documents, history, seed * 1000 + r)
            except ValueError as e:
                problems.append(f"round {r}: unusable proposal ({e})")
                continue
            if any(_normalise(question) == _normalise(h.question) for h in history):
                problems.append(f"round {r}: proposal repeats an earlier question")
                continue
            solved = self.client.chat(
                [{"role": "user", "content": user_prompt(question, documents)}], max_tokens=self.max_tokens
            )
            predicted = extract_final_answer(solved)
            if predicted is None:
                problems.append(f"round {r}: solver gave no 'the answer is ...'")
                continue
            if not self._verify(question, predicted, answer):
                problems.append(f"round {r}: verifier rejected solver answer {predicted!r} for {answer!r}")
                continue
            history.append(ValidatedQA(question, answer, predicted, r))
        return history, problems
