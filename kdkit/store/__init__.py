"""What a run leaves on disk: the run directory and its lock, checkpoints, the summary and the export."""
