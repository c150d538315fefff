"""`push_to_hub` of MTP heads, offline: the upload lands in a hub-cache layout that a fresh offline process loads.

`FakeHub` replaces the two Hub calls a push makes (`HfApi.create_repo`, `HfApi.create_commit`). Each commit is written
where the Hub client caches downloads (`$HF_HOME/hub/models--ORG--NAME/snapshots/<sha>/...` plus `refs/main`), so a
process started with `HF_HUB_OFFLINE=1` and that `HF_HOME` loads the repo id as if it had downloaded it. The test
process itself runs in offline mode too: any Hub call the fake does not cover fails instead of reaching the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from testing_common import one_torch_thread  # noqa: F401 (autouse fixture)
from tiny_models import make_model
from transformers import AutoModelForCausalLM

import peft_mtp
from peft_mtp.hub import CARD_TAGS, install_hub_fix

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_REPO = "testorg/tiny-llama"
# Saving an adapter whose base has a repo id makes PEFT look up the base's config.json on the Hub (to see whether the
# vocabulary was resized); offline, it warns and carries on, which is what these tests want.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Unable to fetch remote file due to the following error:UserWarning"),
    pytest.mark.filterwarnings("ignore:Could not find a config file in:UserWarning"),
]


class FakeHub:
    """Commits written into a hub-cache layout under `hf_home` instead of uploaded.

    Args:
        hf_home: the `HF_HOME` whose `hub/` cache receives the commits.
    """

    def __init__(self, hf_home: Path):
        self.cache = hf_home / "hub"
        self.commits: list[tuple[str, list[str]]] = []

    def repo_dir(self, repo_id: str) -> Path:
        return self.cache / ("models--" + repo_id.replace("/", "--"))

    def snapshot(self, repo_id: str) -> Path:
        """Folder of the repo's latest commit (what `refs/main` points at)."""
        repo = self.repo_dir(repo_id)
        return repo / "snapshots" / (repo / "refs" / "main").read_text()

    def create_repo(self, api, repo_id: str, *, exist_ok: bool = False, **kwargs) -> RepoUrl:
        assert "/" in repo_id, "tests push to ORG/NAME so that no user namespace has to be looked up"
        self.repo_dir(repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return RepoUrl(f"{constants.ENDPOINT}/{repo_id}")

    def create_commit(self, api, repo_id: str, operations, *, commit_message: str, commit_description=None,
                      revision=None, create_pr: bool = False, **kwargs) -> CommitInfo:
        assert revision is None and not create_pr, "the fake Hub has only a main branch"
        files = {}
        for operation in operations:
            assert isinstance(operation, CommitOperationAdd), f"unexpected commit operation {operation!r}"
            with operation.as_file() as handle:
                files[operation.path_in_repo] = handle.read()
        repo = self.repo_dir(repo_id)
        previous = self.snapshot(repo_id) if (repo / "refs" / "main").exists() else None
        digest = hashlib.sha1()
        for path in sorted(files):
            digest.update(path.encode() + files[path])
        if previous is not None:
            digest.update(previous.name.encode())
        sha = digest.hexdigest()
        snapshot = repo / "snapshots" / sha
        if previous is not None:  # a commit changes the files it names and keeps the others
            shutil.copytree(previous, snapshot)
        for path, data in files.items():
            (snapshot / path).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / path).write_bytes(data)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        self.commits.append((repo_id, sorted(files)))
        return CommitInfo(commit_url=f"{constants.ENDPOINT}/{repo_id}/commit/{sha}", commit_message=commit_message,
                          commit_description=commit_description or "", oid=sha)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    hub = FakeHub(tmp_path / "hf_home")
    hub.cache.mkdir(parents=True)
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw: hub.create_commit(
        api, repo_id, operations, **kw))
    # Reads (the model card lookup of push_to_hub, from_pretrained of a repo id) are served from the fake's cache, and
    # offline mode turns any other Hub request into an error instead of a download.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub.cache))
    return hub


@pytest.fixture
def hub_base(fake_hub) -> AutoModelForCausalLM:
    """A tiny Llama pushed to the fake Hub as `BASE_REPO` and loaded back by repo id, as a user's base model is."""
    make_model("llama").push_to_hub(BASE_REPO)
    return AutoModelForCausalLM.from_pretrained(BASE_REPO, attn_implementation="eager").eval()


# (repo id, MTPConfig kwargs): a parallel head without trunk LoRA, and a chain of decoder layers with it.
PUSH_CASES = [
    ("testorg/tiny-mtp-ffn", dict(num_heads=2, head_type="ffn")),
    ("testorg/tiny-mtp-seq-lora", dict(
        num_heads=2, head_type="sequential",
        lora_config=LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))),
]

# Run in a fresh interpreter with HF_HUB_OFFLINE=1: load the base model and the heads by repo id, write the outputs.
LOAD_IN_FRESH_PROCESS = """
import sys
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
import peft_mtp  # registers MTP

base_repo, inputs_file, outputs_file, *heads_repos = sys.argv[1:]
input_ids = load_file(inputs_file)["input_ids"]
outputs = {}
for heads_repo in heads_repos:
    base = AutoModelForCausalLM.from_pretrained(base_repo, attn_implementation="eager").eval()
    model = PeftModel.from_pretrained(base, heads_repo).eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, output_mtp_logits=True)
    outputs[heads_repo + ":logits"] = out.logits
    outputs[heads_repo + ":mtp_logits"] = out.mtp_logits
save_file(outputs, outputs_file)
"""


def test_push_then_load_by_repo_id_in_fresh_offline_process(fake_hub, hub_base, tmp_path):
    input_ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = {}
    for repo_id, kwargs in PUSH_CASES:
        base = AutoModelForCausalLM.from_pretrained(BASE_REPO, attn_implementation="eager").eval()
        model = get_peft_model(base, peft_mtp.MTPConfig(head_init="random", **kwargs))
        model.eval()
        with torch.no_grad():
            out = model(input_ids=input_ids, output_mtp_logits=True)
        expected[repo_id + ":logits"], expected[repo_id + ":mtp_logits"] = out.logits, out.mtp_logits
        model.push_to_hub(repo_id, tags=["my-tag"])
        uploaded = {p.name for p in fake_hub.snapshot(repo_id).iterdir()}
        assert uploaded == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
        _assert_mtp_card(fake_hub.snapshot(repo_id) / "README.md", repo_id, kwargs, extra_tags={"my-tag"})

    save_file({"input_ids": input_ids}, tmp_path / "inputs.safetensors")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("HF_HUB_CACHE", None)  # HF_HOME alone must place the cache
    result = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, BASE_REPO, str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "outputs.safetensors"), *[repo_id for repo_id, _ in PUSH_CASES]],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = load_file(tmp_path / "outputs.safetensors")
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), f"{key} differs after push and load by repo id"


def test_second_push_keeps_the_hub_card_and_writes_the_mtp_section_once(fake_hub, hub_base):
    model = get_peft_model(hub_base, peft_mtp.MTPConfig(num_heads=2, head_type="linear"))
    model.push_to_hub("testorg/twice", tags=["first-push"])
    # The second push loads the card of the first from the (fake) Hub, as transformers does.
    card_on_hub = fake_hub.snapshot("testorg/twice") / "README.md"
    card_on_hub.write_text(card_on_hub.read_text().replace("# Model Card for Model ID", "# My own title"))
    model.push_to_hub("testorg/twice")
    card = ModelCard.load(fake_hub.snapshot("testorg/twice") / "README.md")
    assert card.text.count("## Multi-Token Prediction heads") == 1
    assert "# My own title" in card.text
    assert "first-push" in card.data.tags
    assert card.data.tags.count(f"base_model:adapter:{BASE_REPO}") == 1


def test_push_of_heads_without_hub_base_model_warns_and_omits_base_model(fake_hub):
    model = get_peft_model(make_model("llama"), peft_mtp.MTPConfig(num_heads=2))  # built from a config: no repo id
    with pytest.warns(UserWarning, match="not a Hub repo id"):
        model.push_to_hub("testorg/no-base")
    card = ModelCard.load(fake_hub.snapshot("testorg/no-base") / "README.md")
    assert card.data.library_name == "peft"
    assert "base_model" not in card.data.to_dict()
    assert not [tag for tag in card.data.tags if tag.startswith("base_model:adapter:")]


def test_repo_id_set_in_the_config_names_the_base_model_of_a_local_base(tmp_path):
    model = get_peft_model(make_model("llama"), peft_mtp.MTPConfig(num_heads=2))
    model.get_base_model().name_or_path = str(tmp_path)  # a base loaded from a folder: not a Hub id
    model.peft_config["default"].base_model_name_or_path = BASE_REPO  # what docs/saving_loading.md says to do
    model.save_pretrained(tmp_path / "heads")
    card = ModelCard.load(tmp_path / "heads" / "README.md")
    assert card.data.base_model == BASE_REPO
    assert f"base_model:adapter:{BASE_REPO}" in card.data.tags
    assert not [tag for tag in card.data.tags if str(tmp_path) in tag]


def test_save_pretrained_card_has_mtp_section_once(tmp_path):
    model = get_peft_model(make_model("llama"), peft_mtp.MTPConfig(num_heads=3, head_type="cnn"))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # the second save updates the card, it does not append to it
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert card.text.count("## Multi-Token Prediction heads") == 1
    assert "| `cnn_kernel_size` | `4` |" in card.text


def test_card_lists_every_mtp_adapter_with_its_subfolder(tmp_path):
    model = get_peft_model(make_model("llama"), peft_mtp.MTPConfig(num_heads=2, head_type="ffn"))
    model.add_adapter("drafts", peft_mtp.MTPConfig(num_heads=3, head_type="mha_ffn"))
    model.save_pretrained(tmp_path)
    text = ModelCard.load(tmp_path / "README.md").text
    assert "### Adapter `default`" in text
    assert "### Adapter `drafts` (subfolder `drafts/`" in text
    assert "| `num_heads` | `3` |" in text and "| `num_heads` | `2` |" in text


def test_card_of_other_peft_methods_is_untouched(tmp_path):
    model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "with_fix")
    unwrapped = type(model).create_or_update_model_card.__wrapped__
    os.makedirs(tmp_path / "without_fix")
    unwrapped(model, str(tmp_path / "without_fix"))
    assert (tmp_path / "with_fix" / "README.md").read_text() == (tmp_path / "without_fix" / "README.md").read_text()
    assert "Multi-Token Prediction" not in (tmp_path / "with_fix" / "README.md").read_text()


def test_install_hub_fix_is_idempotent_and_installed_on_import():
    card_function, upload_function = PeftModel.create_or_update_model_card, PeftModel._upload_modified_files
    assert getattr(card_function, "_peft_mtp_hub_fix", False), "import peft_mtp must install the card fix"
    assert getattr(upload_function, "_peft_mtp_hub_fix", False), "transformers' push path changed: fix not installed"
    install_hub_fix()
    assert PeftModel.create_or_update_model_card is card_function
    assert PeftModel._upload_modified_files is upload_function


def _assert_mtp_card(path: Path, repo_id: str, kwargs: dict, extra_tags: set[str]) -> None:
    """The pushed card: PEFT's metadata, the base model, the MTP tags and settings, and the user's tags."""
    card = ModelCard.load(path)
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_REPO
    assert card.data.pipeline_tag == "text-generation"
    tags = set(card.data.tags)
    assert {f"base_model:adapter:{BASE_REPO}", *CARD_TAGS, *extra_tags} <= tags
    assert "library_name: transformers" not in path.read_text()
    assert f'PeftModel.from_pretrained(base, "{repo_id}")' in card.text
    assert f"| `num_heads` | `{kwargs['num_heads']}` |" in card.text
    assert f"| `head_type` | `{kwargs['head_type']}` |" in card.text
    lora = kwargs.get("lora_config")
    assert ("r=2, lora_alpha=8, target_modules=['q_proj']" if lora else "none (trunk frozen)") in card.text
    config = json.loads((path.parent / "adapter_config.json").read_text())
    assert config["peft_type"] == "MTP" and config["base_model_name_or_path"] == BASE_REPO
