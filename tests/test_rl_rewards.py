"""Reward verifiers: hand-written cases per function, the registry, and fuzzing for no-raise and bounded time."""

import contextlib
import difflib
import random
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qlx.rl import rewards as R

THINK = "<think>maybe the answer is Rome, or B</think>\n\n"


def test_extract_answer_cases():
    assert R.extract_answer(THINK + "So, the answer is Paris.") == "Paris."
    assert R.extract_answer("Therefore, The Answer Is: **42**\nbecause ...") == "42"
    assert R.extract_answer("x the answer is 1. Later: the correct answer is (C).") == "(C)."
    assert R.extract_answer("we get \\boxed{\\frac{1}{2}} so") == "\\frac{1}{2}"
    assert R.extract_answer("The answer is \\boxed{7} and not \\boxed{8}") == "8"
    assert R.extract_answer("plain reply") == "plain reply"
    assert R.extract_answer("<think>the answer is Rome</think>") == ""
    assert R.last_boxed("\\boxed{unclosed") is None
    assert R.strip_thinking("a</think>b</think>c") == "c"


def test_normalisation_and_string_matches():
    assert R.normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert R.exact_match("the Paris.", "paris") == 1.0
    assert R.exact_match("Paris, France", "paris") == 0.0
    assert R.sub_exact_match("Paris, France", "paris") == 1.0
    assert R.sub_exact_match("Paris", "Paris, France") == 1.0  # containment either way
    assert R.cover_exact_match("Paris", "Paris, France") == 0.0  # the gold must be covered
    assert R.cover_exact_match("It is Paris, France.", "paris france") == 1.0
    assert R.sub_exact_match("", "paris") == 0.0 and R.sub_exact_match("the", "a") == 0.0  # empty never matches
    assert R.token_f1("the cat sat on mat", "a cat sat") == pytest.approx(2 * (2 / 4) * 1.0 / (2 / 4 + 1.0))
    assert R.token_f1("dog", "cat") == 0.0


def test_multiple_choice_letters():
    assert R.mc_letter_match(THINK + "The correct answer is (C).", "C") == 1.0
    assert R.mc_letter_match("The correct answer is (C).", "(B)") == 0.0
    assert R.mc_letter_match("the answer is **D**", "d") == 1.0
    assert R.mc_letter_match("B", "B) Paris") == 1.0
    assert R.mc_letter_match("I cannot tell", "A") == 0.0
    assert R.choice_letter("I think B") is None


def test_numbers_with_separators_percents_and_units():
    assert R.parse_number("about $1,234,567.5 USD") == {1234567.5}
    assert R.parse_number("12.5%") == {12.5, 0.125}
    assert R.parse_number("−3 degrees") == {-3.0}
    assert R.parse_number("1.2 million") == {1.2, 1.2e6}
    assert R.parse_number("no digits") is None
    assert R.numeric_match("12.5%", "0.125") == 1.0
    assert R.numeric_match("1,200", "1200.0") == 1.0
    assert R.numeric_match("1.2 million people", "1,200,000") == 1.0
    assert R.numeric_match("101", "100") == 1.0 and R.numeric_match("102", "100") == 0.0  # 1% tolerance
    assert R.numeric_match("102", "100", rel_tol=0.05) == 1.0
    assert R.numeric_match("0", "0.0") == 1.0 and R.numeric_match("0.001", "0") == 0.0


def test_mrcr_sequence_ratio_with_prefix():
    gold = "aZ9x The quick brown fox jumps."
    resp = THINK + "aZ9x The quick brown fox jumped."
    want = difflib.SequenceMatcher(None, " The quick brown fox jumped.", " The quick brown fox jumps.").ratio()
    assert R.sequence_ratio(resp, gold, prefix="aZ9x") == pytest.approx(want)
    assert R.sequence_ratio("The quick brown fox jumps.", gold, prefix="aZ9x") == 0.0  # prefix missing
    assert R.sequence_ratio("aZ9x", "aZ9x", prefix="aZ9x") == 1.0
    long = "aZ9x" + "The quick brown fox jumps. " * 400
    exact = difflib.SequenceMatcher(None, long[4:], gold[4:]).ratio()
    assert R.sequence_ratio(long, gold, prefix="aZ9x") <= exact + 1e-12  # truncated matching is a lower bound


def test_numerical_verifier_numbers_and_entity_answers():
    # numeric golds compare numbers (tolerance, separators, scale words); a table question's entity answer (arg-max)
    # or ranking is not a number (nor is a name with digits in it, "Pell Z84"): those compare as sub-EM
    assert [R.is_number_answer(t) for t in ("-303501", "1,234.5", "12 %", "3 million", "Pell Z84", "A, B")] == [
        True, True, True, True, False, False]  # fmt: skip
    assert R.reward("numerical", "Therefore, the answer is 3 million.", "3,000,000") == 1.0
    assert R.reward("numerical", "Therefore, the answer is 1010.", "1000") == 1.0
    assert R.reward("numerical", "Therefore, the answer is 1030.", "1000") == 0.0
    assert R.reward("numerical", "Therefore, the answer is Shouhai Maritime.", "Shouhai Maritime") == 1.0
    assert R.reward("numerical", "Therefore, the answer is Shivigai Foods.", "Shouhai Maritime") == 0.0


def test_registry_task_types_and_registration():
    assert set(R.VERIFIERS) >= {"mc", "multihop", "reading", "dialogue", "numerical"}
    assert R.reward("mc", THINK + "The correct answer is (A)", "A") == 1.0
    assert R.reward("multihop", THINK + "Therefore, the answer is Marie Curie.", ["Curie", "M. Curie"]) == 1.0
    assert R.reward("reading", "Therefore, the answer is London.", "Paris") == 0.0
    assert R.reward("numerical", "Therefore, the answer is 3,000.", "3000") == 1.0
    assert R.reward("dialogue", "k1 hello there", "k1 hello there", prefix="k1") == 1.0
    with pytest.raises(KeyError, match="no verifier for task type 'niah'"):
        R.reward("niah", "x", "y")
    R.register_verifier("test_niah", lambda response, gold: R.cover_exact_match(response, gold))
    try:
        assert R.reward("test_niah", "the needle is 7421", "7421") == 1.0
        with pytest.raises(ValueError, match="already has a verifier"):
            R.register_verifier("test_niah", R.exact_match)
    finally:
        del R.VERIFIERS["test_niah"]
    with pytest.raises(TypeError, match="gold answers must be strings"):
        R.reward("reading", "x", [None])
    with pytest.raises(TypeError, match="prefix"):
        R.reward("reading", "x", "y", prefix="z")  # options a verifier does not take are not dropped


_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
_TRICKY = st.text(alphabet="0123456789,.%-−+ {}\\boxed()ABCthe answer is</think>\n", max_size=300)


@settings(max_examples=150, deadline=None)
@given(response=st.one_of(_TEXT, _TRICKY), gold=st.one_of(_TEXT, _TRICKY))
def test_fuzz_no_verifier_raises_and_scores_lie_in_unit_interval(response, gold):
    for task in ("mc", "multihop", "reading", "numerical", "dialogue"):
        score = R.rule_reward(task, response, gold)
        assert 0.0 <= score <= 1.0
    for fn in (R.exact_match, R.sub_exact_match, R.cover_exact_match, R.token_f1):
        assert 0.0 <= fn(response, gold) <= 1.0
    assert 0.0 <= R.sequence_ratio(response, gold, prefix=gold[:3]) <= 1.0


@pytest.mark.parametrize(
    "response",
    [
        "1," * 500_000,
        "9" * 1_000_000,
        "the answer is " * 70_000,
        "\\boxed{" * 140_000,
        "(" * 1_000_000,
        "ab" * 500_000,
        "</think>" * 125_000 + "a",
    ],
    ids=["commas", "digits", "phrases", "boxes", "parens", "ab", "thinks"],
)
def test_one_megabyte_responses_score_in_bounded_time(response):
    gold = "ab" * 90 + " 123"
    start = time.perf_counter()
    for task in ("mc", "multihop", "reading", "numerical", "dialogue"):
        assert 0.0 <= R.rule_reward(task, response, gold) <= 1.0
    assert time.perf_counter() - start < 10.0  # a generous bound on a loaded 2-core machine; typically < 1 s


# Adversarial shapes for backtracking regexes and quadratic matchers: one short piece repeated to 30K-100K
# characters between a short head and tail ("1" + 30,000 spaces + "x" made the numerical gold check take ~2 s).
_PIECES = [" ", "1", "1 ", "1,", "1.", ",", ".", "-", "1..", "\n", "\t ", "the answer is ", "\\boxed{", "```json"]
_PIECES += ["|---", "</think>", "(", "{", "A) ", "12 %", "k"]
_HEADS = st.sampled_from(["", "1", "the answer is 5", "```", "|", "-", "aZ9x"])
_TAILS = st.sampled_from(["", "x", "1", "%", "```", "}", "|x"])
_CALL_BOUND_S = 1.0  # linear work on 100K characters: <= 0.2 s even at load 18; the quadratic cases took 2-20 s


@st.composite
def _adversarial_text(draw):
    piece = draw(st.sampled_from(_PIECES) | st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=4))
    size = draw(st.integers(30_000, 100_000))
    return draw(_HEADS) + piece * (size // len(piece)) + draw(_TAILS)


@settings(max_examples=30, deadline=None)
@given(text=_adversarial_text(), short=st.one_of(_TRICKY, st.just("the answer is 5")))
@example(text="1" + " " * 30_000 + "x", short="the answer is 5")  # the case
@example(text="```json" + "\n" * 30_000 + "{", short="")
@example(text=" " * 30_000 + "x", short="")
def test_property_every_reward_is_bounded_on_adversarial_gold_and_response(text, short):
    """Each verifier, with the long adversarial text as the gold and as the response, returns in bounded time."""
    from qlx.data.llm import parse_json_reply
    from qlx.data.prompts import extract_final_answer
    from qlx.data.tables import parse_markdown_tables

    sides = {"gold": (short, text), "response": (text, short), "both": (text, text[::-1])}
    calls = [
        (f"{task} {side}", lambda t=task, a=args: R.rule_reward(t, *a))
        for task in ("mc", "multihop", "reading", "numerical", "dialogue")
        for side, args in sides.items()
    ]
    calls += [
        ("extract_final_answer", lambda: extract_final_answer(text)),
        ("parse_markdown_tables", lambda: parse_markdown_tables("| a |\n" + text)),
    ]
    for name, call in calls:
        start = time.perf_counter()
        call()
        assert time.perf_counter() - start < _CALL_BOUND_S, name
    start = time.perf_counter()
    with contextlib.suppress(ValueError):
        parse_json_reply(text)
    assert time.perf_counter() - start < _CALL_BOUND_S, "parse_json_reply"


def test_dialogue_ratio_is_exact_within_max_chars_and_one_for_equal_long_strings():
    rng = random.Random(0)
    gold = "".join(rng.choice("abcdefgh ") for _ in range(3000))
    response = gold[:1000] + "zz" + gold[1200:]
    want = difflib.SequenceMatcher(None, response, gold).ratio()
    assert R.sequence_ratio(response, gold) == pytest.approx(want)
    long_gold = "".join(chr(0x4E00 + rng.randrange(101)) for _ in range(50_000))
    assert R.sequence_ratio(long_gold, long_gold) == 1.0
    assert 0.0 < R.sequence_ratio(long_gold[:-1], long_gold) < 1.0


def test_number_answer_and_json_fences_unchanged_by_the_linear_rewrite():
    assert R.is_number_answer("  12.5 % ") and R.is_number_answer("3 Million") and R.is_number_answer("-1,000")
    assert (
        not R.is_number_answer("1" + " " * 100 + "x") and not R.is_number_answer("1 2") and not R.is_number_answer("")
    )
    from qlx.data.llm import parse_json_reply

    assert parse_json_reply('ok ```json\n{"a": 1}\n``` done') == {"a": 1}
    assert parse_json_reply("```\n[1, 2]```") == [1, 2]
    assert parse_json_reply('prose {"b": [2]} more') == {"b": [2]}
