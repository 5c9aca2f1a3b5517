"""Training: one distillation step, the loop around it, the processes that run it, and ``kdkit run``."""
