"""Starting and continuing runs: the Hydra task and process groups (launch.py), resuming by
directory (resume.py), a sweep's end and exit status (sweep_status.py), one GPU per job on one
machine (gpu_pool.py), and SLURM (slurm.py)."""
