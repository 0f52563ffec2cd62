"""qlx.eval's pure functions against cases built by hand from docs/eval-rules.md (every edge case it names)."""

import ast
import difflib
import math
from pathlib import Path

import numpy as np
import pytest

import qlx.eval as E
from qlx.eval import docmath, qa
from qlx.eval.stats import bootstrap_mean
from qlx.eval.text import substitute

# ---- §1 cross-cutting rules ----


def test_middle_truncate_both_styles():
    ids = list(range(10))
    assert E.middle_truncate(ids, 5) == [0, 1, 7, 8, 9]
    assert E.middle_truncate(ids, 6) == [0, 1, 2, 7, 8, 9]
    assert E.middle_truncate(ids, 5, "longbench_v1") == [0, 1, 8, 9]
    assert E.middle_truncate(ids, 10) == ids and E.middle_truncate(ids, 99, "longbench_v1") == ids
    assert E.middle_truncate(ids, 1) == [9] and E.middle_truncate(ids, 1, "longbench_v1") == []
    for budget in range(11):  # the v2 rule keeps exactly L ids, v1 keeps 2·floor(L/2)
        assert len(E.middle_truncate(ids, budget)) == budget
        assert len(E.middle_truncate(ids, budget, "longbench_v1")) == 2 * (budget // 2)
    with pytest.raises(ValueError, match="style"):
        E.middle_truncate(ids, 3, "spell")


def test_strip_reasoning_spell_and_qwenlong():
    s = E.strip_reasoning
    assert s("<think>long thought", "spell", "qa") == "Empty"  # unterminated <think>
    assert s("<think>a</think>x</think>  Paris ", "spell", "qa") == "Paris"  # after the LAST </think>, stripped
    assert s("thinking...</think> B ", "spell", "mc") == " B "  # no <think>: after </think>, not stripped
    assert s("so the answer is B", "spell", "mc") == "so the answer is B"
    tail = "x" * 2000
    assert s(tail, "spell", "mc") == "x" * 300 and s(tail, "spell", "qa") == "x" * 1000
    assert s(tail, "spell", "docmath") == "x" * 300
    boxed = "y" * 500 + "\\boxed{3}"
    assert s(boxed, "spell", "docmath") == boxed and s(boxed, "spell", "mc") == boxed[-300:]
    assert s("no tags at all", "qwenlong_l1") == "no tags at all"
    assert s("r</think>\n\nPrefix answer\n", "qwenlong_l1") == "Prefix answer"


def test_normaliser_is_ascii_squad():
    n = E.normalize_answer
    assert n("Jean-Paul") == "jeanpaul" and n("3.5") == "35" and n("1,000") == "1000"
    assert n("Tom & Jerry") == "tom jerry" and n("The  Eiffel, a tower!") == "eiffel tower"
    assert n("O’Neill") != n("O'Neill") and n("O’Neill") == "o’neill"  # non-ASCII punctuation survives
    assert n("théâtre – ") == "théâtre –"


def test_cem_strict_and_loose():
    assert E.cem("100", "10") == 1.0 and E.cem("Smart", "art") == 1.0 and E.cem("12.345%", "12.34%") == 1.0
    assert E.cem("Paris", "Paris, France") == 0.0 and E.cem("Paris", "Paris, France", strict=False) == 1.0
    assert E.cem("the", "Paris") == 0.0 and E.cem("the", "Paris", strict=False) == 1.0  # "" ⊆ anything
    assert E.cem("anything", "[]") == 0.0  # N("[]") = "": the strict guard
    assert E.cem(None, "x") == 0.0


def test_token_f1_variants():
    assert E.token_f1("yes it is", "yes") == pytest.approx(0.5)
    assert E.token_f1("yes it is", "yes", "qwenlong_l1") == 0.0
    assert E.token_f1("no", "no", "qwenlong_l1") == 1.0
    assert E.token_f1("", "") == 0.0 and E.token_f1("the", "a") == 0.0  # empty after normalising
    assert E.token_f1("cat cat dog", "cat dog") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # duplicates
    assert E.token_f1("dog cat", "cat dog") == 1.0  # bag of words


def test_one_pass_substitution_never_resubstitutes():
    template = "<text>$DOC$</text> Q: $Q$"
    out = substitute(template, {"$DOC$": "a doc quoting $Q$ literally", "$Q$": "why?"})
    assert out == "<text>a doc quoting $Q$ literally</text> Q: why?"
    naive = template.replace("$DOC$", "a doc quoting $Q$ literally").replace("$Q$", "why?")
    assert naive != out  # the upstream sequential replace corrupts it


# ---- §1.5 judge replies ----


def test_judge_reply_parsers():
    p = E.parse_judge_reply
    assert p("... [[YES]]", "p1") == 1.0 and p("NOT YES", "p1") == 1.0
    assert p("[[YES]]", "p2") == 1.0 and p("YES but NOTE this", "p2") == 0.0 and p("YES, NONE", "p2") == 0.0
    assert p("<think>NO wait</think>[[YES]]", "p2") == 1.0  # the SPELL strip runs first
    assert p("[[YES]]", "p3") == 1.0 and p("[[YES]] [[NO]]", "p3") == 0.0 and p("YES", "p3") == 0.0
    assert p('Explanation: fine.\nDecision: "TRUE"', "frames") == 1.0
    assert p("Decision: FALSE", "frames") == 0.0 and p("TRUE", "frames") == 0.0
    for parser in ("p1", "p2", "p3", "frames"):
        assert p("", parser) == 0.0 and p(None, parser) == 0.0
    msgs = E.judge_messages("eq", "Q?", None, "4")
    assert msgs[0]["role"] == "system" and "[[YES]] or [[NO]]" in msgs[0]["content"]
    assert msgs[1]["content"] == "\nProblem: Q?\nAnswer 1: None\nAnswer 2: 4"
    assert "===Task===" in E.judge_messages("frames", "Q", "P", "G")[1]["content"]


# ---- §2 LongBench-V2 ----

LB2 = {"answer": "B"}


def test_longbench_v2_official_extraction():
    x = lambda r: E.extract_answer("longbench_v2", r, "official")  # noqa: E731
    assert x("The correct answer is (C). Later: The correct answer is (B)") == "C"  # first match
    assert x("**The correct answer is (A)**") == "A"
    assert x("The correct answer is Both") == "B"  # no word boundary
    assert x("the correct answer is (A)") is None  # case-sensitive
    assert x("<think>The correct answer is (A)</think>The correct answer is (D)") == "D"  # stripped first
    assert E.score("longbench_v2", "The correct answer is (B)", LB2, protocol="official") == 1.0
    assert E.score("longbench_v2", "", LB2, protocol="official") == 0.0


def test_longbench_v2_spell_extraction():
    x = lambda r: E.extract_answer("longbench_v2", r, "ql")  # noqa: E731
    assert x("The correct answer is (B), so the answer is (C)") == "B"  # pattern priority beats position
    assert x("answer is (A) ... answer is (D)") == "D"  # last match of the winning pattern
    assert x("\\boxed{C} but the correct answer is (A)") == "C"
    assert x("the correct answer is (b)") is None  # lower case: None, later patterns not tried
    assert x("<think>The correct answer is (A)") is None  # unterminated think: "Empty"
    assert x("</think>The CORRECT ANSWER IS (D)") == "D"
    assert E.score("longbench_v2", "</think>The correct answer is (B).", LB2) == 1.0
    assert E.score("longbench_v2", "</think>The correct answer is (A).", LB2) == 0.0


# ---- §3 MRCR ----


def test_mrcr_grader_exact():
    rec = {"answer": "PFX" + "a poem about tapirs", "random_string_to_prepend": "PFX"}
    assert E.score("mrcr", "PFXa poem about tapirs", rec) == 1.0
    assert E.score("mrcr", " PFXa poem about tapirs", rec) == 0.0  # leading whitespace
    assert E.score("mrcr", "pfxa poem about tapirs", rec) == 0.0  # case-sensitive
    assert E.score("mrcr", "PFX", rec) == 0.0  # prefix only
    assert E.score("mrcr", "PFX", {"answer": "PFX", "random_string_to_prepend": "PFX"}) == 1.0  # both empty
    doubled = E.score("mrcr", "PFXPFXa poem about tapirs", rec)
    assert doubled == pytest.approx(difflib.SequenceMatcher(None, "PFXa poem about tapirs", rec["answer"][3:]).ratio())
    assert 0 < E.score("mrcr", "PFXa poem about tapirs. Hope it helps!", rec) < 1  # chatter lowers, not zeroes
    assert E.score("mrcr", "<think>hm</think>\nPFXa poem about tapirs", rec) == 1.0  # reasoning stripped first
    a, b = "a  a cbacaaaa b ab  ", "aca    ba"
    order = {"answer": "P" + b, "random_string_to_prepend": "P"}
    assert E.score("mrcr", "P" + a, order) == pytest.approx(0.4138, abs=1e-4)  # response first, answer second
    long_answer = "P" + "".join("abcdefghij"[i * 7 % 10] for i in range(400))
    rec_long = {"answer": long_answer, "random_string_to_prepend": "P"}
    got = E.score("mrcr", "P" + long_answer[1:][::-1], rec_long)
    assert got == pytest.approx(difflib.SequenceMatcher(None, long_answer[1:][::-1], long_answer[1:]).ratio())


def test_mrcr_bins_card_and_openbench():
    assert [E.mrcr_bin(n) for n in (4096, 8192, 8193, 131072, 131073, 1048576)] == [0, 0, 1, 4, 5, 7]
    assert E.mrcr_bin(4095) is None and E.mrcr_bin(1048577) is None
    assert [E.mrcr_bin(n, "openbench") for n in (4096, 8192, 131072, 1048576, 100)] == [0, 1, 5, 7, 0]


# ---- §4 DocMath ----


def test_docmath_extraction_rules():
    x = lambda r: E.extract_answer("docmath", r, "ql")  # noqa: E731
    assert x("Therefore, the answer is $-1,200.") == "$-1200"
    assert x("Therefore, the answer is -$1,200") is None
    assert x("the answer is: 42") is None
    assert x("the answer is 1.2e5") == "1.2" and x("the answer is 1/3") == "1" and x("the answer is 12.5%") == "12.5"
    assert x("The answer is (7). so the answer is 9") == "7"  # pattern priority
    assert x("answer is 1 then answer is 2") == "2"
    assert x("</think>\\boxed{1,234.5}. the answer is 3") == "1234.5"
    assert x("</think>\\boxed{12") is None  # unbalanced box


def test_docmath_normalise_safe_parser():
    n = docmath.normalize
    assert n("5 USD") == 5  # US is deleted before USD: "5 D", then the unit rule
    assert n("x = 3.5") == 3.5 and n("≈ 2") == 2 and n("approximately 7 or 8") == 7
    assert n("1,234,567.5") == 1234567.5 and n("10^3") == 1000 and n("2 x 3") == 6
    assert n("yes") is True and n("It is False") is False
    assert n("(b)") == "(b)" and n("(b) 12") == 12 and n("") == 0 and n("", "spell") == 999999999
    assert n("1, 2") == [1, 2] and n("2**-1") == 0.5 and n("pow(2,10)") == 1024 and n("-2**2") == -4
    assert n("__import__('os')") == 0 and n("1/0") == 0 and n("9**9**9") == 0  # never eval; bounded
    assert n("007") == 0  # a syntax error in Python
    assert n("1e-05") == 1e-05


def test_docmath_match_variants():
    m = E.docmath_match
    assert m("-12.5", 12.5) == 1.0  # sign ignored
    assert m("12.5", 0.125) == 1.0 and m("0.125", 12.5) == 1.0  # percent <-> fraction
    assert m("5", 5000) == 1.0 and m("5", 5000, "spell") == 1.0  # thousand slip
    assert m("5", 5.001e6) == 0.0 and m("5", 5.001e6, "spell") == 1.0  # million: SPELL's scale set only
    assert m("50", 5) == 1.0 and m("50", 5, "spell") == 0.0  # any power of ten (official)
    assert m("0.0004", 0.0009) == 1.0 and m("0", 0.0009) == 0.0  # positive values below 0.001 tie (ceil_3)
    assert m("1.239", 1.2345, "qwenlong_l1") == 1.0 and m("1.239", 1.2345) == 0.0  # ceil_2 vs ceil_3
    assert m("100.1", 100) == 1.0 and m("100.2", 100) == 0.0  # 0.15% tolerance
    assert m("True", True) == 1.0 and m("yes", False) == 0.0
    assert m("1, 2", 1) == 0.0 and m("(a)", 1) == 0.0 and m("abc", 0) == 1.0  # official: unparsable -> 0
    assert m("abc", "0", "spell") == 0.0  # SPELL's failure value 999999999 does not match 0
    assert m("1e-05", "1e-05", "qwenlong_l1") == 1.0  # the gold is not mangled through the extractor


def test_docmath_score_protocols():
    rec = {"question": "Growth?", "ground_truth": 12.5}
    assert E.score("docmath", "</think>Therefore, the answer is 12.5%.", rec) == 1.0
    assert E.score("docmath", "</think>no number here", rec, protocol="official") == 0.0
    asked = []

    def judge(problem, pred, gold):
        asked.append((problem, pred, gold))
        return "[[YES]]"

    assert E.score("docmath", "</think>Therefore, the answer is 99.", rec, judge=judge) == 1.0
    assert E.score("docmath", "</think>nothing", rec, judge=judge) == 1.0
    assert asked == [("Growth?", "99", "12.5"), ("Growth?", "None", "12.5")]
    assert E.score("docmath", "</think>Therefore, the answer is 12.5.", rec, judge=judge) == 1.0
    assert len(asked) == 2, "rule = 1 never calls the judge"


# ---- §5 Frames, §6 CorpusQA, §7 LongBench v1 ----


def test_spell_qa_extractor():
    x = qa.spell_extract
    assert x("</think>The correct answer is Paris.\nMore text") == "Paris"  # first line, dots stripped
    assert x("</think>the answer is Lyon. Also the correct answer is Paris") == "Lyon. Also the correct answer is Paris"
    assert x("</think>the answer is Lyon, no: the answer is Paris.") == "Paris"  # the cue's last occurrence
    assert x("</think>correct answer is Rome.\nThe answer is Oslo") == "Rome"  # cue order beats position
    assert x("</think>The answer is (insert answer here).") is None  # placeholder echo
    assert x("<think>the answer is Paris") is None  # unterminated think
    assert x("</think>**Therefore, the answer is Rome**<｜end▁of▁sentence｜>") == "Rome"
    assert x("</think>Paris") is None  # no cue


def test_frames_protocols():
    rec = {"Prompt": "Capital of France?", "Answer": "Paris"}
    assert E.score("frames", "</think>The correct answer is Paris.", rec) == 1.0
    assert E.score("frames", "</think>The correct answer is (insert answer here).", rec) == 0.0
    seen = []

    def judge(problem, pred, gold):
        seen.append(pred)
        return 'Explanation: same.\nDecision: "TRUE"'

    assert E.score("frames", "</think>I think it is Paris, France.", rec, protocol="official", judge=judge) == 1.0
    assert seen == ["I think it is Paris, France."]  # the whole stripped response
    with pytest.raises(ValueError, match="judge"):
        E.score("frames", "x", rec, protocol="official")
    d = E.score_details("frames", "</think>The correct answer is Lyon.", rec, judge=lambda *a: "[[NO]]")
    assert (d.score, d.rule, d.judge, d.extracted) == (0.0, 0.0, 0.0, "Lyon")


def test_corpusqa_protocols():
    rec = {"question": "Which firms?", "answer": "[]"}
    x = lambda r, p="official": E.extract_answer("corpusqa", r, p)  # noqa: E731
    assert x("blah\nThe answer is: 12.34%\nThe answer is: 9") == "12.34%"  # first match, to end of line
    assert x("The answer is:") == "The answer is:"  # colon AND space required
    assert x("The answer is: ") == "" and x("  plain reply ") == "plain reply"
    assert E.score("corpusqa", "The answer is: anything", rec) == 0.0  # gold [] never matches by CEM
    assert E.score("corpusqa", "The answer is: []", rec, protocol="official", judge=lambda *a: "[[YES]]") == 1.0
    assert E.score("corpusqa", "The answer is: []", rec, protocol="official", judge=lambda *a: "") == 0.0


def test_longbench_v1_protocols():
    rec = {"input": "Who?", "answers": ["Ada Lovelace", "Lovelace"], "dataset": "hotpotqa"}
    assert E.score("longbench_v1_qa", "Lovelace", rec, protocol="official") == 1.0  # max over golds
    assert E.score("longbench_v1_qa", "</think>The correct answer is Lovelace.", rec) == 0.0  # QL: answers[0] only
    assert E.score("longbench_v1_qa", "</think>The correct answer is Ada Lovelace.", rec) == 1.0
    assert E.score("longbench_v1_qa", "", rec, protocol="official") == 0.0


def test_protocol_and_benchmark_names_are_checked():
    with pytest.raises(ValueError, match="protocol"):
        E.score("mrcr", "x", {"answer": "x", "random_string_to_prepend": ""}, protocol="spell")
    with pytest.raises(ValueError, match="unknown benchmark"):
        E.score("gsm8k", "x", {})


# ---- aggregation ----


def test_bootstrap_interval_covers_the_mean_and_macro_averages():
    rng = np.random.default_rng(0)
    groups = [[float(v)] for v in rng.random(400) < 0.3]
    mean, low, high = bootstrap_mean(groups)
    assert mean == pytest.approx(np.mean(groups)) and low < mean < high
    se = math.sqrt(mean * (1 - mean) / 400)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)  # close to the normal interval
    macro, _, _ = bootstrap_mean([[1.0], [1.0], [1.0], [0.0]], strata=["a", "a", "a", "b"])
    assert macro == 0.5  # mean of stratum means, not of items
    multi, lo, hi = bootstrap_mean([[0.0, 1.0]] * 50)
    assert multi == 0.5 and lo < 0.5 < hi  # samples resampled within items


def test_aggregate_splits_and_rates():
    rows = [
        {"id": "a", "score": 1.0, "split": {"difficulty": "easy", "length": "short"}, "truncated": True},
        {"id": "b", "score": 0.0, "split": {"difficulty": "hard", "length": "short"}, "truncated": False},
        {"id": "c", "score": 1.0, "split": {"difficulty": "hard", "length": "long"}, "truncated": False},
    ]
    report = E.aggregate("longbench_v2", rows)
    assert report["score"]["mean"] == pytest.approx(66.67) and report["score"]["n"] == 3
    assert report["splits"]["difficulty"]["easy"]["mean"] == 100.0
    assert report["splits"]["difficulty"]["hard"]["mean"] == 50.0
    assert report["rates"]["truncated"] == pytest.approx(33.33)
    lb1 = [
        {"id": f"{d}/{i}", "score": float(d == "qasper"), "split": {"dataset": d}}
        for d in E.module("longbench_v1_qa").DATASETS
        for i in (1, 2)
    ]
    lb1 += [{"id": "qasper/3", "score": 1.0, "split": {"dataset": "qasper"}}]
    assert E.aggregate("longbench_v1_qa", lb1)["score"]["mean"] == 20.0  # macro over the 5 subsets


def _imports(folder):
    root = Path(__file__).resolve().parents[1] / folder
    for path in [root] if root.is_file() else root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield from ((path.name, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield path.name, node.module


def test_layer_rules_for_eval_and_the_shared_client():
    assert not [(f, m) for f, m in _imports("qlx/eval") if m.startswith("qlx.train")]
    rl_outside = {m for _, m in _imports("qlx/rl") if m.startswith("qlx.") and not m.startswith("qlx.rl")}
    assert rl_outside <= {"qlx.openai_client"}, rl_outside
    assert {m for _, m in _imports("qlx/openai_client.py") if m.startswith("qlx")} == set()


class _CharTokenizer:
    """One id per character: truncation is checkable by eye."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids, *, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def test_prompt_truncation_in_model_tokens():
    from qlx.eval.runner import truncate_messages

    tok = _CharTokenizer()
    doc = "abcdefghijklmnopqrst"
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": doc}]
    out, total, cut = truncate_messages(msgs, tok, 13, "longbench_v2")
    assert (total, cut) == (23, True) and out[0] == msgs[0] and out[1]["content"] == "abcdepqrst"  # 3 + 10 = 13
    out, _, _ = truncate_messages(msgs, tok, 12, "longbench_v1")
    assert out[1]["content"] == "abcdqrst"  # 2·floor(9/2) = 8 characters
    assert truncate_messages(msgs, tok, 0, "longbench_v2") == (msgs, 23, False)  # 0: off
    chat = [*msgs, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    assert truncate_messages(chat, tok, 5, "longbench_v2") == (chat, 25, False)  # multi-turn: never cut
