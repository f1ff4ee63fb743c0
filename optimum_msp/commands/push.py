"""``optimum-msp push``: upload a pruned folder to the Hugging Face Hub as one commit, optionally re-saved compact."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from .common import add_verb

#: the files a re-save writes (weights and config); everything else in the folder is uploaded as it is
_REWRITTEN = ("config.json", "generation_config.json", "model.safetensors.index.json")


def add_parser(sub) -> None:
    parser = add_verb(
        sub, "push", "upload a pruned folder to the Hugging Face Hub (one commit)",
        "Upload a folder saved by optimum-msp (weights, config.json with its plan, tokenizer, model card, report) "
        "to REPO_ID as a single commit. The token comes from HF_TOKEN or `hf auth login`, the endpoint from "
        "--endpoint or HF_ENDPOINT. --compact re-saves the weights as sparse values + bitmask / N:M indices first "
        "(loading them needs optimum_msp); the weights are verified against the plan on the way.",
        ["optimum-msp push out/smollm2-wanda-msp-75 my-org/smollm2-wanda-msp-75 --private",
         "optimum-msp push out/smollm2-wanda-msp-75 my-org/smollm2-wanda-msp-75 --compact deflate --exist-ok"])
    parser.add_argument("folder", help="a folder saved by optimum-msp")
    parser.add_argument("repo_id", help="the Hub repo to create (or, with --exist-ok, to add a commit to): org/name")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--compact", choices=["sparse", "deflate"], default=None,
                        help="re-save the weights compact before uploading (default: upload the folder as saved)")
    parser.add_argument("--exist-ok", action="store_true", help="add a commit to an existing repo")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT, else the public Hub)")
    parser.add_argument("--message", default=None, help="commit message")
    parser.set_defaults(func=run)


def recompact(folder: Path, destination: Path, compact: str) -> Path:
    """A copy of ``folder`` with its weights re-saved compact (loaded, hence verified, first)."""
    from ..checkpoint import save_pruned
    from ..modeling import load_model

    model = load_model(folder)  # verified against its plan while it loads
    destination.mkdir(parents=True)
    for path in folder.iterdir():
        weights = path.suffix in (".safetensors", ".bin") or path.name in _REWRITTEN
        if path.is_file() and not weights and not path.name.startswith("."):
            shutil.copy2(path, destination / path.name)
    save_pruned(model, destination, compact=compact)
    return destination


def run(args: argparse.Namespace) -> int:
    from ..integrations.hub import RepoExistsError, push_to_hub
    from ..report import read_plan

    folder = Path(args.folder)
    plan = read_plan(folder)  # a folder saved by optimum-msp, with a readable plan
    if "/" not in args.repo_id or args.repo_id.count("/") > 1:
        raise ValueError(f"REPO_ID must read org/name (or user/name), got {args.repo_id!r}.")
    message = args.message or f"Upload {plan.method}/{plan.allocation} pruned model ({plan.target_sparsity:g} sparsity)"
    with tempfile.TemporaryDirectory(prefix="optimum-msp-push-") as scratch:
        upload = recompact(folder, Path(scratch) / folder.name, args.compact) if args.compact else folder
        try:
            commit = push_to_hub(upload, args.repo_id, endpoint=args.endpoint, private=args.private or None,
                                 exist_ok=args.exist_ok, commit_message=message, revision=args.revision)
        except RepoExistsError:
            raise RepoExistsError(f"The repo {args.repo_id!r} already exists: pass --exist-ok to add a commit to it, "
                                  "or choose another REPO_ID.") from None
    print(f"pushed {folder} to {args.repo_id}: {commit.commit_url}")
    return 0
