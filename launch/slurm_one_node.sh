#!/bin/bash
# One run on the GPUs of one node: `sbatch launch/slurm_one_node.sh experiment=paper/cap_m/qqp_90 [key=value ...]`.
#SBATCH --nodes=1 --ntasks-per-node=1 --gpus-per-node=4 --cpus-per-task=32 --time=24:00:00
set -euo pipefail
srun torchrun --standalone --nproc_per_node 4 -m cap "$@"
