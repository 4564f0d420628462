#!/bin/sh
# slurmd runs this after every job (Epilog in slurm.conf.in); start.sh copies it
# to $CXRFLOW_SLURM_DIR/etc/. It records which GPUs SLURM gave the job, which
# jobcomp/filetxt does not. A failing epilog drains the node, hence exit 0.
echo "JobId=$SLURM_JOB_ID JobGpus=${SLURM_JOB_GPUS:-} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}" \
    >>"$(dirname "$0")/../log/gpus.txt"
exit 0
