"""Host memory the banks take per node, for 1 process and for 2 processes of one launch (torchrun, gloo), with one
copy per process and with one copy per node in shared memory (`cap.banks.make_bank`, the default under a launcher).

Each process builds the banks of a CAP-m run (PrC, FiC and two SnC snapshots: four [N, H] float16 snapshots) and
fills them; the memory is the launch's processes' proportional set size (PSS: a page shared by k processes counts
1/k in each) after filling minus before building, summed over the processes of the node. N defaults to 100,000
items of H = 768 (BERT-base): 0.57 GiB per copy; QQP's 363,846 training pairs would take 3.6 times that.

    python scripts/bench_bank_memory.py [--items 100000]          -> results/bench/bank_memory.json
"""
import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch

from cap.io import write_json_atomic
from cap.precision import cpu_name

DIM, SNAPSHOTS = 768, {"prc": 1, "fic": 1, "snc": 2}


def pss_bytes() -> int:
    """This process's proportional set size."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss line in /proc/self/smaps_rollup")


def worker(items: int, shared: bool, out: Path) -> None:
    """One process of the launch: build and fill the banks, report its PSS before and after."""
    import torch.distributed as dist

    from cap.banks import make_bank
    from cap.distributed import join, this_process

    join()
    gc.collect()
    before = pss_bytes()
    banks = {name: make_bank(items, DIM, reps, dtype=torch.float16, device="cpu", name=name, shared=shared)
             for name, reps in SNAPSHOTS.items()}
    generator = torch.Generator().manual_seed(0)
    for name, bank in banks.items():
        for _ in range(bank.max_reps):
            bank.append(torch.nn.functional.normalize(torch.randn(items, DIM, generator=generator), dim=-1))
    # every process reads every bank (as training does), then measures
    checksum = sum(float(bank.view().float().sum()) for bank in banks.values())
    gc.collect()
    after = pss_bytes()
    rank, world = this_process()
    (out / f"rank{rank}.json").write_text(json.dumps({"pss_before": before, "pss_after": after,
                                                      "checksum": checksum}))
    if world > 1:
        dist.barrier()  # every process measured with the banks still mapped


def launch(processes: int, shared: bool, items: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="cap-bank-memory-") as tmp:
        out = Path(tmp)
        launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone",
                                              f"--nproc_per_node={processes}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, *launcher, __file__, "--worker", "--items", str(items), "--out", str(out),
                        *(["--shared"] if shared else [])], check=True, env=env)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
    assert len({round(r["checksum"], 2) for r in ranks}) == 1, "the processes hold different banks"
    node = sum(r["pss_after"] - r["pss_before"] for r in ranks)
    return {"processes": processes, "shared_memory": shared, "node_bytes": node,
            "node_gib": round(node / 2**30, 3), "per_process_gib": [round((r["pss_after"] - r["pss_before"]) / 2**30, 3)
                                                                   for r in ranks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shared", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "results" / "bench" / "bank_memory.json"))
    a = parser.parse_args()
    if a.worker:
        return worker(a.items, a.shared, Path(a.out))
    copy = a.items * DIM * sum(SNAPSHOTS.values()) * 2
    runs = [launch(1, False, a.items), launch(2, False, a.items), launch(2, True, a.items)]
    result = {"what": __doc__.split("\n\n")[1].replace("\n", " "),
              "items": a.items, "dim": DIM, "snapshots": SNAPSHOTS, "dtype": "float16",
              "bytes_per_copy": copy, "gib_per_copy": round(copy / 2**30, 3), "runs": runs,
              "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(a.out), result)
    print(json.dumps(result["runs"], indent=1))


if __name__ == "__main__":
    main()
