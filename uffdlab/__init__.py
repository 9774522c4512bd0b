"""uffd-lab: kernel test VMs for userfaultfd write-protect experiments.

    from uffdlab import load_lab, VM
    lab = load_lab("lab.yml")
    with VM(lab, "guest") as vm:
        print(vm.session().run("uname -r").stdout)
"""
from .config import ConfigError, Lab, load_lab
from .events import Event
from .images import Image, ImageStore
from .vm import VM, VMError

__all__ = ["ConfigError", "Event", "Image", "ImageStore", "Lab", "VM", "VMError", "load_lab"]
__version__ = "0.1.0"
