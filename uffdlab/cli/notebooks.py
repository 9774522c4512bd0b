# SPDX-License-Identifier: MIT
"""Commands around the notebooks: sweep, demo, lab."""
from __future__ import annotations

import sys

from .common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, Renderer, lab_of, table


def cmd_sweep(args) -> int:
    from ..cluster import ClusterError, resume_sweep, run_sweep
    from ..sweep import SweepError, load_grid
    lab = lab_of(args)
    if (args.grid is None) == (args.resume is None):
        print("uffdlab sweep: expected GRID.yml or --resume ID (one of them), got "
              + ("both" if args.grid else "neither"), file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.resume:
            res = resume_sweep(lab, args.resume, Renderer(), cluster=args.cluster)
        else:
            grid = load_grid(args.grid)
            print(f"sweep: {grid.size} points of {grid.notebook}", file=sys.stderr)
            res = run_sweep(lab, grid, Renderer(), cluster=args.cluster)
    except (SweepError, ClusterError) as e:
        print(f"uffdlab sweep: {e}", file=sys.stderr)
        return EXIT_FAIL
    hosts = any(p.host for p in res.points)
    rows = [[str(p.index), ", ".join(f"{k}={v}" for k, v in p.params.items()), str(p.status),
             p.run_id or "", f"{p.seconds:.0f} s"] + ([p.host or ""] if hosts else [])
            + [(p.error or "")[:60]] for p in res.points]
    table(["#", "point", "status", "run", "time"] + (["host"] if hosts else []) + ["error"],
          rows)
    print(f"executed notebooks, result files and index.json: {res.directory}")
    if res.report:
        print(f"sweep report: {res.report}")
    return EXIT_OK if not res.failed else EXIT_FAIL


def cmd_demo(args) -> int:
    """The README's main job: the default image, then 10-snapshot executed
    with its defaults, leaving the notebook and the run in the database."""
    import time

    import papermill

    from ..images import ImageStore
    from ..sweep import KERNEL, NOTEBOOKS, POINT_NOTEBOOK, PointResult
    lab = lab_of(args)
    name, spec = lab.vm_spec(args.vm)
    ImageStore(lab, Renderer()).build(spec.image)
    out_dir = lab.results_path.parent / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"10-snapshot-{time.strftime('%Y%m%d-%H%M%S')}.ipynb"
    result_file = out.with_suffix(".result.json")
    print(f"executing {POINT_NOTEBOOK} (boot, provision, run; several minutes under TCG)",
          file=sys.stderr)
    papermill.execute_notebook(str(NOTEBOOKS / POINT_NOTEBOOK), str(out),
                               parameters={"lab_path": str(lab.source.resolve()),
                                           "image": spec.image,
                                           "teardown": not args.keep,
                                           "result_path": str(result_file)},
                               kernel_name=KERNEL, progress_bar=sys.stderr.isatty(),
                               cwd=str(NOTEBOOKS), log_output=args.verbose)
    try:
        print(PointResult.read(result_file))
    except (OSError, ValueError) as e:       # the notebook ended without writing it
        print(f"no outcome from the notebook ({e})")
    print(f"executed notebook: {out}")
    print(f"results database:  {lab.results_path} ('uffdlab results')")
    return EXIT_OK


def cmd_lab(args) -> int:
    """JupyterLab on notebooks/ with the project's kernel registered, and a
    URL that works as printed (our token, no silent move to another port)."""
    import getpass
    import os
    import secrets

    from ..jupyter import ensure_kernel, lab_instructions
    from ..sweep import NOTEBOOKS
    ensure_kernel()
    token = secrets.token_hex(24)
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ip={args.ip}",
            f"--port={args.port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={NOTEBOOKS}"]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    # The token goes by environment (IdentityProvider.token's default), not by
    # argv, where every local user could read it with ps.
    env = {**os.environ, "JUPYTER_TOKEN": token}
    print(lab_instructions(args.ip, args.port, token, os.environ.get("SSH_CONNECTION"),
                           getpass.getuser()), flush=True)
    os.execve(sys.executable, argv, env)


def cmd_jupyter_install(args) -> int:
    from ..jupyter import KERNEL_DISPLAY_NAME, KERNEL_NAME, install_kernel
    dest = install_kernel(user=args.user)
    print(f"kernel {KERNEL_NAME} ({KERNEL_DISPLAY_NAME!r}) installed in {dest}")
    return EXIT_OK


def register(sub) -> None:
    w = sub.add_parser("sweep", help="execute 10-snapshot for every point of a grid")
    w.add_argument("grid", metavar="GRID.yml", nargs="?")
    w.add_argument("--resume", metavar="ID",
                   help="run only the points sweep ID (or its directory) did not finish")
    place = w.add_mutually_exclusive_group()
    place.add_argument("--cluster", action="store_true", default=None,
                       help="run the points on Dask workers (lab.yml's cluster section; "
                       "without one, a local cluster of this machine's VM slots)")
    place.add_argument("--here", dest="cluster", action="store_false",
                       help="one point after another on this machine, even with a cluster "
                       "section")
    w.set_defaults(func=cmd_sweep)

    d = sub.add_parser("demo", help="the main job: image, then 10-snapshot executed")
    d.add_argument("vm", nargs="?", help="whose image to use (the first VM by default)")
    d.add_argument("--keep", action="store_true", help="leave the VM running")
    d.add_argument("--verbose", action="store_true", help="show the notebook's output")
    d.set_defaults(func=cmd_demo)

    from ..jupyter import port_number
    j = sub.add_parser("lab", help="start JupyterLab on notebooks/")
    j.add_argument("--ip", default="127.0.0.1")
    j.add_argument("--port", type=port_number, default=8888, help="1-65535 (default 8888)")
    j.set_defaults(func=cmd_lab)

    jup = sub.add_parser("jupyter", help="the project's Jupyter kernel")
    jsub = jup.add_subparsers(dest="jupyter_command", required=True, metavar="ACTION")
    ji = jsub.add_parser("install", help="register the kernel 'uffdlab' (this venv's Python)")
    ji.add_argument("--user", action="store_true",
                    help="for the user, so their own JupyterLab or VS Code sees it "
                    "(default: in this venv only)")
    ji.set_defaults(func=cmd_jupyter_install)
