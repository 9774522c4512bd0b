# SPDX-License-Identifier: MIT
"""Lab files the unit tests share."""

# The smallest valid lab: one image, one VM, a relative cache.
MINIMAL_LAB = """\
cache_dir: cache
images:
  trixie:
    suite: trixie
vms:
  guest:
    image: trixie
"""


def guest_lab(cache, name: str = "uffd-lab", memory: str = "512M", cpus: int = 1,
              cmdline: str = "", hugepages: int = 0) -> str:
    """A lab of one trixie VM called `guest`, under TCG, with this shape."""
    return (f"name: {name}\naccel: tcg\ncache_dir: {cache}\n"
            f"images:\n  trixie:\n    suite: trixie\n"
            f"vms:\n  guest:\n    image: trixie\n    memory: {memory}\n    cpus: {cpus}\n"
            f"    cmdline: \"{cmdline}\"\n"
            f"provision:\n  hugepages: {hugepages}\n")
