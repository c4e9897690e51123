# Your site's environment, sourced by every script in jobs/ before anything else (jobs/lib.sh).
# Edit it once for your cluster. A site that submits with --export=NONE (or SBATCH_EXPORT=NONE)
# starts the job without the submitting shell's environment: set up everything the job needs here.
#
#   module load python/3.11                     # the modules your site provides
#   module load openmpi                         # only with a site MPI (see docs/clusters.md)
#   source "$HOME/hpcfl/.venv/bin/activate"     # the virtual environment with hpcfl installed
#   export HPCFL_DATA_DIR=/scratch/$USER/mnist  # the data, staged once (python -m hpcfl fetch-data)
#   export HPCFL_LAUNCHER=srun                  # or mpirun
#
# With nothing set here, a job uses the environment sbatch passed on (the default --export=ALL):
# an activated venv and your HPCFL_* variables.
