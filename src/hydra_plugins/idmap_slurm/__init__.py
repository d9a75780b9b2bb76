"""idmap's SLURM launcher as Hydra must find it (launchers are instantiated only from the
hydra_plugins package); idmap.run.slurm holds what it does differently from hydra-submitit-launcher.
Without that plugin installed this defines nothing, so Hydra's plugin scan stays quiet."""

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm
except ImportError:
    _SubmititSlurm = None

if _SubmititSlurm is not None:

    class SlurmLauncher(_SubmititSlurm):
        """hydra-submitit-launcher's SlurmLauncher; the job side (`__call__`, `checkpoint`, the
        requeue) is unchanged, the submitting side reports refusals and failed jobs in one line each."""

        def launch(self, job_overrides, initial_job_idx):
            from idmap.run.slurm import launch

            return launch(self, job_overrides, initial_job_idx)
