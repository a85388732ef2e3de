"""The `gpufleet` command line: parsing only, then a call into a domain package.

`entry` is the console script (execs the real sbatch at once for `gpufleet sbatch`); `main`
is the click group, settings and the `controller` command; each other command group is a
module of its own (`acct`, `jobs`, `place`, `repair`, `topology`, `certs`, `demo`), and
`sbatch_filter` is what Slurm's cli_filter/lua runs per job component.
"""
