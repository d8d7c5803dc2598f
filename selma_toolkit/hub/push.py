"""Pushing experts, merged LoRAs and run folders to the Hub in one commit, with a model card."""

from __future__ import annotations

import logging
from pathlib import Path

from selma_toolkit.errors import HubError
from selma_toolkit.hub.connection import hub_errors
from selma_toolkit.hub.names import LOGIN_HINT, check_repo_id

log = logging.getLogger(__name__)


def push_expert(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an expert file, a merged LoRA or a run folder to ``repo_id`` in one commit; return its URL.

    Creates the repo if needed (``private`` applies only then) and the branch ``revision`` if it does
    not exist. The commit holds the LoRA file(s), a README.md model card, and for a run the resolved
    recipe, eval/scores.json and a sample grid when present (see ``selma_toolkit.hub.card``).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    from selma_toolkit.hub.card import plan_upload

    check_repo_id(repo_id)
    plan = plan_upload(Path(path).expanduser(), repo_id)
    token = token or get_token()
    if not token:
        raise HubError(f"pushing to {repo_id} needs a Hugging Face token and none was found: {LOGIN_HINT}")
    plan.refuse_if_contains(token)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in plan.files.items()
    ]
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(f"push to {repo_id}", endpoint):
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations,
            revision=revision,
            commit_message=commit_message or plan.commit_message,
            commit_description=plan.commit_description,
        )
    log.info("pushed %d files to %s (%s)", len(operations), repo_id, revision or "main")
    return str(info.commit_url)
