"""`import verl` alone, in a fresh process, makes SSOPD's estimator, trainer and CPU platform available."""

import subprocess
import sys
import textwrap

from ssopd_verl.glue.plugin import guard_recipe, recipe_requested


def run(code: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *argv], capture_output=True, text=True, timeout=600
    )


def test_import_verl_registers_everything():
    proc = run(
        """
        import verl
        from verl.trainer.ppo import core_algos
        from verl.trainer.ppo.v1 import get_trainer_cls
        from verl.plugin.platform.platform_manager import PlatformRegistry
        fn = core_algos.get_adv_estimator_fn("ssopd")
        cls = get_trainer_cls("ssopd")
        print(type(fn).__name__, cls.__name__, PlatformRegistry.get("cpu").__name__)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["SSOPDAdvantage", "SSOPDTrainer", "CPUPlatform"]


def test_pure_modules_do_not_import_verl():
    proc = run(
        """
        import sys
        import ssopd_verl.pairing, ssopd_verl.losses, ssopd_verl.teacher_context, ssopd_verl.config
        import ssopd_verl.distill_plan, ssopd_verl.token_view, ssopd_verl.console, ssopd_verl.seed_comparison
        print(sorted(m for m in sys.modules if m == "verl" or m.startswith("verl.")))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_glue_imports_the_cpu_runtime_only_to_register_it():
    """SSOPD's verl hooks (ssopd_verl/glue) do not depend on the CPU runtime (ssopd_verl/cpu); the plugin registers
    it, and the plugin and the in-process main_ppo select it from `+platform=cpu` (as the command line does);
    nothing else imports it."""
    import ast
    from pathlib import Path

    glue = Path(__file__).resolve().parents[1] / "ssopd_verl" / "glue"
    importers = set()
    for path in glue.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])  # fmt: skip
            if any(n == "ssopd_verl.cpu" or n.startswith("ssopd_verl.cpu.") for n in names):
                importers.add(path.name)
    assert importers == {"plugin.py", "in_process.py"}


def test_recipe_guard_refuses_to_run_plain_ppo(monkeypatch):
    import ssopd_verl.glue.plugin as plugin

    assert recipe_requested(["main_ppo", "+recipe=ssopd", "x=1"])
    assert not recipe_requested(["main_ppo", "algorithm.adv_estimator=grpo"])
    guard_recipe(["main_ppo", "+recipe=ssopd"])  # installed: passes
    monkeypatch.setattr(plugin, "search_path_plugin_available", lambda: False)
    try:
        plugin.guard_recipe(["main_ppo", "+recipe=ssopd"])
    except SystemExit as exit_:
        assert "plain PPO" in str(exit_)
    else:
        raise AssertionError("the guard let a run without the Hydra plugin through")
