"""The UCX settings a process needs before NIXL loads, and why (issue 18).

The ``nixl_cu12`` / ``nixl_cu13`` wheels bundle their own rdma-core and libnl under renamed
sonames (``libibverbs-<hash>.so``, ``libnl-route-3-<hash>.so``, ...). At ``ucp_init`` UCX loads
every transport module it finds, and one of them, ``libuct_ib_efa.so``, needs the *system*
``libefa.so.1`` (Debian's ``ibverbs-providers``, installed with ``libibverbs1``), which needs the
system ``libibverbs.so.1`` and its ``libnl-route-3.so.200``. Those load inside the efa module's
``dlopen``, whose symbol lookup scope lists the bundled libnl copies first, so the system
libnl-route's own calls (``rtnl_tc_register``, ``rtnl_tc_unregister``, ``nl_cache_mngt_*``) bind
to the bundled copy (``LD_DEBUG=bindings``). Its constructors then register its traffic-control
ops in the bundled copy's list, which refuses them (that copy registered the same kinds:
``-NLE_EXIST``) and leaves their list links NULL; at exit ``_dl_fini`` runs the system copy's
destructors, ``rtnl_tc_unregister`` unlinks a NULL node, and the process dies with SIGSEGV
(status 139) after all its work is done. Without ``libibverbs1`` the module fails to load
(no ``libefa.so.1``) and nothing happens, which is why only RDMA hosts see it.

Fix at the root: ``UCX_MODULES=^efa`` keeps UCX from loading that one module, so the system
rdma-core never enters a NIXL process and there is one libnl, registered and unregistered once.
The wheel's EFA transport cannot work anyway (it would run the system ``libefa`` against the
bundled ``libibverbs``); on EFA hosts NIXL's LIBFABRIC backend is the path. UCX reads
``UCX_MODULES`` once, when ``libucs`` loads, so the variable must be in the environment before
NIXL is first loaded: ``prepare_process`` (called by ``load_nixl``) sets it in this process and
``ucx_env_defaults`` gives it to children (``fabric.supervise.child_env``: also vLLM's own NIXL
connector in the benchmarks). A ``UCX_MODULES`` the user set is left alone, with a warning when
it lets the efa module load.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

UCX_MODULES_DEFAULT = "^efa"
"""Every UCX module but the EFA transport (see the module docstring)."""


def ucx_env_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The UCX variables to add to ``environ`` before a process loads NIXL (those it lacks)."""
    return {} if "UCX_MODULES" in environ else {"UCX_MODULES": UCX_MODULES_DEFAULT}


def loads_efa_module(modules: str) -> bool:
    """Whether UCX would load its ``efa`` module under ``UCX_MODULES=modules``.

    UCX's allow-list syntax (``ucs_config_sscanf_allow_list``): comma-separated glob patterns of
    the modules to load, or with a leading ``^`` of those not to load (case-insensitive); a
    first pattern ``all`` allows every module, with or without ``^``.
    """
    value = modules.strip().lower()
    negate = value.startswith("^")
    patterns = [p.strip() for p in value.removeprefix("^").split(",") if p.strip()]
    if patterns[:1] == ["all"]:
        return True
    matched = any(fnmatch.fnmatchcase("efa", p) for p in patterns)
    return not matched if negate else matched


@functools.cache
def prepare_process() -> None:
    """Set this process's UCX defaults before NIXL loads (once; warns when it is too late).

    Too late means UCX was already loaded here by something other than ``load_nixl`` (another
    library's NIXL or UCX): it read its options without ours and may crash this process at exit.
    """
    defaults = ucx_env_defaults(os.environ)
    os.environ.update(defaults)
    if defaults and _ucx_already_loaded():
        logger.warning(
            "UCX was loaded before fabric loaded NIXL, without UCX_MODULES=%s: on hosts with "
            "libibverbs1 this process may die with SIGSEGV at exit; set UCX_MODULES=%s in its "
            "environment",
            UCX_MODULES_DEFAULT,
            UCX_MODULES_DEFAULT,
        )
    elif not defaults and loads_efa_module(os.environ["UCX_MODULES"]):
        logger.warning(
            "UCX_MODULES=%s lets UCX load its efa module, which loads the system rdma-core beside "
            "NIXL's bundled one: on hosts with libibverbs1 processes die with SIGSEGV at exit; "
            "exclude it (e.g. UCX_MODULES=%s)",
            os.environ["UCX_MODULES"],
            UCX_MODULES_DEFAULT,
        )


def _ucx_already_loaded() -> bool:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "/libucs" in maps
