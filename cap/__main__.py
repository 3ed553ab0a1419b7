"""`python -m cap task=... method=... [key=value ...]`: the Hydra entry point."""
from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra._internal import utils as hydra_utils
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from cap.cli import SchemaCheck, explain

CONF = Path(__file__).resolve().parents[1] / "conf"  # absolute: `cap` and `python -m cap` work from any folder


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def run_job(cfg: DictConfig) -> None:
    from cap.errors import UserError
    from cap.recipes import run

    from cap.distributed import this_process

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    fresh = not any(p.name not in (".hydra", "__main__.log") for p in run_dir.iterdir())
    try:
        run(cfg, run_dir)
    except UserError as err:
        if fresh and this_process().main:  # nothing of this run was written yet: leave no half-made run dir behind
            shutil.rmtree(run_dir, ignore_errors=True)
            remove_empty_parents(run_dir)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def remove_empty_parents(run_dir: Path) -> None:
    """The folders Hydra made for a run dir (runs/sst2/cap_m/...), up to the working directory, while empty."""
    cwd = Path.cwd().resolve()
    for parent in run_dir.resolve().parents:
        if parent == cwd or cwd not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def main() -> None:
    """Hydra's command line (`-m`, `--cfg`, `--help`, launchers as documented), with one change: a config that does
    not compose (an unknown key or option, a value of the wrong type) is one `error:` line and exit status 2, as
    every other bad input, instead of Hydra's report over several lines and status 1 (HYDRA_FULL_ERROR=1 still gets
    Hydra's traceback). Hydra reports through `run_and_report`, which has no hook: it is wrapped here, for the
    composition errors alone."""
    report = hydra_utils.run_and_report

    def run_and_report(func):
        def composed():
            try:
                return func()
            except CompactHydraException as err:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"error: {explain(err)}", file=sys.stderr)
                SchemaCheck.remove_empty_sweep_dir()
                sys.exit(2)
        return report(composed)

    hydra_utils.run_and_report = run_and_report
    sys.argv += launch_overrides(sys.argv[1:])
    try:
        run_job()
    finally:
        hydra_utils.run_and_report = report


def launch_overrides(args: list[str]) -> list[str]:
    """Under a launcher with several processes (cap.distributed), what Hydra must do differently: the processes other
    than the main one write none of Hydra's files (`.hydra/`, the job log); a multirun's sweep dir is named after the
    main process's start time, so that every process resolves the same one (each would read its own clock)."""
    from cap.distributed import broadcast, join, this_process

    process = this_process()
    if process.world == 1:
        return []
    extra = [] if process.main else ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    if {"-m", "--multirun"} & set(args) and not any(a.startswith("hydra.sweep.dir=") for a in args):
        join()
        started = broadcast(datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        extra.append(f"hydra.sweep.dir=multiruns/{started}")  # the default sweep dir (conf/config.yaml), one clock
    return extra


if __name__ == "__main__":
    main()
