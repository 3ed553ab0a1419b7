"""Run the README's main job once and record its wall time and metrics in results/main_job.json.

    CAP_DATA_DIR=../shared/data python scripts/time_main_job.py
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARGS = ["experiment=quickstart"]


def main() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="cap-main-job-"))
    start = time.perf_counter()
    # a fresh teacher cache, so the time includes fine-tuning the teacher as on a new machine
    subprocess.run([sys.executable, "-m", "cap", *ARGS, f"hydra.run.dir={run_dir}",
                    f"teacher.cache_dir={run_dir / 'teachers'}"], cwd=REPO, check=True)
    wall = time.perf_counter() - start
    result = {
        "command": "python -m cap " + " ".join(ARGS),
        "wall_seconds": round(wall, 1),
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "teacher_metrics": [row for path in (run_dir / "teachers").glob("*/metrics.json")
                            for row in json.loads(path.read_text())],
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()},
    }
    out = REPO / "results" / "main_job.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
