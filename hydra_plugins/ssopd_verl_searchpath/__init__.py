"""Hydra SearchPathPlugin: makes `+recipe=ssopd` resolvable from any working directory.

Hydra discovers every module under the `hydra_plugins` namespace package (which has no
`__init__.py` of its own) when `verl.trainer.main_ppo` starts, so installing ssopd-verl is
enough: no `--config-path` and no copy of verl's config tree.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

SEARCH_PATH = "pkg://ssopd_verl.conf"


class SSOPDSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Appended, not prepended: verl's own configs keep priority for every name they define.
        search_path.append(provider="ssopd-verl", path=SEARCH_PATH)
