#!/bin/bash
# SiD distillation of FLUX.1-dev on 2 nodes × 8 GPUs with SLURM: one `torchrun` per node, rendezvous on the first node.
# Submit: sbatch launchers/slurm_example.sh   (edit the paths; nothing is downloaded by sid_fast)
#SBATCH --job-name=sid-flux
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=TERM@300            # SIGTERM 5 min before the limit; resume picks up the last complete checkpoint

set -euo pipefail
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=29500
export OMP_NUM_THREADS=8
export NCCL_ASYNC_ERROR_HANDLING=1   # fail fast instead of hanging on a dead rank
# export NCCL_SOCKET_IFNAME=ib0      # the interface that reaches the other nodes, if NCCL picks the wrong one
# export NCCL_IB_HCA=mlx5            # InfiniBand adapters to use

srun torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node=8 \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \
    launchers/flux_large.py \
    --teacher.path=/models/FLUX.1-dev \
    --teacher.prompts=/data/prompts.txt \
    --train.out_dir=/scratch/$USER/sid-flux \
    --train.grad_accum=16            # 16 GPUs × 1 × 16 = global batch 256
