"""Node health in Slurm: the policy that turns verdicts into drains, resumes and weights
(`policy`), the queue that runs those Slurm actions with retries (`actions`), and what the
admin commands do by hand (`admin`)."""
