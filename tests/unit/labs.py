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
