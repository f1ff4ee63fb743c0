"""push_to_hub / pull_from_hub against the loopback fake Hub: round trips through LFS, and the errors users hit."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterator, List

import pytest
import torch
from huggingface_hub import ModelCard, constants, model_info
from huggingface_hub.errors import RepositoryNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hub_server import FakeHub, closed_port_endpoint, echoing_error_server
from hub_server import fake_hub  # noqa: F401  (tests/conftest.py imports it too; keeps this file self-sufficient)
from optimum_msp.integrations.hub import (
    EndpointUnreachableError,
    HubError,
    InvalidTokenError,
    MissingTokenError,
    RepoExistsError,
    pull_from_hub,
    push_to_hub,
)

REPO_ID = "tester/tiny-llama-pruned"
VOCAB_SIZE = 128
MODEL_CARD = """---
library_name: transformers
tags:
- pruned
- sparse
base_model_relation: quantized
---

# tiny-llama-pruned

A tiny Llama pruned to 50% unstructured sparsity with Wanda (test fixture).
"""


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB_SIZE)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB_SIZE - 2)} | {"<unk>": VOCAB_SIZE - 2, "<eos>": VOCAB_SIZE - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a pruning run saves: weights, config.json with its sparsity_plan, tokenizer, model card."""
    folder = tmp_path_factory.mktemp("pruned")
    _tiny_model().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["sparsity_plan"] = {
        "format_version": 1, "method": "wanda", "pattern": "unstructured", "allocation": "uniform",
        "target_sparsity": 0.5, "achieved_sparsity": 0.5,
        "layers": {"model.layers.0.self_attn.q_proj": {"sparsity": 0.5, "achieved": 0.5, "numel": 4096}},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "README.md").write_text(MODEL_CARD)
    return folder


def _logits(model, seed: int = 1) -> torch.Tensor:
    input_ids = torch.randint(0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids).logits


def _local_files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------


def test_push_uploads_the_folder_as_one_commit_with_weights_through_lfs(fake_hub: FakeHub, model_folder: Path):
    commit = push_to_hub(model_folder, REPO_ID, token=fake_hub.token, endpoint=fake_hub.endpoint,
                         commit_message="Add 50% Wanda model")  # fmt: skip

    assert commit.oid and commit.commit_url.startswith(f"{fake_hub.endpoint}/{REPO_ID}/commit/")
    assert fake_hub.commit_titles(REPO_ID) == ["Add 50% Wanda model", "initial commit"]
    stored = fake_hub.repo_files(REPO_ID)
    assert {path: stored[path] for path in _local_files(model_folder)} == _local_files(model_folder)
    # The weights went through the LFS batch -> PUT -> verify path, the small text files did not.
    assert fake_hub.lfs_paths(REPO_ID) == ["model.safetensors"]
    weights_sha256 = hashlib.sha256((model_folder / "model.safetensors").read_bytes()).hexdigest()
    assert fake_hub.lfs_uploads == [weights_sha256]
    paths = [request.path for request in fake_hub.requests]
    assert f"/{REPO_ID}.git/info/lfs/objects/batch" in paths and f"/{REPO_ID}.git/info/lfs/objects/verify" in paths


def test_from_pretrained_pulls_identical_model_tokenizer_and_plan(fake_hub: FakeHub, model_folder: Path):
    push_to_hub(model_folder, REPO_ID, token=fake_hub.token, endpoint=fake_hub.endpoint)

    pulled = AutoModelForCausalLM.from_pretrained(REPO_ID).eval()
    tokenizer = AutoTokenizer.from_pretrained(REPO_ID)

    assert torch.equal(_logits(pulled), _logits(_tiny_model()))
    assert pulled.config.sparsity_plan["method"] == "wanda"
    assert tokenizer("w1 w2 w99")["input_ids"] == [1, 2, 99]
    # The weights were fetched from the "CDN" the resolve endpoint redirected to, as on the real Hub.
    assert any(r.path.startswith("/lfs-cdn/") and r.status == 200 for r in fake_hub.requests)


def test_model_card_round_trips_and_parses(fake_hub: FakeHub, model_folder: Path):
    push_to_hub(model_folder, REPO_ID, token=fake_hub.token)

    card = ModelCard.load(REPO_ID)

    assert card.content == MODEL_CARD
    assert card.data.library_name == "transformers" and card.data.tags == ["pruned", "sparse"]
    assert "README.md" in {sibling.rfilename for sibling in model_info(REPO_ID).siblings}


def test_pull_from_hub_returns_a_loadable_snapshot(fake_hub: FakeHub, model_folder: Path):
    push_to_hub(model_folder, REPO_ID, token=fake_hub.token)

    folder = pull_from_hub(REPO_ID, endpoint=fake_hub.endpoint)

    assert {path: content for path, content in _local_files(folder).items() if path != ".gitattributes"} == (
        _local_files(model_folder)
    )
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder)), _logits(_tiny_model()))


def test_transformers_own_push_to_hub_works_against_the_fake(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    model = _tiny_model()

    model.push_to_hub("tester/pushed-by-transformers")

    assert "model.safetensors" in fake_hub.lfs_paths("tester/pushed-by-transformers")
    assert len(fake_hub.lfs_uploads) == 1
    pulled = AutoModelForCausalLM.from_pretrained("tester/pushed-by-transformers")
    assert torch.equal(_logits(pulled), _logits(model))


def test_env_vars_give_token_and_endpoint_and_arguments_win(fake_hub: FakeHub, model_folder: Path,
                                                           monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)  # HF_ENDPOINT is set by the fixture
    push_to_hub(model_folder, REPO_ID)
    assert fake_hub.commit_titles(REPO_ID)[0].startswith("Upload pruned model")

    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())
    push_to_hub(model_folder, "tester/other", endpoint=fake_hub.endpoint)
    assert "config.json" in fake_hub.repo_files("tester/other")


def test_stored_login_is_used_when_no_token_is_given(fake_hub: FakeHub, model_folder: Path):
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(fake_hub.token)  # what `hf auth login` leaves behind

    push_to_hub(model_folder, REPO_ID)

    assert "model.safetensors" in fake_hub.repo_files(REPO_ID)


def test_revision_pushes_to_a_new_branch(fake_hub: FakeHub, model_folder: Path):
    push_to_hub(model_folder, REPO_ID, token=fake_hub.token, revision="sparsity-50")

    assert fake_hub.commit_titles(REPO_ID, branch="main") == ["initial commit"]
    assert len(fake_hub.commit_titles(REPO_ID, branch="sparsity-50")) == 2
    pulled = AutoModelForCausalLM.from_pretrained(REPO_ID, revision="sparsity-50")
    assert torch.equal(_logits(pulled), _logits(_tiny_model()))


def test_private_repo_is_hidden_from_anonymous_readers(fake_hub: FakeHub, model_folder: Path):
    push_to_hub(model_folder, REPO_ID, token=fake_hub.token, private=True)

    with pytest.raises(RepositoryNotFoundError):
        model_info(REPO_ID, token=False)
    assert model_info(REPO_ID, token=fake_hub.token).private is True


def test_fake_hub_speaks_the_rest_of_the_client_api(fake_hub: FakeHub):
    """whoami, size-based LFS, tree listing, paths-info, deletions: what other callers of the fixture may use."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=fake_hub.endpoint, token=fake_hub.token)
    assert api.whoami()["name"] == fake_hub.username
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami(token="hf_wrong")

    fake_hub.lfs_threshold = 1_000  # a big text file must go through LFS too
    big_text = b"x" * 5_000
    repo_id = api.create_repo("tester/layout").repo_id
    api.create_commit(repo_id, commit_message="files", operations=[
        CommitOperationAdd("notes/big.txt", big_text), CommitOperationAdd("notes/deep/small.txt", b"small"),
        CommitOperationAdd("gone.txt", b"bye"),
    ])  # fmt: skip
    api.create_commit(repo_id, commit_message="delete", operations=[CommitOperationDelete("gone.txt")])

    assert fake_hub.lfs_paths(repo_id) == ["notes/big.txt"]
    assert sorted(entry.path for entry in api.list_repo_tree(repo_id)) == [".gitattributes", "notes"]
    assert sorted(entry.path for entry in api.list_repo_tree(repo_id, recursive=True)) == [
        ".gitattributes", "notes", "notes/big.txt", "notes/deep", "notes/deep/small.txt",
    ]  # fmt: skip
    [info] = api.get_paths_info(repo_id, ["notes/big.txt"])
    assert info.lfs.sha256 == hashlib.sha256(big_text).hexdigest() and info.size == len(big_text)
    assert not api.file_exists(repo_id, "gone.txt")
    assert Path(hf_hub_download(repo_id, "notes/big.txt")).read_bytes() == big_text


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_token_is_a_clear_error_before_any_request(fake_hub: FakeHub, model_folder: Path):
    with pytest.raises(MissingTokenError, match="HF_TOKEN") as caught:
        push_to_hub(model_folder, REPO_ID)

    assert "hf auth login" in str(caught.value)
    assert fake_hub.requests == []


def test_rejected_token_is_a_clear_error(fake_hub: FakeHub, model_folder: Path):
    with pytest.raises(InvalidTokenError, match="401") as caught:
        push_to_hub(model_folder, REPO_ID, token="hf_not_a_valid_token")

    assert "HF_TOKEN" in str(caught.value)
    assert REPO_ID not in fake_hub.store.repos


def test_unreachable_endpoint_is_a_clear_error(fake_hub: FakeHub, model_folder: Path):
    endpoint = closed_port_endpoint()
    started = time.monotonic()

    with pytest.raises(EndpointUnreachableError, match="HF_ENDPOINT") as caught:
        push_to_hub(model_folder, REPO_ID, token=fake_hub.token, endpoint=endpoint)

    assert endpoint in str(caught.value)
    assert time.monotonic() - started < 10  # no long retry loop on a refused connection
    with pytest.raises(EndpointUnreachableError):
        pull_from_hub(REPO_ID, endpoint=endpoint)


def test_existing_repo_needs_exist_ok(fake_hub: FakeHub, model_folder: Path, tmp_path: Path):
    push_to_hub(model_folder, REPO_ID, token=fake_hub.token)

    with pytest.raises(RepoExistsError, match="exist_ok=True"):
        push_to_hub(model_folder, REPO_ID, token=fake_hub.token)

    for path, content in _local_files(model_folder).items():
        (tmp_path / path).write_bytes(content)
    (tmp_path / "README.md").write_text(MODEL_CARD + "\nUpdated.\n")
    push_to_hub(tmp_path, REPO_ID, token=fake_hub.token, exist_ok=True, commit_message="Update card")

    titles = fake_hub.commit_titles(REPO_ID)
    assert titles[0] == "Update card" and len(titles) == 3
    assert fake_hub.repo_files(REPO_ID)["README.md"].endswith(b"Updated.\n")
    assert len(fake_hub.lfs_uploads) == 1  # unchanged weights are not uploaded again


def test_folder_without_config_is_refused(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_to_hub(tmp_path, REPO_ID, token="unused")


# ---------------------------------------------------------------------------------------------------------------
# The token never leaks
# ---------------------------------------------------------------------------------------------------------------


class _RecordEverything(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def _debug_logs_of_every_library() -> Iterator[List[str]]:
    """DEBUG records of this package, huggingface_hub (with its curl dumps), transformers and the HTTP stack."""
    handler = _RecordEverything()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(args)s"))
    names = ["", "optimum_msp", "huggingface_hub", "transformers", "httpx2", "httpcore2", "httpx", "httpcore"]
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        for log, level in zip(loggers, levels):
            log.removeHandler(handler)
            log.setLevel(level)


def _messages_of_chain(error: BaseException) -> str:
    texts = []
    while error is not None:
        texts.append(f"{error!r} {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def test_token_is_never_logged_nor_put_in_errors(fake_hub: FakeHub, model_folder: Path,
                                                 monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # huggingface_hub then logs every request as a curl command
    rejected = "hf_rejected_secret_token_42"
    errors = []
    with _debug_logs_of_every_library() as lines:
        push_to_hub(model_folder, REPO_ID, token=fake_hub.token)
        for call in (
            lambda: push_to_hub(model_folder, REPO_ID, token=fake_hub.token),  # exists
            lambda: push_to_hub(model_folder, "tester/other", token=rejected),  # 401
        ):
            with pytest.raises(Exception) as caught:
                call()
            errors.append(_messages_of_chain(caught.value))

    assert any("curl" in line for line in lines), "expected huggingface_hub's DEBUG request dumps to be captured"
    logged = "\n".join(lines)
    for secret in (fake_hub.token, rejected):
        assert secret not in logged
        assert all(secret not in text for text in errors)


def test_pruner_push_to_hub_round_trip_with_card(fake_hub, tmp_path):
    """MSPPruner.push_to_hub: weights, plan, model card with results, one commit; pulled back and verified."""
    from huggingface_hub import ModelCard

    from optimum_msp import MSPConfig, MSPPruner, SparsityPlan
    from optimum_msp.integrations.model_card import perplexity_result
    from tiny_models import calibration_ids, tiny_model

    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method="wanda", pattern="2:4"), calibration=calibration_ids())
    repo_id = f"{fake_hub.username}/pruned-card"
    pruner.push_to_hub(repo_id, token=fake_hub.token, endpoint=fake_hub.endpoint, results=[perplexity_result(42.0)])
    titles = fake_hub.commit_titles(repo_id)
    assert sum("Upload wanda/uniform pruned model" in title for title in titles) == 1  # one commit
    assert "model.safetensors" in fake_hub.lfs_paths(repo_id)
    folder = pull_from_hub(repo_id, endpoint=fake_hub.endpoint, token=fake_hub.token, cache_dir=tmp_path / "pull")
    model = AutoModelForCausalLM.from_pretrained(folder)
    SparsityPlan.from_config(model.config).verify(model)
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results[0].metric_value == 42.0


def _with_credentials(endpoint: str, user: str, secret: str) -> str:
    scheme, rest = endpoint.split("://", 1)
    return f"{scheme}://{user}:{secret}@{rest}"


def test_credentials_embedded_in_the_endpoint_url_are_never_logged_nor_raised(fake_hub: FakeHub, model_folder: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(constants, "HF_DEBUG", True)
    secret = "hf_url_embedded_secret_0123456789abcdef"
    basic = base64.b64encode(f"tester:{secret}".encode()).decode()  # what an HTTP client sends for user:secret@
    errors = []
    with _debug_logs_of_every_library() as lines:
        for endpoint in (_with_credentials(fake_hub.endpoint, "tester", secret),  # the server answers 401
                         _with_credentials(closed_port_endpoint(), "tester", secret)):  # nothing answers
            with pytest.raises(Exception) as caught:
                push_to_hub(model_folder, REPO_ID, token=fake_hub.token, endpoint=endpoint)
            errors.append(_messages_of_chain(caught.value))
            assert "***@127.0.0.1" in str(caught.value)  # the endpoint is still shown, without its credentials
    logged = "\n".join(lines)
    assert "Pushing" in logged
    for leaked in (secret, basic):
        assert leaked not in logged
        assert all(leaked not in text for text in errors)


def test_an_error_body_echoing_the_authorization_header_is_redacted(model_folder: Path):
    token = "hf_echoed_secret_token_0123456789abcdef"
    with echoing_error_server() as endpoint, _debug_logs_of_every_library() as lines:
        with pytest.raises(HubError, match="refused the request") as caught:
            push_to_hub(model_folder, REPO_ID, token=token, endpoint=endpoint)
    text = _messages_of_chain(caught.value)
    assert "internal error; request headers" in text  # the server's message is kept...
    assert token not in text and token not in "\n".join(lines)  # ...without the credentials it echoed


def test_redact_masks_credential_shapes():
    from optimum_msp.integrations.hub import redact

    text = ("GET https://bob:pa55@hub.example/x 'Authorization': 'Bearer abc.def' authorization: Basic Ym9iOnBhNTU= "
            "token hf_abcdefghijklmnopqrstuvwxyz0123 and s3cr3t")
    out = redact(text, ["s3cr3t"])
    for leaked in ("pa55", "abc.def", "Ym9iOnBhNTU=", "hf_abcdefghijklmnopqrstuvwxyz0123", "s3cr3t"):
        assert leaked not in out
    assert "https://***@hub.example/x" in out
