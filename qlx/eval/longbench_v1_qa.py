"""LongBench v1 QA subsets (docs/eval-rules.md §7): 2wikimqa, hotpotqa, musique, narrativeqa, qasper, 200 items
each (the non-E sets).

Data: ``{dataset}.jsonl`` per subset (from LongBench's ``data.zip``), records ``{input, context, answers: [str],
length, dataset, language, all_classes, _id}``. The column is the mean of the five subset scores.

Scoring: official, max over ``answers`` of token F1 (LongBench variant) of the whole output (after the reasoning
strip); ql, max(CEM-strict, J-EQ) of SPELL's extracted answer against ``answers[0]`` only (as QwenLong-L1 and
SPELL do; a match with a later gold is lost).
"""

from qlx.eval import qa
from qlx.eval.records import Item, Loaded, RecordError, find_files, load_records, require
from qlx.eval.scoring import Score, check_protocol
from qlx.eval.text import substitute, token_f1

NAME = "longbench_v1_qa"
TASK = "qa"
DATASETS = ("2wikimqa", "hotpotqa", "musique", "narrativeqa", "qasper")
SPLITS = ("dataset",)
MACRO = "dataset"
GENERATION = {"official": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 128}}
OFFICIAL_MAX_NEW_TOKENS = {"2wikimqa": 32, "hotpotqa": 32, "musique": 32, "narrativeqa": 128, "qasper": 128}

_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give "
    "me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_NARRATIVE = (
    "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
    "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}"
    "\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do "
    "not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
)
_QASPER_RULE = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
    '"yes", "no", or "unanswerable". Do not provide any explanation.'
)
_QASPER = (
    f"You are given a scientific article and a question. Answer the question {_QASPER_RULE}\n\nArticle: {{context}}"
    f"\n\n Answer the question based on the above article {_QASPER_RULE}\n\nQuestion: {{input}}\n\nAnswer:"
)
OFFICIAL_TEMPLATES = {
    "2wikimqa": _PASSAGES,
    "hotpotqa": _PASSAGES,
    "musique": _PASSAGES,
    "narrativeqa": _NARRATIVE,
    "qasper": _QASPER,
}


def _item_for(dataset):
    def make(record, path):
        require(record, {"input": str, "context": str, "answers": list, "_id": str})
        if not record["answers"] or not all(isinstance(a, str) for a in record["answers"]):
            raise RecordError("key 'answers' must be a non-empty list of strings")
        return Item(NAME, f"{dataset}/{record['_id']}", {**record, "dataset": dataset}, {"dataset": dataset})

    return make


def load(root):
    """The five ``{dataset}.jsonl`` files under ``root`` (missing ones are reported; ``*_e`` files are ignored)."""
    loaded = Loaded([], [], [])
    for dataset in DATASETS:
        try:
            paths = find_files(root, (f"{dataset}.jsonl", f"*/{dataset}.jsonl"), f"LongBench {dataset}")
        except FileNotFoundError as e:
            loaded.notes.append(str(e))
            continue
        loaded.add(load_records(paths, NAME, _item_for(dataset)))
    if not loaded.files:
        raise FileNotFoundError(f"{root}: none of {', '.join(d + '.jsonl' for d in DATASETS)}")
    return loaded


def messages(record, protocol):
    """official: ``dataset2prompt.json``'s prompt of the subset (typos included); ql: SPELL's reading prompt."""
    check_protocol(protocol)
    if protocol == "official":
        values = {"{context}": record["context"], "{input}": record["input"]}
        return [{"role": "user", "content": substitute(OFFICIAL_TEMPLATES[record["dataset"]], values)}]
    return qa.ql_messages(record["context"], record["input"])


extract = qa.extract


def memory_inputs(record, protocol):
    """(context, input, format line) for the memory agent, in both protocols."""
    check_protocol(protocol)
    return qa.memory_inputs(record["context"], record["input"])


def score(response, record, protocol="ql", judge=None, parser=None):
    extracted = extract(response, protocol)
    if protocol == "official":
        f1 = max(token_f1(extracted, gold, "longbench") for gold in record["answers"])
        return Score(f1, extracted, rule=f1)
    return qa.ql_score(extracted, record["input"], record["answers"][0], judge, parser)
