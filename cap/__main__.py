"""`python -m cap task=... method=... [key=value ...]`: the Hydra entry point."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from cap.errors import UserError
    from cap.recipes import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    fresh = not any(p.name not in (".hydra", "__main__.log") for p in run_dir.iterdir())
    try:
        run(cfg, run_dir)
    except UserError as err:
        if fresh:  # nothing of this run was written yet: leave no half-made run dir behind
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
