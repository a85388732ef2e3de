"""Recovery of jobs on a node that turned fatal: signal, grace, requeue elsewhere (`manager`)."""
