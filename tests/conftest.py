"""Shared fixtures. Every test runs with FORGETCHECK_HOME in a per-session temp folder, so tests never touch
the user's cache; the real SmolLM2 folder (slow tests) is linked in from the user's cache when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_USER_HOME = None


def pytest_configure(config):
    global _USER_HOME
    from forgetcheck.config import forgetcheck_home

    _USER_HOME = forgetcheck_home()


@pytest.fixture(scope="session", autouse=True)
def fc_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("fchome")
    os.environ["FORGETCHECK_HOME"] = str(home)
    # Reuse what `make install` already built in the user's cache (read-only use): the converted SmolLM2
    # folder, the prepared data and downloads. Symlinks, so nothing of the user's is written.
    for sub in ("models/smollm2-135m", "downloads"):
        src = _USER_HOME / sub
        if src.exists():
            dst = home / sub
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src, target_is_directory=True)
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass
    return home


@pytest.fixture(scope="session")
def tiny_ref(fc_home):
    """The random-init tiny GPT-2 (real GPT-2 tokenizer), built once per session."""
    from forgetcheck import models

    return models.resolve("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm2_ref(fc_home):
    from forgetcheck import models

    return models.resolve("smollm2-135m")
