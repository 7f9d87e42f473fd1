"""Where a model comes from: a local directory, the embedded default model, or a Hugging Face Hub id.

``resolve_model_path`` is called once where a model enters (``Engine()``, ``rollout serve``):

- None: the embedded default model (``rollout.default_model``), written on first use;
- an existing directory: used as it is;
- ``namespace/name`` that is not a directory: fetched with ``huggingface_hub`` into its cache (only the
  files the engine reads: configs, safetensors, tokenizer and chat templates), or taken from that cache
  when the network is off (``HF_HUB_OFFLINE=1``) or down;
- anything else: returned as given, so the loader reports what is missing.

A Hub id that cannot be had raises a typed error that names the id and says what to do.
"""

from __future__ import annotations

import os

from rollout.errors import NotFoundError, PermissionDeniedError, UnavailableError, quoted

# What the engine reads from a model repository; weights in other formats (.bin, .pth, gguf) are skipped.
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "additional_chat_templates/*")


def looks_like_hub_id(model: str) -> bool:
    """Whether ``model`` has the form of a Hub repository id (``namespace/name``), by the Hub's own rules."""
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def resolve_model_path(model: str | None, *, cache_dir: str | None = None,
                       local_files_only: bool | None = None) -> str:
    """The local directory of ``model`` (see the module docstring); may download.

    ``cache_dir`` is the Hub cache (default: the ``huggingface_hub`` one, ``$HF_HUB_CACHE``);
    ``local_files_only=True`` never touches the network (default: ``$HF_HUB_OFFLINE``).
    """
    if model is None:
        from rollout.default_model import default_model_path

        return default_model_path()
    if not isinstance(model, str) or not model:
        from rollout.errors import InvalidArgumentError

        raise InvalidArgumentError(f"must be a model directory or a Hugging Face Hub id (got {quoted(model)})",
                                   field="model_path")
    if os.path.isdir(model) or not looks_like_hub_id(model):
        return model
    return fetch_from_hub(model, cache_dir=cache_dir, local_files_only=local_files_only)


def fetch_from_hub(repo_id: str, *, cache_dir: str | None = None, local_files_only: bool | None = None) -> str:
    """Download (or find in the cache) the engine's files of ``repo_id``; returns the snapshot directory."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    where = cache_dir or constants.HF_HUB_CACHE
    name = quoted(repo_id)
    try:
        return snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=offline,
                                 allow_patterns=list(HUB_FILE_PATTERNS))
    except GatedRepoError:
        raise PermissionDeniedError(
            f"{name} is a gated model on the Hugging Face Hub: accept its license on its page and set HF_TOKEN "
            "(or `hf auth login`)", field="model_path") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise NotFoundError(
            f"{name} is not a local directory and the Hugging Face Hub has no model of that id (a private one "
            "needs HF_TOKEN)", field="model_path") from None
    except HfHubHTTPError as e:
        raise UnavailableError(f"fetching {name} from the Hugging Face Hub failed: {e}", field="model_path") from None
    except (OSError, ValueError):  # no network, offline mode, not in the cache, or an incomplete snapshot
        how = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hub could not be reached"
        raise UnavailableError(
            f"{name} is not a local directory and is not in the Hugging Face cache ({where}), and {how}. "
            f"On a machine with network: `hf download {repo_id}` (then copy the cache or the snapshot "
            "directory here), or pass the model's local directory", field="model_path") from None

