# SPDX-License-Identifier: MIT
"""uffd-lab: kernel test VMs for userfaultfd write-protect experiments.

    from uffdlab import load_lab, VM
    lab = load_lab("lab.yml")
    with VM(lab, "guest") as vm:
        print(vm.session().run("uname -r").stdout)

The names below load on first use, so `import uffdlab.report` or
`uffdlab.results` does not pull in SSH and Ansible.
"""
from importlib import import_module

_EXPORTS = {"ConfigError": "config", "Lab": "config", "load_lab": "config",
            "Event": "events", "Image": "images", "ImageStore": "images",
            "VM": "vm", "VMError": "vm"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
