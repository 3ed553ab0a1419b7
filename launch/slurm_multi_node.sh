#!/bin/bash
# One run on several nodes: `sbatch launch/slurm_multi_node.sh experiment=paper/cap_soft/mnli_97 [key=value ...]`.
# One torchrun per node (srun), 4 GPUs each, meeting at the first node; trainer.batch_size stays the global batch.
# The run dir (runs/ under the submit folder), teachers and data cache must be on a shared file system.
#SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 --cpus-per-task=32 --time=24:00:00
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 4 --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d \
  --rdzv_endpoint "$head_node:29500" -m cap "$@"
