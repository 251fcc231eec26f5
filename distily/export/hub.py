"""Opt-in upload of an export folder to the Hugging Face Hub.

Nothing here runs unless ``--push_to_hub`` (``distily export``) or ``--export_push_to_hub`` (training) is
given: distily never sends weights, data or metrics off the machine on its own. The repository is created
private unless asked otherwise, and the folder is uploaded by ``HfApi.upload_folder`` (hidden files left out).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ExportError

# Hidden files and folders (at the top or nested) stay on the machine; upload_folder matches against the path
# relative to the folder, and fnmatch's ``*`` crosses ``/``.
HIDDEN_PATTERNS = [".*", "*/.*"]


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    api=None,
) -> str:
    """Create ``repo_id`` (private by default; kept if it exists) and upload the folder's files. Returns the
    commit URL. ``api`` (an ``HfApi``) and ``endpoint`` let tests and private Hub mirrors redirect the upload."""
    from huggingface_hub import HfApi

    if not repo_id or repo_id.count("/") > 1:
        raise ExportError(f"--hub_model_id {repo_id!r} is not a Hub repository id like 'user/name'.")
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise ExportError(f"{str(folder)!r} has no README.md (model card); export with the card before pushing.")
    api = api or HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        commit_message=commit_message or "Upload distilled student (distily export)",
        ignore_patterns=list(HIDDEN_PATTERNS),
    )
    return getattr(info, "commit_url", None) or str(info)
