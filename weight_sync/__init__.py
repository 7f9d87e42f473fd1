"""Trainer-to-engine weight updates (NCCL / gloo groups, CUDA IPC, disk)."""
