"""Property-based fuzzing of parsers of untrusted bytes: a value or a SovpackError, nothing else."""
